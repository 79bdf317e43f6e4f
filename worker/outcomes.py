"""What happens after a send: delivered, or failed for good, and then fall back, suppress, or tell the
platform that no channel is left. Used by the actor and by the providers' status webhooks alike."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .contacts import addresses, all_pairs, choose
from .ladder import Registry, Schedule, fallback_time, quiet_until
from .masking import mask_text
from .store import CANCELLED, ESCALATED, PENDING, NewDelivery, Store
from .store.events import event_data

log = logging.getLogger("remind.outcomes")

#: Provider codes that mean "this customer does not want this channel".
OPT_OUT_CODES = {"21610": ("sms", "opted out of SMS (STOP)")}
ALIVE = ("queued", "sending", "sent", "delivered")
#: Provider message statuses that settle a delivery; the others (queued, sent, ...) change nothing.
FINAL_STATUSES = ("delivered", "undelivered", "failed")
#: How long a status callback for a message we have no provider id for yet is kept, waiting for it.
EARLY_CALLBACK_KEEP = timedelta(days=1)


class Outcomes:
    def __init__(self, store: Store, registry: Callable[[], Registry], enqueue: Callable[[list[int]], None], *,
                 lease: timedelta, enqueue_events: Callable[[list[int]], None] = lambda ids: None) -> None:
        self.store = store
        self.registry = registry
        self.enqueue = enqueue
        self.enqueue_events = enqueue_events
        self.lease = lease

    def delivered(self, delivery_id: int) -> bool:
        """The provider confirmed delivery; only a sent message can become delivered."""
        with self.store.begin() as conn:
            d = self.store.get_delivery(conn, delivery_id, lock=True)
            if d is None or d["status"] not in ("sent", "sending"):
                return False
            self.store.update_delivery(conn, delivery_id, status="delivered", lease_until=None)
        return True

    def failed(self, delivery_id: int, reason: str, *, code: str | None = None) -> str | None:
        """Record a permanent failure and fall back to the next usable channel of the schedule.

        Returns the fallback channel, or None when there was none."""
        reason = mask_text(reason)  # provider errors may quote the address
        new_ids: list[int] = []
        event_ids: list[int] = []
        alt: str | None = None
        with self.store.begin() as conn:
            # Transaction, then delivery: the order every lock is taken in (the worker's claim too).
            found = self.store.get_delivery(conn, delivery_id)
            if found is None:
                return None
            tx = self.store.lock_transaction(conn, found["transaction_id"])
            d = self.store.get_delivery(conn, delivery_id, lock=True)
            if d is None or d["status"] in ("failed", "skipped"):
                return None  # a duplicate report (a replayed bounce) changes nothing
            if d["kind"] == "reminder" and d["status"] in ("sent", "delivered"):
                self.store.funnel_changed(conn, tx["id"])  # it no longer counts as sent in the funnel
            customer = tx["content"]["customer"]
            now = self.store.clock()
            if code in OPT_OUT_CODES and OPT_OUT_CODES[code][0] == d["channel"]:
                for address in addresses(customer, d["channel"]):
                    self.store.suppress(conn, d["channel"], address, customer["id"], OPT_OUT_CODES[code][1])
            wanted = (PENDING,) if d["kind"] == "reminder" else (CANCELLED, ESCALATED)
            if tx["status"] not in wanted:
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None, reason=reason)
                return None
            if d["kind"] == "reminder" and tx["deadline"] <= now:
                # Too late for any channel: the cancellation (and its webhook) is what comes next.
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None,
                                           reason=f"{reason}; no fallback: the deadline has passed")
                return None
            rows = self.store.step_deliveries(conn, tx["id"], d["step"])
            siblings = [s for s in rows if s["kind"] != "webhook"]  # webhook rows: from before events
            suppressed = self.store.suppressed(conn, all_pairs(customer))
            suppressed |= {(d["channel"], a) for a in addresses(customer, d["channel"])}  # this one just failed
            schedule = self.registry().get(tx["schedule"])
            fallback = schedule.fallback_for(d["step"]) if schedule else ()
            choices = choose([d["channel"]], fallback, customer, suppressed, taken=[s["channel"] for s in siblings])
            substitute = next((c for c in choices if c.send), None)
            # Quiet hours: the fallback waits for their end, as the step itself would have.
            at, wait = _when(schedule, tx, d, substitute.channel, now) if substitute and schedule else (now, None)
            if at is None:  # a reminder quiet hours would hold until its deadline: dropped, as slots() does
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None,
                                           reason=f"{reason}; no fallback to {substitute.channel}: {wait}")
                return None
            if substitute is not None:
                alt, held = substitute.channel, at > now
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None,
                                           reason=f"{reason}; falling back to {alt}")
                why = f"fallback: {d['channel']} failed ({reason})" + (f"; {wait}" if wait else "")
                new_ids = self.store.add_deliveries(conn, [NewDelivery(
                    tx["id"], d["step"], d["kind"], alt, d["template"], at if held else d["due_at"], "queued",
                    why, d["variant"], held=held)], now, self.lease)
            else:
                others_alive = any(s["status"] in ALIVE for s in siblings if s["id"] != delivery_id)
                note = "" if others_alive else "; no channel left for this step"
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None, reason=reason + note)
                if not others_alive and d["kind"] == "reminder":
                    self.store.events.note(conn, tx["id"], now, "undeliverable", "provider", note=d["step"])
                    event_id = self.store.events.add(conn, tx, "reminder.failed", event_data(
                        tx, status=tx["status"], source=None, actor=None, reason="undeliverable", at=now,
                        step=d["step"], channels=sorted({s["channel"] for s in siblings}),
                        detail="no channel could deliver this reminder"), now)
                    event_ids += [event_id] if event_id is not None else []
        if alt:
            log.info("%s %s: %s failed, falling back to %s", d["transaction_id"], d["step"], d["channel"], alt)
        if new_ids:
            self.enqueue(new_ids)
        if event_ids:
            self.enqueue_events(event_ids)
        return alt

    # -- status callbacks by provider message id ------------------------------------------------

    def status_callback(self, provider: str, provider_id: str, status: str, code: str | None = None) -> str:
        """A provider's status for one of its message ids. A final status for an id no delivery carries
        yet (the callback beat the worker's write) is kept and applied once the id is recorded.

        Returns "applied", "kept" or "ignored"."""
        if status not in FINAL_STATUSES or not provider_id:
            return "ignored"
        d = self.store.delivery_by_provider_id(provider_id)
        if d is not None:
            self._apply(d["id"], provider, status, code)
            return "applied"
        self.store.keep_early_callback(provider, provider_id, status, code, keep=EARLY_CALLBACK_KEEP)
        # The worker may have written the id between our read and our write: look once more. Each side
        # writes, then reads the other's write, so at least one of them finds both.
        if self.store.delivery_by_provider_id(provider_id) is not None:
            self.apply_early_callbacks(self.store.take_early_callbacks(None, [provider_id]))
            return "applied"
        log.info("%s status %s for a message not recorded yet: kept", provider, status)
        return "kept"

    def apply_early_callbacks(self, rows: list[dict]) -> int:
        """Apply callbacks taken from the early table (see ``Store.take_early_callbacks``)."""
        applied = 0
        for row in rows:
            d = self.store.delivery_by_provider_id(row["provider_id"])
            if d is not None:
                self._apply(d["id"], row["provider"], row["status"], row["code"])
                applied += 1
        return applied

    def sweep_early_callbacks(self) -> int:
        """Apply kept callbacks whose delivery is now known (if a worker stopped between its write and
        its look at the early table); for the scheduler's tick."""
        ids = self.store.matched_early_callbacks()
        return self.apply_early_callbacks(self.store.take_early_callbacks(None, ids)) if ids else 0

    def note(self, delivery_id: int, provider: str, status: str, code: str | None) -> None:
        """A provider's report, in the transaction's audit trail (delivered, undelivered, bounced...)."""
        self.store.events.note_delivery(delivery_id, self.store.clock(), status, provider, code)

    def _apply(self, delivery_id: int, provider: str, status: str, code: str | None) -> None:
        self.note(delivery_id, provider, status, code)
        if status == "delivered":
            self.delivered(delivery_id)
        else:
            self.failed(delivery_id, f"{provider} reported {status}" + (f" (error {code})" if code else ""),
                        code=code)


def _when(schedule: Schedule, tx: dict[str, Any], d: dict[str, Any], channel: str,
          now: datetime) -> tuple[datetime | None, str | None]:
    """When a fallback on ``channel`` for delivery ``d`` goes out: (at, None) now, (end, why) held for
    the customer's quiet hours, or (None, why) for a reminder quiet hours would hold until its deadline.
    A notice waits like the notice itself; a reminder follows ``slots``' rules, final warning included."""
    zone = tx["content"]["customer"].get("timezone") or "UTC"
    if d["kind"] == "reminder":
        return fallback_time(schedule, d["step"], channel, now, created_at=tx["created_at"],
                             deadline=tx["deadline"], zone=zone)
    return quiet_until(schedule, channel, now, zone) or (now, None)
