"""The set of loaded schedules, and which one a transaction runs on."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from .model import Schedule


class Registry:
    """Schedules in the documented order: lower ``priority`` first, then name; first match wins."""

    def __init__(self, schedules: Sequence[Schedule]) -> None:
        self.schedules = tuple(sorted(schedules, key=lambda s: (s.priority, s.name)))
        self._by_name = {s.name: s for s in self.schedules}

    def choose(self, *, segment: str | None, risk_flag: bool, amount: Decimal, currency: str) -> Schedule:
        for schedule in self.schedules:
            if schedule.match.accepts(segment=segment, risk_flag=risk_flag, amount=amount, currency=currency):
                return schedule
        raise LookupError("no schedule matches; the loader guarantees a catch-all, so this is a bug")

    def get(self, name: str) -> Schedule | None:
        return self._by_name.get(name)

    def channels(self) -> set[str]:
        """Every channel a schedule may send on: its steps', their fallbacks', and its final step's."""
        return {c for s in self.schedules for step in s.steps for c in (*step.channels, *(step.fallback or ()))} | {
            c for s in self.schedules for c in s.final.channels}

    def __iter__(self):
        return iter(self.schedules)
