"""The tick: claim what is due from the store, decide with the ladder, insert the deliveries, enqueue them
in batches (``remind.deliver_batch`` messages of up to REMIND_DELIVERY_BATCH ids).

Runs in every scheduler process; the database claim is what keeps two of them from doing the
same work. Future steps are never parked in the broker: each lives as ``next_due_at`` in SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from .contacts import all_pairs, choose
from .ladder import Decision, Registry, Schedule, SlotCache, choose_variant, decide, quiet_until
from .store import CANCELLED, Cursor, NewDelivery, Store
from .store.events import event_data
from .store.rollup import roll_up

log = logging.getLogger("remind.scheduler")

#: When a transaction cannot be planned (a bug, or data the code does not expect), it is set aside
#: this long so the rest of the batch goes on.
RETRY_BROKEN = timedelta(minutes=5)


@dataclass
class TickResult:
    claimed: int = 0
    enqueued: list[int] = field(default_factory=list)
    skipped: int = 0
    settled: int = 0
    recovered: int = 0
    lost_in_send: int = 0
    events: int = 0  # events to the platform handed to the workers (new, or due for another attempt)
    released: int = 0  # deliveries held for quiet hours, enqueued now that the quiet period ended

    def __bool__(self) -> bool:
        return bool(self.claimed or self.enqueued or self.recovered or self.lost_in_send or self.released
                    or self.events)


def _rows(content: dict, tx_id: str, step: str, kind: str, template: str, channels: Sequence[str],
          fallback: Sequence[str], due_at: datetime, suppressed: set[tuple[str, str]], *, variant: str = "default",
          note: str | None = None, taken: Sequence[str] = ()) -> list[NewDelivery]:
    """One row per channel; an unusable channel is skipped and replaced by a usable fallback channel
    that the step does not use anyway (``taken``: its channels sent at another time)."""
    return [NewDelivery(tx_id, step, kind, c.channel, template, due_at, "queued" if c.send else "skipped",
                        c.reason if c.reason or not note else note, variant)
            for c in choose(channels, fallback, content["customer"], suppressed, taken)]


def plan_transaction(row: dict, schedule: Schedule, now: datetime, *, suppressed: set[tuple[str, str]] = frozenset(),
                     cache: SlotCache | None = None) -> tuple[Decision, Cursor, list[NewDelivery]]:
    """The rows one claimed transaction produces now; pure apart from reading ``row`` (and filling
    ``cache``, which gives the same decision as planning the transaction alone)."""
    content = row["content"]
    zone = content["customer"].get("timezone") or "UTC"
    d = (cache.decide if cache is not None else decide)(
        schedule, created_at=row["created_at"], deadline=row["deadline"], handled_until=row["handled_until"],
        now=now, zone=zone)
    tx_id = row["id"]
    rows: list[NewDelivery] = []
    for slot in d.skip:
        variant, template = choose_variant(slot.step, tx_id)
        rows += [NewDelivery(tx_id, slot.step.id, "reminder", channel, template, slot.at, "skipped", d.skip_reason,
                             variant) for channel in slot.channels]
    for slot in d.send:
        variant, template = choose_variant(slot.step, tx_id)
        rows += _rows(content, tx_id, slot.step.id, "reminder", template, slot.channels,
                      schedule.fallback_for(slot.step.id), slot.at, suppressed, variant=variant, note=slot.note,
                      taken=slot.step.channels)
    settle_status = settle_reason = None
    if d.settle:
        final = schedule.final
        settle_status, settle_reason = final.status, final.reason
        rows += [hold_for_quiet_hours(r, schedule, now, zone) for r in _rows(
            content, tx_id, final.action, "notice", final.template, final.channels,
            schedule.fallback_for(final.action), row["deadline"], suppressed)]
    cursor = Cursor(tx_id, d.handled_until, d.next_due_at, settle_status, settle_reason, schedule.version)
    return d, cursor, rows


def hold_for_quiet_hours(row: NewDelivery, schedule: Schedule, now: datetime, zone: str) -> NewDelivery:
    """A notice that would go out now, inside the customer's quiet hours, waits for their end (the
    status has changed already; only the message waits)."""
    held = quiet_until(schedule, row.channel, now, zone) if row.status == "queued" else None
    if held is None:
        return row
    at, note = held
    return replace(row, due_at=at, reason=f"{row.reason}; {note}" if row.reason else note, held=True)


#: One claimed transaction and what the tick decided for it: (row, decision, cursor, new deliveries).
_Planned = tuple[dict, Decision, Cursor, list[NewDelivery]]


def _set_aside(row: dict, now: datetime) -> Cursor:
    """The cursor of a transaction that cannot be planned or written: as it was, due again later."""
    return Cursor(row["id"], row["handled_until"], now + RETRY_BROKEN, None, None, row["schedule_version"])


class Scheduler:
    """Claims due work in batches; ``enqueue`` hands delivery ids to the broker after each commit."""

    def __init__(self, store: Store, registry: Callable[[], Registry], enqueue: Callable[[list[int]], None], *,
                 batch_size: int = 1000, lease: timedelta = timedelta(minutes=5),
                 enqueue_events: Callable[[list[int]], None] = lambda ids: None) -> None:
        self.store = store
        self.registry = registry
        self.enqueue = enqueue
        self.enqueue_events = enqueue_events
        self.batch_size = batch_size
        self.lease = lease
        self.slots = SlotCache()  # shared by the transactions of a tick, and by the ticks after it

    def _schedule_for(self, row: dict, registry: Registry | None = None) -> Schedule:
        registry = registry if registry is not None else self.registry()
        schedule = registry.get(row["schedule"])
        if schedule is None:  # its file was removed: run on whatever matches now
            schedule = registry.choose(segment=row["segment"], risk_flag=row["risk_flag"],
                                       amount=row["amount"], currency=row["currency"])
        return schedule

    def _settled(self, conn: Any, planned: list[_Planned], now: datetime) -> list[int]:
        """The audit line and the platform's event of each transaction the deadline settled; returns the
        events to send."""
        settled = [(row, cursor) for row, _, cursor, _ in planned if cursor.settle_status]
        self.store.events.note_many(conn, [
            {"transaction_id": row["id"], "at": now, "action": cursor.settle_status, "source": "deadline",
             "actor": None, "note": None} for row, cursor in settled])
        return self.store.events.add_many(conn, [
            (row["id"], f"transaction.{cursor.settle_status}", event_data(
                row, status=cursor.settle_status, source="deadline", actor=None, reason=cursor.settle_reason, at=now))
            for row, cursor in settled], now)

    def _write(self, conn: Any, planned: list[_Planned], broken: list[Cursor], now: datetime) -> tuple[
            list[int], list[int], list[_Planned]]:
        """Write a batch's cursors, deliveries and events; return the queued delivery ids, the event ids
        and the transactions written.

        One statement each for the whole batch, inside a savepoint. When the store refuses the batch (a
        value PostgreSQL cannot hold, a bug), each transaction is written again under its own savepoint,
        and the one that still fails is set aside like one that cannot be planned: one bad row never
        stops the tick for the others."""
        try:
            with conn.begin_nested():
                self.store.advance(conn, [p[2] for p in planned] + broken, now)
                ids = self.store.add_deliveries(conn, [d for p in planned for d in p[3]], now, self.lease)
                events = self._settled(conn, planned, now)
            return ids, events, planned
        except Exception as exc:
            if getattr(exc, "connection_invalidated", False):
                raise  # the database is gone, not one row: nothing to set aside
            log.exception("a batch of %d transactions cannot be written; writing each on its own", len(planned))
        ids, events, written, aside = [], [], [], list(broken)
        for p in planned:
            row, _, cursor, new = p
            try:
                with conn.begin_nested():
                    self.store.advance(conn, [cursor], now)
                    queued = self.store.add_deliveries(conn, new, now, self.lease)
                    events += self._settled(conn, [p], now)
            except Exception as exc:
                if getattr(exc, "connection_invalidated", False):
                    raise
                log.exception("%s: cannot be written; looking again in %s", row["id"], RETRY_BROKEN)
                aside.append(_set_aside(row, now))
                continue
            ids += queued
            written.append(p)
        self.store.advance(conn, aside, now)  # values the rows hold already, so these always fit
        return ids, events, written

    def _roll_up(self) -> None:
        """A small step of the funnel's roll-up after the due work (worker/store/rollup.py); it never stops
        the tick: until it is done, the funnel computes those transactions live."""
        try:
            roll_up(self.store)
        except Exception:  # noqa: BLE001
            log.exception("funnel roll-up step failed; the next tick tries again")

    def tick(self, now: datetime | None = None) -> TickResult:
        """Claim and enqueue everything due at ``now``, batch by batch, until nothing is left."""
        result = TickResult()
        while True:
            now_ = now or self.store.clock()
            with self.store.begin() as conn:
                claimed = self.store.claim_due(conn, now_, self.batch_size)
                suppressed = self.store.suppressed(conn, [p for row in claimed
                                                          for p in all_pairs(row["content"]["customer"])])
                planned: list[_Planned] = []
                broken: list[Cursor] = []
                registry = self.registry()
                for row in claimed:
                    try:
                        planned.append((row, *plan_transaction(row, self._schedule_for(row, registry), now_,
                                                               suppressed=suppressed, cache=self.slots)))
                    except Exception:  # one bad transaction must not stall everyone's reminders
                        log.exception("%s: cannot plan; looking again in %s", row["id"], RETRY_BROKEN)
                        broken.append(_set_aside(row, now_))
                ids, events, written = self._write(conn, planned, broken, now_)
                for row, decision, cursor, new in written:
                    result.skipped += sum(1 for r in new if r.status == "skipped")
                    if decision.settle:
                        result.settled += 1
                        log.info("%s %s: deadline reached", row["id"],
                                 "cancelling" if cursor.settle_status == CANCELLED else "escalating")
                again, lost, released = self.store.claim_expired(conn, now_, self.batch_size, self.lease)
                due = self.store.events.due(conn, now_, self.batch_size)
                events += due
            result.claimed += len(claimed)
            result.recovered += len(again)
            result.lost_in_send += len(lost)
            result.released += len(released)
            batch = ids + again + released
            if released:
                log.info("released %d deliveries held for quiet hours", len(released))
            if again:
                log.warning("re-enqueued %d deliveries whose messages never completed", len(again))
            if lost:
                log.warning("%d deliveries were interrupted mid-send and recorded as failed", len(lost))
            if batch:
                self.enqueue(batch)
                result.enqueued += batch
            if events:
                self.enqueue_events(events)
                result.events += len(events)
            if (len(claimed) < self.batch_size and len(again) + len(lost) + len(released) < self.batch_size
                    and len(due) < self.batch_size):
                self._roll_up()
                return result
