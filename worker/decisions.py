"""Status changes that people and the platform make: a confirmation, a cancel, the risk-review actions.

Each is one database transaction: the status change under the row lock, its audit line, its event to the
platform and its notice to the customer, so none of them exists without the others. The deadline's own
changes are the tick's (``worker/scheduler.py``), with the same three parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .contacts import all_pairs, choose
from .errors import AlreadySettled, InvalidInput, NotFound
from .ladder import Registry, Schedule
from .scheduler import hold_for_quiet_hours
from .store import CANCELLED, CONFIRMED, ESCALATED, PENDING, NewDelivery, Store
from .store.events import event_data

log = logging.getLogger("remind.decisions")

#: Who changes a transaction: the customer's link, the platform (API), a person at the CLI, ops (a review),
#: the deadline (the tick). Events say ``platform`` for the CLI too: both are the platform's side.
SOURCES = ("customer", "platform", "cli", "ops", "deadline")
#: Reason codes the service knows the words for (templates/<locale>/reasons/); platforms may send others.
REASONS = ("not_confirmed", "customer_request", "risk_declined", "compliance")
#: The templates of the customer messages that decisions send.
CANCELLED_TEMPLATE, APPROVED_TEMPLATE, CONTACT_TEMPLATE = "cancelled", "approved", "review_contact"
DECISION_TEMPLATES = (CANCELLED_TEMPLATE, APPROVED_TEMPLATE, CONTACT_TEMPLATE)
#: Notice steps (``deliveries.step``) and the transaction status each needs when it goes out.
NOTICE_STATUS = {"cancel": CANCELLED, "escalate": ESCALATED, "approve": CONFIRMED, "contact": ESCALATED}


def event_source(source: str) -> str:
    """The platform contract's source: the CLI acts for the platform."""
    return "platform" if source == "cli" else source


def check_text(field: str, value: str | None, *, required: bool, longest: int) -> str | None:
    """A name, note or reason code as the store can keep it; InvalidInput naming the field otherwise."""
    if value is None or value == "":
        if required:
            raise InvalidInput({field: "required"})
        return None
    if not isinstance(value, str):
        raise InvalidInput({field: "must be text"})
    value = value.strip()
    if not value and required:
        raise InvalidInput({field: "required"})
    if len(value) > longest:
        raise InvalidInput({field: f"at most {longest} characters"})
    if any(ord(ch) < 32 and ch not in "\n\t" or 0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise InvalidInput({field: "contains control characters or invalid Unicode"})
    return value or None


def check_reason(reason: str | None, *, default: str) -> str:
    """A reason: one of REASONS, or the platform's own code or words (up to 500 characters, one line).
    Known codes get their own wording in the customer's notice; others get the generic one."""
    text = check_text("reason", reason, required=False, longest=500) or default
    if "\n" in text or "\t" in text:
        raise InvalidInput({"reason": "one line of text"})
    return text


@dataclass
class Decision:
    """What a decision did: the row after it, whether it changed anything, what to enqueue."""

    row: dict[str, Any]
    changed: bool
    deliveries: list[int]
    events: list[int]


class Decisions:
    def __init__(self, store: Store, registry: Callable[[], Registry], *, lease: timedelta) -> None:
        self.store = store
        self.registry = registry
        self.lease = lease

    # -- the status changes -------------------------------------------------------------------------

    def confirm(self, tx_id: str, *, source: str, actor: str | None = None, note: str | None = None) -> Decision:
        """Confirm (idempotent). Ops may confirm an escalated transaction; the customer's link may not
        (it would override the review) unless ops asked the customer to verify it. A cancelled one
        cannot be confirmed. An ops approval tells the customer."""

        def allowed(row: Mapping[str, Any]) -> bool:
            if row["status"] == PENDING:
                return True
            if row["status"] != ESCALATED:
                return False
            return source != "customer" or row["review_state"] == "contacted"

        return self._settle(tx_id, CONFIRMED, None, allowed, source=source, actor=actor, note=note,
                            notice=("approve", APPROVED_TEMPLATE) if source == "ops" else None)

    def cancel(self, tx_id: str, reason: str, *, source: str, actor: str | None = None,
               note: str | None = None) -> Decision:
        """Cancel a pending or escalated transaction (idempotent; a confirmed one stays confirmed) and
        tell the customer why and how to start again."""
        return self._settle(tx_id, CANCELLED, reason, lambda row: row["status"] in (PENDING, ESCALATED),
                            source=source, actor=actor, note=note, notice=("cancel", CANCELLED_TEMPLATE))

    def contact(self, tx_id: str, *, actor: str, note: str | None = None) -> Decision:
        """Risk review: ask the customer to verify the transfer (its own message, with the confirmation
        link, which may now confirm it). Each contact is a new message; the transaction stays escalated."""
        with self.store.begin() as conn:
            row = self.store.lock_transaction(conn, tx_id)
            if row is None:
                raise NotFound(tx_id)
            if row["status"] != ESCALATED:
                raise AlreadySettled(tx_id, row["status"])
            now = self.store.clock()
            done = self.store.events.count(conn, tx_id, "contacted")
            self.store.set_review_state(conn, tx_id, "contacted")
            self.store.events.note(conn, tx_id, now, "contacted", "ops", actor=actor, note=note)
            event = self.store.events.add(conn, row, "review.contacted", event_data(
                row, status=ESCALATED, source="ops", actor=actor, reason=row["status_reason"], at=now, note=note), now)
            deliveries = self._notice(conn, row, f"contact_{done + 1}" if done else "contact", CONTACT_TEMPLATE)
            row = dict(self.store.lock_transaction(conn, tx_id))
        log.info("%s: customer asked to verify by %s", tx_id, actor)
        return Decision(row, True, deliveries, [event] if event else [])

    # -- the parts ------------------------------------------------------------------------------------

    def _settle(self, tx_id: str, status: str, reason: str | None, allowed: Callable[[Mapping[str, Any]], bool], *,
                source: str, actor: str | None, note: str | None, notice: tuple[str, str] | None) -> Decision:
        refused: str | None = None
        with self.store.begin() as conn:
            previous, row = self.store.settle(conn, tx_id, status, reason, allowed=allowed,
                                              source=event_source(source), actor=actor)
            if previous is None:
                raise NotFound(tx_id)
            if row["status"] != status:
                refused = row["status"]
                if source == "customer" and refused == ESCALATED:  # kept: ops see what the customer did
                    self.store.events.note(conn, tx_id, self.store.clock(), "confirm_refused", "customer",
                                           note="the customer tried to confirm by the link while under review")
            elif previous == status:
                return Decision(row, False, [], [])
            else:
                now = row[f"{status}_at"]
                self.store.events.note(conn, tx_id, now, status, source, actor=actor, note=note)
                event = self.store.events.add(conn, row, f"transaction.{status}", event_data(
                    row, status=status, source=event_source(source), actor=actor, reason=reason, at=now), now)
                deliveries = self._notice(conn, row, *notice) if notice else []
        if refused:
            raise AlreadySettled(tx_id, refused)
        log.info("%s %s by %s%s", tx_id, status, source, f" ({actor})" if actor else "")
        return Decision(row, True, deliveries, [event] if event else [])

    def _notice(self, conn: Any, row: Mapping[str, Any], step: str, template: str) -> list[int]:
        """The customer's message about a decision, on the channels of the schedule's final step (with
        its fallbacks), as the deadline's notice would go. Returns the queued ids to enqueue."""
        schedule = self._schedule(row)
        if step == "cancel" and schedule.final.action == "cancel":
            template = schedule.final.template  # the schedule's own wording for a cancellation
        customer = row["content"]["customer"]
        if customer.get("erased"):
            return []
        suppressed = self.store.suppressed(conn, all_pairs(customer))
        now = self.store.clock()
        final = schedule.final
        zone = customer.get("timezone") or "UTC"
        rows = [hold_for_quiet_hours(NewDelivery(row["id"], step, "notice", c.channel, template, now,
                                                 "queued" if c.send else "skipped", c.reason, "default"),
                                     schedule, now, zone)
                for c in choose(final.channels, schedule.fallback_for(final.action), customer, suppressed)]
        return self.store.add_deliveries(conn, rows, now, self.lease)

    def _schedule(self, row: Mapping[str, Any]) -> Schedule:
        registry = self.registry()
        return registry.get(row["schedule"]) or registry.choose(
            segment=row["segment"], risk_flag=row["risk_flag"], amount=row["amount"], currency=row["currency"])


def notice_status(step: str) -> str | None:
    """The status a notice step needs to go out (``contact_2`` is a contact)."""
    return NOTICE_STATUS.get(step.split("_", 1)[0] if step.startswith("contact") else step)
