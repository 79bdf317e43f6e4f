"""What a schedule is once loaded: a ladder of reminder steps and one final step."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cached_property

from .quiet import QuietHours

CHANNELS = ("sms", "email", "push")

#: The longest value the store can hold for each identifier a schedule names (the column lengths in
#: worker/store/tables.py; a test keeps the two equal). SQLite ignores lengths but PostgreSQL refuses
#: the row, so the loader refuses a longer name before a tick ever tries to write it.
MAX_LENGTH = {
    "schedule": ("transactions.schedule", 64),
    "step": ("deliveries.step", 64),
    "template": ("deliveries.template", 64),
    "variant": ("deliveries.variant", 32),
    "segment": ("transactions.segment", 32),
    "currency": ("transactions.currency", 3),
}


@dataclass(frozen=True)
class Variant:
    """One wording of a step for A/B tests; chosen by weight, deterministically per transaction."""

    name: str
    template: str
    weight: int


@dataclass(frozen=True)
class Step:
    """One reminder: ``after`` counts from the transaction's ``created_at``."""

    id: str
    after: timedelta
    channels: tuple[str, ...]
    template: str
    fallback: tuple[str, ...] | None = None  # None: the schedule's other channels
    variants: tuple[Variant, ...] = ()  # empty: ``template`` for everyone


@dataclass(frozen=True)
class Final:
    """The last step: ``cancel`` the transaction, or ``escalate`` it to ops review."""

    action: str  # "cancel" | "escalate"
    after: timedelta
    template: str
    reason: str
    channels: tuple[str, ...]

    @property
    def status(self) -> str:
        return "cancelled" if self.action == "cancel" else "escalated"


@dataclass(frozen=True)
class Match:
    """Which transactions a schedule applies to; an empty match catches every transaction."""

    segments: tuple[str, ...] = ()
    risk_flag: bool | None = None
    amount_min: Decimal | None = None
    amount_max: Decimal | None = None
    currencies: tuple[str, ...] = ()

    def accepts(self, *, segment: str | None, risk_flag: bool, amount: Decimal, currency: str) -> bool:
        if self.segments and segment not in self.segments:
            return False
        if self.risk_flag is not None and risk_flag != self.risk_flag:
            return False
        if self.currencies and currency not in self.currencies:
            return False
        if self.amount_min is not None and amount < self.amount_min:
            return False
        if self.amount_max is not None and amount > self.amount_max:
            return False
        return True

    @property
    def catches_all(self) -> bool:
        return self == Match()


@dataclass(frozen=True)
class Schedule:
    name: str
    match: Match
    priority: int
    steps: tuple[Step, ...]
    final: Final
    version: str
    source: str = field(default="", compare=False)
    quiet_hours: QuietHours | None = None

    def deadline(self, created_at: datetime, expires_at: datetime | None) -> datetime:
        """The final step's time: the schedule's own, or ``expires_at`` when that is earlier."""
        own = created_at + self.final.after
        return min(own, expires_at) if expires_at is not None else own

    def step(self, step_id: str) -> Step | None:
        return next((s for s in self.steps if s.id == step_id), None)

    def fallback_for(self, step_id: str) -> tuple[str, ...]:
        """Channels to try when one of the step's channels cannot be used: the step's own
        ``fallback:`` list, else every channel the schedule uses, in the order sms, email, push."""
        step = self.step(step_id)
        if step is not None and step.fallback is not None:
            return step.fallback
        return self._every_channel

    @cached_property
    def _every_channel(self) -> tuple[str, ...]:
        """Every channel the schedule uses, in the order sms, email, push (asked per transaction a tick)."""
        used = {c for s in self.steps for c in s.channels} | set(self.final.channels)
        return tuple(c for c in CHANNELS if c in used)
