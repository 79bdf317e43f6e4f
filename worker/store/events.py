"""The events outbox and the audit trail: every statement that reads or writes ``events`` and ``audit``.

An event is written in the same database transaction as the change it reports, so an outcome never
exists without its event; sending it to the platform is a separate, retried step (``worker/events.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, update

from .tables import audit, deliveries, events

if TYPE_CHECKING:
    from .repo import Store

#: An event waits for (another) attempt, is being sent, reached the platform, was given up after the
#: retry window, or was not sent because no platform URL was set (a resend sends it once one is).
PENDING, SENDING, DELIVERED, FAILED, UNSENT = "pending", "sending", "delivered", "failed", "unsent"
#: Not sent because a newer event of the same transaction says where it stands now.
SUPERSEDED = "superseded"


#: Many events at once on PostgreSQL (``EventLog.add_many``): ``data`` as JSON text, as SQLAlchemy's JSON type
#: writes it.
_INSERT_UNNEST = """
    INSERT INTO events (transaction_id, type, data, created_at, attempts, status, next_attempt_at, give_up_at)
    SELECT e.transaction_id, e.type, CAST(e.data AS json), %(now)s, 0, %(status)s, %(next_attempt_at)s,
           %(give_up_at)s
    FROM unnest(CAST(%(transaction_id)b AS text[]), CAST(%(type)b AS text[]), CAST(%(data)b AS text[]))
         AS e(transaction_id, type, data)
    RETURNING id"""


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def event_data(tx: Mapping[str, Any], *, status: str, source: str | None, actor: str | None,
               reason: str | None, at: datetime, **extra: Any) -> dict[str, Any]:
    """The ``data`` of an event (the platform contract): fixed when the event is written, so every
    attempt and every read of the feed carries the same facts."""
    return {"id": tx["id"], "status": status, "source": source, "actor": actor, "reason": reason, "at": iso(at),
            "amount": tx["content"]["amount"], "currency": tx["currency"], "customer_id": tx["customer_id"],
            **extra}


def public_id(event_id: int) -> str:
    """The id the platform sees (``webhook-id`` and the feed's cursor)."""
    return f"evt_{event_id}"


def parse_id(text: str) -> int | None:
    """``evt_12`` (or ``12``) to 12; None for anything else."""
    digits = text.removeprefix("evt_")
    return int(digits) if digits.isdigit() and len(digits) <= 18 else None


@dataclass
class EventLog:
    """The ``events`` and ``audit`` tables of one store.

    ``deliver``: whether events are sent at all (a platform URL is set); ``retry_window``: how long after
    its first attempt (or a resend) an event is retried before it is recorded as failed."""

    store: Store
    deliver: bool = False
    retry_window: timedelta = timedelta(days=3)
    lease: timedelta = timedelta(minutes=5)

    # -- writing, inside the caller's database transaction ------------------------------------------

    def add(self, conn: Connection, tx: Mapping[str, Any], type_: str, data: dict[str, Any],
            now: datetime) -> int | None:
        """Write one event; returns its id when it should be sent now (enqueue it after the commit)."""
        ids = self.add_many(conn, [(tx["id"], type_, data)], now)
        return ids[0] if ids else None

    def add_many(self, conn: Connection, new: Sequence[tuple[str, str, dict[str, Any]]], now: datetime) -> list[int]:
        """Write events of (transaction id, type, data) in one statement (a deadline settles thousands in a
        tick); returns their ids in order when they should be sent now, else nothing."""
        if not new:
            return []
        if self.deliver:
            values = {"status": PENDING, "next_attempt_at": now + self.lease, "give_up_at": now + self.retry_window}
        else:
            values = {"status": UNSENT, "next_attempt_at": None, "give_up_at": None}
        if self.store.pg:  # one statement of three binary arrays, whatever the count
            ids = conn.exec_driver_sql(_INSERT_UNNEST, {
                "transaction_id": [tx_id for tx_id, _, _ in new], "type": [type_ for _, type_, _ in new],
                "data": [json.dumps(data) for _, _, data in new], "now": now, **values}).scalars().all()
        else:
            rows = [{"transaction_id": tx_id, "type": type_, "data": data, "created_at": now, "attempts": 0,
                     **values} for tx_id, type_, data in new]
            ids = conn.execute(insert(events).returning(events.c.id), rows).scalars().all()
        return list(ids) if self.deliver else []

    def note(self, conn: Connection, tx_id: str, at: datetime, action: str, source: str, *,
             actor: str | None = None, note: str | None = None) -> None:
        """One line of the audit trail."""
        self.note_many(conn, [{"transaction_id": tx_id, "at": at, "action": action, "source": source,
                               "actor": actor, "note": note}])

    def note_many(self, conn: Connection, lines: Sequence[Mapping[str, Any]]) -> None:
        """Lines of the audit trail (each with transaction_id, at, action, source, actor, note), in one statement."""
        if lines:
            conn.execute(insert(audit), list(lines))

    def note_delivery(self, delivery_id: int, at: datetime, status: str, provider: str, code: str | None) -> None:
        """A provider's report on one message (delivered, undelivered, bounced), in the audit trail."""
        with self.store.begin() as conn:
            row = conn.execute(select(deliveries.c.transaction_id, deliveries.c.step, deliveries.c.channel).where(
                deliveries.c.id == delivery_id)).first()
            if row is not None:
                self.note(conn, row.transaction_id, at, status, "provider", actor=provider,
                          note=f"{row.step} {row.channel}" + (f" (error {code})" if code else ""))

    def count(self, conn: Connection, tx_id: str, action: str) -> int:
        """How many audit lines of ``action`` a transaction has (its review contacts, say)."""
        return conn.execute(select(func.count()).select_from(audit).where(
            audit.c.transaction_id == tx_id, audit.c.action == action)).scalar_one()

    # -- sending --------------------------------------------------------------------------------------

    def claim(self, ids: Sequence[int], now: datetime) -> list[dict[str, Any]]:
        """Take pending events to send: each is leased (``next_attempt_at``) so a worker that dies with
        it leaves it to the tick. A duplicate message finds it ``sending`` and leaves it alone."""
        if not ids:
            return []
        with self.store.begin() as conn:
            rows = conn.execute(update(events).where(events.c.id.in_(list(ids)), events.c.status == PENDING).values(
                status=SENDING, attempts=events.c.attempts + 1, next_attempt_at=now + self.lease).returning(
                events.c.id, events.c.type, events.c.data, events.c.created_at, events.c.attempts,
                events.c.give_up_at)).mappings().all()
        return sorted((dict(r) for r in rows), key=lambda r: r["id"])

    def delivered(self, event_id: int, now: datetime) -> None:
        with self.store.begin() as conn:
            conn.execute(update(events).where(events.c.id == event_id, events.c.status == SENDING).values(
                status=DELIVERED, delivered_at=now, next_attempt_at=None, last_error=None, give_up_at=None))

    def superseded(self, event_ids: Sequence[int]) -> None:
        """Not sent: the transaction moved on before this event went out (an escalation that ops settled
        meanwhile); the newer event tells the platform. It stays in the feed, marked."""
        with self.store.begin() as conn:
            conn.execute(update(events).where(events.c.id.in_(list(event_ids)), events.c.status == SENDING).values(
                status=SUPERSEDED, next_attempt_at=None, give_up_at=None))

    def not_delivered(self, event_id: int, error: str, retry_at: datetime | None) -> None:
        """An attempt failed: try again at ``retry_at``, or (None) give up: the event stays in the feed as
        ``failed``, and a resend starts a new retry window."""
        values = {"status": PENDING, "next_attempt_at": retry_at} if retry_at else {
            "status": FAILED, "next_attempt_at": None, "give_up_at": None}
        with self.store.begin() as conn:
            conn.execute(update(events).where(events.c.id == event_id, events.c.status == SENDING).values(
                last_error=error[:500], **values))

    def due(self, conn: Connection, now: datetime, limit: int) -> list[int]:
        """For the tick: events whose time for an attempt came (a retry's backoff ended, or the message
        carrying it was lost, or the worker sending it died). Leased again, returned to enqueue."""
        stmt = (select(events.c.id).where(events.c.next_attempt_at <= now)
                .order_by(events.c.next_attempt_at).limit(limit))
        ids = [r.id for r in conn.execute(self.store._lock(stmt, skip_locked=True))]
        if ids:
            conn.execute(update(events).where(events.c.id.in_(ids)).values(
                status=PENDING, next_attempt_at=now + self.lease))
        return ids

    def expire(self, now: datetime, ids: Sequence[int] | None = None) -> int:
        """End the lease of pending events (``ids``, or all) whose message never reached the broker or was
        lost with it, so the next tick hands them to the workers. Returns how many. Without ``ids`` (Redis
        restarted empty) this cannot tell a lease from a backoff, so a retry waiting its turn comes early:
        one attempt sooner than planned, which the platform takes like any other."""
        stmt = update(events).where(events.c.status == PENDING, events.c.next_attempt_at > now).values(
            next_attempt_at=now)
        if ids is not None:
            stmt = stmt.where(events.c.id.in_(list(ids)))
        with self.store.begin() as conn:
            return conn.execute(stmt).rowcount

    def resend(self, ids: Sequence[int] | None, now: datetime, *, failed_only: bool = False) -> list[int]:
        """Send events again (``ids``, or every failed one): a fresh retry window from now. Returns the ids
        found; those are sent even if the platform had them (it deduplicates on ``webhook-id``)."""
        stmt = update(events).values(status=PENDING, next_attempt_at=now + self.lease,
                                     give_up_at=now + self.retry_window, last_error=None)
        if ids is not None:
            stmt = stmt.where(events.c.id.in_(list(ids)))
        if failed_only:
            stmt = stmt.where(events.c.status == FAILED)
        with self.store.begin() as conn:
            return sorted(r.id for r in conn.execute(stmt.returning(events.c.id)))

    # -- reading ---------------------------------------------------------------------------------------

    def feed(self, *, after: int = 0, limit: int = 100, failed_only: bool = False, since: datetime | None = None,
             until: datetime | None = None) -> list[dict[str, Any]]:
        """Events oldest first, after the id ``after``; ``until``: only those written before it."""
        stmt = select(events).where(events.c.id > after).order_by(events.c.id).limit(limit)
        if failed_only:
            stmt = stmt.where(events.c.status == FAILED)
        if since is not None:
            stmt = stmt.where(events.c.created_at >= since)
        if until is not None:
            stmt = stmt.where(events.c.created_at <= until)
        with self.store.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def get(self, event_id: int) -> dict[str, Any] | None:
        with self.store.engine.connect() as conn:
            row = conn.execute(select(events).where(events.c.id == event_id)).mappings().first()
        return dict(row) if row else None

    def of(self, tx_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A transaction's events and audit lines, oldest first."""
        with self.store.engine.connect() as conn:
            evts = conn.execute(select(events).where(events.c.transaction_id == tx_id).order_by(events.c.id))
            lines = conn.execute(select(audit).where(audit.c.transaction_id == tx_id).order_by(audit.c.id))
            return [dict(r) for r in evts.mappings()], [dict(r) for r in lines.mappings()]


def view(row: Mapping[str, Any]) -> dict[str, Any]:
    """An event as the feed, the CLI and the webhook body show it."""
    return {"id": public_id(row["id"]), "type": row["type"], "created_at": iso(row["created_at"]),
            "data": row["data"], "delivery": {
                "status": row["status"], "attempts": row["attempts"], "last_error": row["last_error"],
                "next_attempt_at": iso(row["next_attempt_at"]) if row["status"] == PENDING else None,
                "delivered_at": iso(row["delivered_at"])}}
