"""What happens after a send: delivered, or failed for good, and then fall back, suppress, or tell the
platform that no channel is left. Used by the actor and by the providers' status webhooks alike."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from .contacts import addresses, all_pairs, choose
from .ladder import Registry
from .masking import mask_text
from .store import CANCELLED, ESCALATED, PENDING, NewDelivery, Store

log = logging.getLogger("remind.outcomes")

#: Provider codes that mean "this customer does not want this channel".
OPT_OUT_CODES = {"21610": ("sms", "opted out of SMS (STOP)")}
ALIVE = ("queued", "sending", "sent", "delivered")


class Outcomes:
    def __init__(self, store: Store, registry: Callable[[], Registry], enqueue: Callable[[list[int]], None], *,
                 webhook: bool, lease: timedelta) -> None:
        self.store = store
        self.registry = registry
        self.enqueue = enqueue
        self.webhook = webhook
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
            customer = tx["content"]["customer"]
            now = self.store.clock()
            if code in OPT_OUT_CODES and OPT_OUT_CODES[code][0] == d["channel"]:
                for address in addresses(customer, d["channel"]):
                    self.store.suppress(conn, d["channel"], address, customer["id"], OPT_OUT_CODES[code][1])
            wanted = (PENDING,) if d["kind"] == "reminder" else (CANCELLED, ESCALATED)
            if d["kind"] == "webhook" or tx["status"] not in wanted:
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None, reason=reason)
                return None
            if d["kind"] == "reminder" and tx["deadline"] <= now:
                # Too late for any channel: the cancellation (and its webhook) is what comes next.
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None,
                                           reason=f"{reason}; no fallback: the deadline has passed")
                return None
            rows = self.store.step_deliveries(conn, tx["id"], d["step"])
            siblings = [s for s in rows if s["kind"] != "webhook"]
            told = any(s["kind"] == "webhook" for s in rows)
            suppressed = self.store.suppressed(conn, all_pairs(customer))
            suppressed |= {(d["channel"], a) for a in addresses(customer, d["channel"])}  # this one just failed
            schedule = self.registry().get(tx["schedule"])
            fallback = schedule.fallback_for(d["step"]) if schedule else ()
            choices = choose([d["channel"]], fallback, customer, suppressed, taken=[s["channel"] for s in siblings])
            substitute = next((c for c in choices if c.send), None)
            if substitute is not None:
                alt = substitute.channel
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None,
                                           reason=f"{reason}; falling back to {alt}")
                new_ids = self.store.add_deliveries(conn, [NewDelivery(
                    tx["id"], d["step"], d["kind"], alt, d["template"], d["due_at"], "queued",
                    f"fallback: {d['channel']} failed ({reason})", d["variant"])], now, self.lease)
            else:
                others_alive = any(s["status"] in ALIVE for s in siblings if s["id"] != delivery_id)
                note = "" if others_alive else "; no channel left for this step"
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None, reason=reason + note)
                if not others_alive and self.webhook and d["kind"] == "reminder" and not told:
                    new_ids = self.store.add_deliveries(conn, [NewDelivery(
                        tx["id"], d["step"], "webhook", "webhook", "reminder.failed", now, "queued",
                        None, d["variant"])], now, self.lease)
        if alt:
            log.info("%s %s: %s failed, falling back to %s", d["transaction_id"], d["step"], d["channel"], alt)
        if new_ids:
            self.enqueue(new_ids)
        return alt
