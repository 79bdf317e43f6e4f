"""Every read and write of the SQL store. The only module that builds SQL; knows no actor or sender.

Concurrency rules, in one place:
- claims use ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two schedulers take disjoint rows;
  on SQLite every transaction is ``BEGIN IMMEDIATE`` (see db.py): writers take turns.
- a status change (confirm, cancel, escalate) happens under the transaction row's lock, and the
  time it records is read after that lock is held, so timestamps follow the real order;
- where both are locked, the transaction row is locked before the delivery row (the worker's
  one-statement claim share-locks the transaction in its EXISTS, then updates the delivery), so
  two of them never wait on each other in a cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, case, func, insert, or_, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError

from .db import is_postgres
from .events import EventLog, event_data
from .rollup import forget as forget_rolled
from .rollup import forget_phones as forget_rolled_phones
from .tables import DELIVERY_STATISTICS, SETTLED_AT, deliveries, early_callbacks, suppressions, transactions

PENDING, CONFIRMED, CANCELLED, ESCALATED = "pending", "confirmed", "cancelled", "escalated"
SETTLED = (CONFIRMED, CANCELLED, ESCALATED)
#: A delivery's status, with ``held`` for a queued one waiting out quiet hours (never enqueued yet).
HELD_STATE = case((and_(deliveries.c.status == "queued", deliveries.c.enqueued_at.is_(None)), "held"),
                  else_=deliveries.c.status)


@dataclass(frozen=True)
class NewTransaction:
    id: str
    content: dict[str, Any]
    customer_id: str
    segment: str | None
    risk_flag: bool
    amount: Decimal
    currency: str
    schedule: str
    schedule_version: str
    created_at: datetime
    expires_at: datetime | None
    deadline: datetime
    next_due_at: datetime


@dataclass(frozen=True)
class NewDelivery:
    transaction_id: str
    step: str
    kind: str  # reminder | notice | webhook
    channel: str
    template: str | None
    due_at: datetime
    status: str  # queued | skipped
    reason: str | None = None
    variant: str = "default"
    #: Queued but held (quiet hours): not enqueued now; its lease runs out at ``due_at`` and the tick's
    #: lease recovery releases it then. Until released (``enqueued_at`` NULL) no worker sends it.
    held: bool = False


@dataclass(frozen=True)
class Erasure:
    """What erasing one customer's personal data did."""

    transactions: int  # the customer's transactions: none of them holds personal data now
    erased: list[str]  # ids erased by this call (the others were erased before)
    cancelled: list[str]  # ids that were pending: cancelled by this call
    events: list[int] = field(default_factory=list)  # their transaction.cancelled events, to send


#: Erases one transaction's personal data: content -> (content without it, [(value removed, its mask)]).
Scrub = Callable[[dict[str, Any]], tuple[dict[str, Any], list[tuple[str, str]]]]


@dataclass(frozen=True)
class Cursor:
    """Where the scheduler leaves a transaction after a tick."""

    id: str
    handled_until: datetime | None
    next_due_at: datetime | None
    settle_status: str | None = None  # cancelled | escalated
    settle_reason: str | None = None
    schedule_version: str | None = None  # the ladder version this tick followed


#: PostgreSQL bulk statements of the tick. Each has one fixed text whatever the batch size, so the server
#: plans it once per connection (SQLAlchemy's multi-row VALUES would send, and psycopg re-parse, a new text
#: of thousands of parameters per batch), and takes each column as one array in binary (``%(name)b``):
#: psycopg's text form of an array runs a regular expression over every element, which cost the tick
#: more than the statements themselves. They go to the driver as written (``exec_driver_sql``).
_UNNEST_COLUMNS = ("transaction_id", "step", "kind", "channel", "template", "variant", "due_at", "status", "reason",
                   "held")
_INSERT_UNNEST = """
    INSERT INTO deliveries (transaction_id, step, kind, channel, template, variant, due_at, status, reason,
                            attempts, updated_at, lease_until, enqueued_at)
    SELECT t.transaction_id, t.step, t.kind, t.channel, t.template, t.variant, t.due_at, t.status, t.reason,
           0, %(now)s,
           CASE WHEN t.status = 'queued' AND t.held THEN t.due_at
                WHEN t.status = 'queued' THEN CAST(%(lease_until)s AS timestamptz) END,
           CASE WHEN t.status = 'queued' AND NOT t.held THEN CAST(%(now)s AS timestamptz) END
    FROM unnest(CAST(%(transaction_id)b AS text[]), CAST(%(step)b AS text[]), CAST(%(kind)b AS text[]),
                CAST(%(channel)b AS text[]), CAST(%(template)b AS text[]), CAST(%(variant)b AS text[]),
                CAST(%(due_at)b AS timestamptz[]), CAST(%(status)b AS text[]), CAST(%(reason)b AS text[]),
                CAST(%(held)b AS boolean[]))
         AS t(transaction_id, step, kind, channel, template, variant, due_at, status, reason, held)
    ON CONFLICT (transaction_id, step, channel) DO NOTHING
    RETURNING id, enqueued_at IS NOT NULL"""
_ADVANCE_UNNEST = """
    UPDATE transactions AS tx
    SET handled_until = c.handled, next_due_at = c.next, schedule_version = c.version
    FROM unnest(CAST(%(ids)b AS text[]), CAST(%(handled)b AS timestamptz[]), CAST(%(next)b AS timestamptz[]),
                CAST(%(versions)b AS text[])) AS c(id, handled, next, version)
    WHERE tx.id = c.id"""
#: The claim, every column as ``select(transactions)`` reads it, fetched in one go (no per-row type hooks).
_TX_COLUMNS = tuple(c.name for c in transactions.c)
_TX_TIMES = tuple(i for i, c in enumerate(transactions.c)  # UTCDateTime: aware, in UTC
                  if getattr(c.type, "impl_instance", c.type).python_type is datetime)
_CLAIM_DUE = (f"SELECT {', '.join(_TX_COLUMNS)} FROM transactions "
              "WHERE next_due_at <= %(now)s AND status = 'pending' "
              "ORDER BY next_due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED")


#: ``claim_delivery`` for many ids (PostgreSQL): the same conditions, the same share lock on each
#: delivery's transaction, one fixed statement text.
_CLAIM_MANY = text("""
    UPDATE deliveries AS d
    SET status = 'sending', started_at = :now, attempts = d.attempts + 1, lease_until = :lease_until,
        updated_at = :now
    WHERE d.id = ANY(CAST(:ids AS bigint[])) AND d.status = 'queued'
      AND (CAST(:any_status AS boolean) OR EXISTS (
          SELECT 1 FROM transactions AS t
          WHERE t.id = d.transaction_id AND t.status = ANY(CAST(:statuses AS text[]))
          FOR SHARE OF t))
    RETURNING d.id, d.attempts""")


#: Which (channel, address hash) pairs are suppressed: one probe of the primary key (channel,
#: address_hash) per pair asked, however large the table or the batch (tests/test_scale.py checks the plan;
#: bench/scale.py prints it at 300,000 rows). ``address_hash = ANY(...)`` alone could not use the key, whose
#: first column is the channel: a sequential scan. A plain join of the pairs could still be planned as a
#: hash join over the whole table for a tick's few thousand addresses; a LATERAL subquery with LIMIT is
#: always a nested loop of index probes (the key is unique, so LIMIT 1 changes no answer). The arrays go in
#: binary, as the tick's bulk statements' do (the text form costs a regular expression per element).
_SUPPRESSED = """
    SELECT k.channel, k.address_hash
    FROM unnest(CAST(%(channels)b AS text[]), CAST(%(hashes)b AS text[])) AS k(channel, address_hash)
    CROSS JOIN LATERAL (SELECT 1 FROM suppressions AS s
                        WHERE s.channel = k.channel AND s.address_hash = k.address_hash LIMIT 1) AS hit"""


class Store:
    def __init__(self, engine: Engine, *, clock=None) -> None:
        self.engine = engine
        self.pg = is_postgres(engine)
        from datetime import UTC

        self.clock = clock or (lambda: datetime.now(UTC))
        self._updates: dict[tuple[tuple[str, ...], str | None], Any] = {}
        self._claim_statements()
        self.events = EventLog(self)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Connection | None]:
        """A connection on which every statement is durable at once (PostgreSQL), for recording one
        send after another without a transaction each; None on SQLite, where each write takes its own
        ``BEGIN IMMEDIATE`` (pass it on, and the store opens one per call)."""
        if not self.pg:
            yield None
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn

    def _lock(self, stmt, *, skip_locked: bool = False, share: bool = False):
        if not self.pg:
            return stmt  # SQLite: BEGIN IMMEDIATE already serialises writers
        return stmt.with_for_update(skip_locked=skip_locked, read=share)

    # -- ingest -----------------------------------------------------------------------------

    def insert_transaction(self, tx: NewTransaction) -> dict[str, Any] | None:
        """Insert; return None when created, or the stored row when the id exists already."""
        now = self.clock()
        try:
            with self.begin() as conn:
                conn.execute(insert(transactions).values(
                    id=tx.id, status=PENDING, content=tx.content, customer_id=tx.customer_id,
                    segment=tx.segment, risk_flag=tx.risk_flag, amount=tx.amount, currency=tx.currency,
                    schedule=tx.schedule, schedule_version=tx.schedule_version, created_at=tx.created_at,
                    expires_at=tx.expires_at, deadline=tx.deadline, registered_at=now,
                    handled_until=None, next_due_at=tx.next_due_at,
                ))
            return None
        except IntegrityError:
            existing = self.get_transaction(tx.id)
            if existing is None:
                raise
            return existing

    def get_transaction(self, tx_id: str, conn: Connection | None = None) -> dict[str, Any] | None:
        stmt = select(transactions).where(transactions.c.id == tx_id)
        if conn is not None:
            row = conn.execute(stmt).mappings().first()
        else:
            with self.engine.connect() as c:
                row = c.execute(stmt).mappings().first()
        return dict(row) if row else None

    # -- status changes ---------------------------------------------------------------------

    def settle(self, conn: Connection, tx_id: str, status: str, reason: str | None, *,
               allowed: Callable[[Mapping[str, Any]], bool], source: str, actor: str | None = None) -> tuple[
            str | None, dict[str, Any] | None]:
        """Move a transaction to ``status`` if ``allowed(row)``, under its row lock, recording who did it
        (``source``: customer, platform, ops, deadline; ``actor``: the operator's name).

        Returns (previous status, row after); previous is None when no such transaction exists."""
        row = conn.execute(self._lock(select(transactions).where(transactions.c.id == tx_id))).mappings().first()
        if row is None:
            return None, None
        previous = row["status"]
        if previous != status and allowed(row):
            now = self.clock()  # read after the lock: orders after any send that held it
            stamp = {CONFIRMED: "confirmed_at", CANCELLED: "cancelled_at", ESCALATED: "escalated_at"}[status]
            conn.execute(update(transactions).where(transactions.c.id == tx_id).values(
                status=status, next_due_at=None, status_reason=reason, settled_source=source, settled_actor=actor,
                **{stamp: now}))
            if previous != PENDING:  # a settled transaction's funnel units change with it (an ops decision)
                forget_rolled(conn, [tx_id])
        after = conn.execute(select(transactions).where(transactions.c.id == tx_id)).mappings().first()
        return previous, dict(after)

    def funnel_changed(self, conn: Connection, tx_id: str) -> None:
        """A sent reminder of this transaction is failed now: its rolled-up funnel units no longer hold
        (worker/store/rollup.py). Call under the transaction's row lock."""
        forget_rolled(conn, [tx_id])

    def set_review_state(self, conn: Connection, tx_id: str, state: str) -> None:
        conn.execute(update(transactions).where(transactions.c.id == tx_id).values(review_state=state))

    def escalated(self, *, limit: int = 100, after: datetime | None = None) -> list[dict[str, Any]]:
        """Transactions waiting for a risk review, oldest escalation first."""
        t = transactions.c
        stmt = select(transactions).where(t.status == ESCALATED).order_by(t.escalated_at, t.id).limit(limit)
        if after is not None:
            stmt = stmt.where(t.escalated_at > after)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    # -- scheduler --------------------------------------------------------------------------

    def claim_due(self, conn: Connection, now: datetime, limit: int) -> list[dict[str, Any]]:
        """Lock up to ``limit`` pending transactions whose next step is due; cost follows the due rows."""
        if self.pg:
            rows = []
            for values in conn.exec_driver_sql(_CLAIM_DUE, {"now": now, "limit": limit}).all():
                values = list(values)
                for i in _TX_TIMES:  # as UTCDateTime reads them: aware, in UTC
                    if values[i] is not None:
                        values[i] = values[i].astimezone(UTC)
                rows.append(dict(zip(_TX_COLUMNS, values, strict=True)))
            return rows
        stmt = (select(transactions)
                .where(transactions.c.next_due_at <= now, transactions.c.status == PENDING)
                .order_by(transactions.c.next_due_at)
                .limit(limit))
        return [dict(r) for r in conn.execute(self._lock(stmt, skip_locked=True)).mappings()]

    def advance(self, conn: Connection, cursors: Iterable[Cursor], now: datetime) -> None:
        """Write each claimed transaction's new cursor, settling the ones whose deadline passed."""
        plain, settling = [], []
        for c in cursors:
            (settling if c.settle_status else plain).append(c)
        if plain and self.pg:
            conn.exec_driver_sql(_ADVANCE_UNNEST, {
                "ids": [c.id for c in plain], "handled": [c.handled_until for c in plain],
                "next": [c.next_due_at for c in plain], "versions": [c.schedule_version for c in plain]})
        elif plain:
            conn.execute(
                update(transactions).where(transactions.c.id == bindparam("b_id")).values(
                    handled_until=bindparam("b_handled"), next_due_at=bindparam("b_next"),
                    schedule_version=bindparam("b_ver")),
                [{"b_id": c.id, "b_handled": c.handled_until, "b_next": c.next_due_at,
                  "b_ver": c.schedule_version} for c in plain],
            )
        for stamp in ("cancelled_at", "escalated_at"):  # one statement each for the whole batch
            rows = [{"b_id": c.id, "b_status": c.settle_status, "b_reason": c.settle_reason,
                     "b_handled": c.handled_until, "b_ver": c.schedule_version, "b_now": now}
                    for c in settling if (c.settle_status == CANCELLED) == (stamp == "cancelled_at")]
            if rows:
                conn.execute(self._settle[stamp], rows)

    def reschedule(self, schedules: Sequence[str], now: datetime) -> int:
        """Make the next tick look again at pending transactions on these schedules (after an edit)."""
        with self.begin() as conn:
            result = conn.execute(update(transactions).where(
                transactions.c.schedule.in_(list(schedules)), transactions.c.status == PENDING,
                transactions.c.next_due_at > now).values(next_due_at=now))
            return result.rowcount or 0

    def add_deliveries(self, conn: Connection, rows: Sequence[NewDelivery], now: datetime,
                       lease: timedelta) -> list[int]:
        """Insert deliveries; return the ids of the queued ones to enqueue after commit (not the held
        ones: their lease runs out at their ``due_at``, and ``claim_expired`` releases them then)."""
        if not rows:
            return []
        # A notice for a settled transaction (a review contact, a notice's fallback) changes what its customer
        # is billed: its rolled-up figures no longer hold (worker/store/rollup.py). Callers hold its row lock.
        forget_rolled(conn, sorted({d.transaction_id for d in rows if d.kind == "notice"}))
        # A row that exists already (a fallback took that channel earlier, a re-run) is kept as it is:
        # the unique key decides, and one such row must not abort the whole batch.
        if self.pg:  # one statement with a fixed text of 10 array parameters, whatever the batch size
            columns = zip(*((d.transaction_id, d.step, d.kind, d.channel, d.template, d.variant, d.due_at, d.status,
                             d.reason, d.held) for d in rows), strict=True)
            params: dict[str, Any] = {name: list(values) for name, values in zip(_UNNEST_COLUMNS, columns, strict=True)}
            params.update(now=now, lease_until=now + lease)
            return [delivery_id for delivery_id, enqueued in conn.exec_driver_sql(_INSERT_UNNEST, params).all()
                    if enqueued]
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        values = [{
            "transaction_id": d.transaction_id, "step": d.step, "kind": d.kind, "channel": d.channel,
            "template": d.template, "variant": d.variant, "due_at": d.due_at, "status": d.status,
            "reason": d.reason, "attempts": 0, "updated_at": now,
            "lease_until": (d.due_at if d.held else now + lease) if d.status == "queued" else None,
            "enqueued_at": now if d.status == "queued" and not d.held else None,
        } for d in rows]
        stmt = sqlite_insert(deliveries).on_conflict_do_nothing(index_elements=["transaction_id", "step", "channel"])
        result = conn.execute(stmt.returning(deliveries.c.id, deliveries.c.status, deliveries.c.enqueued_at), values)
        return [r.id for r in result if r.status == "queued" and r.enqueued_at is not None]

    def claim_expired(self, conn: Connection, now: datetime, limit: int, lease: timedelta) -> tuple[
            list[int], list[int], list[int]]:
        """Deliveries whose lease ran out: queued ones are re-enqueued (the broker lost the message);
        ones caught mid-send are failed, not resent, since the provider may already have them (except
        webhooks to the platform, which are at-least-once and deduplicated by webhook-id). Held ones
        (quiet hours; never enqueued) are released: their lease is their ``due_at``.

        Returns (ids to enqueue again, ids failed, held ids released: to enqueue)."""
        stmt = (select(deliveries.c.id, deliveries.c.status, deliveries.c.kind, deliveries.c.enqueued_at)
                .where(deliveries.c.lease_until <= now)
                .order_by(deliveries.c.lease_until).limit(limit))
        rows = conn.execute(self._lock(stmt, skip_locked=True)).all()
        released = [r.id for r in rows if r.status == "queued" and r.enqueued_at is None]
        # Webhooks are at-least-once: the platform deduplicates on webhook-id, so resend those.
        again = [r.id for r in rows if (r.status == "queued" and r.enqueued_at is not None)
                 or (r.status == "sending" and r.kind == "webhook")]
        lost = [r.id for r in rows if r.status == "sending" and r.kind != "webhook"]
        stale = [r.id for r in rows if r.status not in ("queued", "sending")]
        if again or released:
            conn.execute(update(deliveries).where(deliveries.c.id.in_(again + released)).values(
                status="queued", lease_until=now + lease, enqueued_at=now, updated_at=now))
        if lost:
            conn.execute(update(deliveries).where(deliveries.c.id.in_(lost)).values(
                status="failed", lease_until=None, updated_at=now,
                reason="outcome unknown: the worker stopped during the send; not resent, to avoid a duplicate"))
        if stale:
            conn.execute(update(deliveries).where(deliveries.c.id.in_(stale)).values(lease_until=None))
        return again, lost, released

    def expire_leases(self, now: datetime, ids: Sequence[int] | None = None) -> int:
        """End the lease of queued deliveries now (``ids``, or every queued one), so the next tick's
        ``claim_expired`` enqueues them again: their broker messages never got there (Redis was down) or
        were lost with it (a restart without persistence). A duplicate message is harmless (the claim);
        waiting out a lease is not. Returns how many."""
        stmt = (update(deliveries).where(deliveries.c.status == "queued", deliveries.c.lease_until > now)
                .values(lease_until=now, updated_at=now))
        if ids is not None:
            if not ids:
                return 0
            stmt = stmt.where(deliveries.c.id.in_(list(ids)))
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount

    # -- delivery ---------------------------------------------------------------------------

    def queued_deliveries(self, conn: Connection, ids: Sequence[int]) -> tuple[
            list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """The deliveries of ``ids`` still queued, and their transactions by id: a plain read, to decide
        and render; ``claim_delivery`` is what makes one delivery this worker's, right before its send.
        A held delivery (quiet hours) not yet released by the tick is left out, untouched: a stray
        message for it sends nothing early, and its lease still releases it on time."""
        found = conn.execute(select(deliveries).where(
            deliveries.c.id.in_(sorted(set(ids))), deliveries.c.status == "queued",
            deliveries.c.enqueued_at.is_not(None)).order_by(deliveries.c.id))
        rows = [dict(r) for r in found.mappings()]
        if not rows:
            return [], {}
        tx_ids = sorted({r["transaction_id"] for r in rows})
        txs = conn.execute(select(transactions).where(transactions.c.id.in_(tx_ids)))
        return rows, {t["id"]: dict(t) for t in txs.mappings()}

    def claim_delivery(self, conn: Connection | None, delivery_id: int, tx_statuses: Sequence[str] | None,
                       now: datetime, lease_until: datetime) -> int | None:
        """queued -> sending, in one statement, only while the transaction is in ``tx_statuses`` (None:
        whatever its status). The transaction row is share-locked for that statement, so a confirmation
        commits either before (and this returns None) or after, with a later timestamp. Returns the
        attempt number, or None when the delivery was not claimed (a duplicate, or the status moved on)."""
        if conn is None:
            with self.begin() as c:
                return self.claim_delivery(c, delivery_id, tx_statuses, now, lease_until)
        if tx_statuses is None:
            return conn.execute(self._claim_any, {"b_id": delivery_id, "b_now": now, "b_lease": lease_until}).scalar()
        return conn.execute(self._claim_if, {"b_id": delivery_id, "b_now": now, "b_lease": lease_until,
                                             "b_statuses": list(tx_statuses)}).scalar()

    def claim_deliveries(self, conn: Connection | None, claims: Sequence[tuple[int, Sequence[str] | None]],
                         now: datetime, lease_until: datetime) -> dict[int, int]:
        """Many ``claim_delivery`` calls at once: {delivery id: attempt number} of those claimed. On
        PostgreSQL one statement per set of statuses, each row decided exactly as alone (the send pool
        gathers the claims its threads make at the same moment, a round trip for many)."""
        groups: dict[tuple[str, ...] | None, list[int]] = {}
        for delivery_id, statuses in claims:
            groups.setdefault(tuple(statuses) if statuses is not None else None, []).append(delivery_id)
        if conn is None or not self.pg:
            return {i: n for statuses, ids in groups.items() for i in ids
                    if (n := self.claim_delivery(conn, i, statuses, now, lease_until)) is not None}
        claimed: dict[int, int] = {}
        for statuses, ids in groups.items():
            rows = conn.execute(_CLAIM_MANY, {"ids": sorted(set(ids)), "any_status": statuses is None,
                                              "statuses": list(statuses or ()), "now": now,
                                              "lease_until": lease_until})
            claimed.update({row.id: row.attempts for row in rows})
        return claimed

    def _claim_statements(self) -> None:
        """Built once: building a Core statement per call cost more CPU than executing it."""
        claim = (update(deliveries).where(deliveries.c.id == bindparam("b_id"), deliveries.c.status == "queued")
                 .values(status="sending", started_at=bindparam("b_now"), attempts=deliveries.c.attempts + 1,
                         lease_until=bindparam("b_lease"), updated_at=bindparam("b_now"))
                 .returning(deliveries.c.attempts))
        still = select(transactions.c.id).where(transactions.c.id == deliveries.c.transaction_id,
                                                transactions.c.status.in_(bindparam("b_statuses", expanding=True)))
        self._claim_any = claim
        self._claim_if = claim.where(self._lock(still, share=True).exists())
        # the deadline's settlement of a batch's transactions (advance), by which stamp it sets
        self._settle = {stamp: update(transactions).where(
            transactions.c.id == bindparam("b_id"), transactions.c.status == PENDING).values(
            status=bindparam("b_status"), status_reason=bindparam("b_reason"), handled_until=bindparam("b_handled"),
            settled_source="deadline", settled_actor=None, next_due_at=None, schedule_version=bindparam("b_ver"),
            **{stamp: bindparam("b_now")}) for stamp in ("cancelled_at", "escalated_at")}

    def update_deliveries(self, conn: Connection | None, changes: Sequence[Mapping[str, Any]], *,
                          if_status: str | None = None) -> None:
        """Apply many per-row changes (each a mapping with ``id``) in one statement per shape of change;
        ``if_status``: only to rows still in that status."""
        if not changes:
            return None
        if conn is None:
            with self.begin() as c:
                return self.update_deliveries(c, changes, if_status=if_status)
        now = self.clock()
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for change in changes:
            row = {"updated_at": now, **change}
            shapes.setdefault(tuple(sorted(row)), []).append(row)
        for keys, rows in shapes.items():
            stmt = self._updates.get((keys, if_status))
            if stmt is None:  # one statement per shape of change, built once
                stmt = update(deliveries).where(deliveries.c.id == bindparam("b_id")).values(
                    {k: bindparam(f"b_{k}") for k in keys if k != "id"})
                if if_status is not None:
                    stmt = stmt.where(deliveries.c.status == if_status)
                self._updates[(keys, if_status)] = stmt
            conn.execute(stmt, [{f"b_{k}": r[k] for k in keys} for r in rows])
        return None

    def update_delivery(self, conn: Connection | None, delivery_id: int, **values: Any) -> None:
        self.update_deliveries(conn, [{"id": delivery_id, **values}])

    def get_delivery(self, conn: Connection, delivery_id: int, *, lock: bool = False) -> dict[str, Any] | None:
        """A delivery row; ``lock`` takes its row lock (after the transaction's, as everywhere)."""
        stmt = select(deliveries).where(deliveries.c.id == delivery_id)
        row = conn.execute(self._lock(stmt) if lock else stmt).mappings().first()
        return dict(row) if row else None

    def delivery_by_provider_id(self, provider_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(deliveries).where(deliveries.c.provider_id == provider_id)).mappings().first()
        return dict(row) if row else None

    def lock_transaction(self, conn: Connection, tx_id: str) -> dict[str, Any] | None:
        """Serialises every decision about one transaction (fallback, settle, confirm)."""
        row = conn.execute(self._lock(select(transactions).where(transactions.c.id == tx_id))).mappings().first()
        return dict(row) if row else None

    def step_deliveries(self, conn: Connection, tx_id: str, step: str) -> list[dict[str, Any]]:
        rows = conn.execute(select(deliveries).where(deliveries.c.transaction_id == tx_id,
                                                     deliveries.c.step == step)).mappings()
        return [dict(r) for r in rows]

    # -- suppressions -------------------------------------------------------------------------

    @staticmethod
    def address_hash(channel: str, address: str) -> str:
        return hashlib.sha256(f"{channel}:{address.strip().lower()}".encode()).hexdigest()

    def suppress(self, conn: Connection | None, channel: str, address: str, customer_id: str | None,
                 reason: str) -> bool:
        """Never use this address on this channel again; False when it already was suppressed."""
        if conn is None:
            with self.begin() as c:
                return self.suppress(c, channel, address, customer_id, reason)
        key = self.address_hash(channel, address)
        exists = conn.execute(select(suppressions.c.reason).where(
            suppressions.c.channel == channel, suppressions.c.address_hash == key)).first()
        if exists:
            return False
        try:
            with conn.begin_nested():
                conn.execute(insert(suppressions).values(channel=channel, address_hash=key, customer_id=customer_id,
                                                         reason=reason, created_at=self.clock()))
        except IntegrityError:
            return False
        return True

    def unsuppress(self, channel: str, address: str) -> None:
        from sqlalchemy import delete

        with self.begin() as conn:
            conn.execute(delete(suppressions).where(suppressions.c.channel == channel,
                                                    suppressions.c.address_hash == self.address_hash(channel, address)))

    def suppressed(self, conn: Connection, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (channel, address) pairs are suppressed, in one query."""
        by_key = {(c, self.address_hash(c, a)): (c, a) for c, a in pairs}
        if not by_key:
            return set()
        if self.pg:  # two array parameters: the statement text stays the same for any number of addresses
            found = conn.exec_driver_sql(_SUPPRESSED, {"channels": [c for c, _h in by_key],
                                                       "hashes": [h for _c, h in by_key]}).all()
        else:  # row values: SQLite reads each pair from the primary key
            found = conn.execute(select(suppressions.c.channel, suppressions.c.address_hash).where(
                tuple_(suppressions.c.channel, suppressions.c.address_hash).in_(list(by_key)))).all()
        return {by_key[(c, h)] for c, h in found}

    # -- personal data ----------------------------------------------------------------------------

    def erase_customer(self, customer_id: str, scrub: Scrub, *, cancel_reason: str) -> Erasure:
        """Erase the personal data of every transaction of ``customer_id``, in one transaction under
        their row locks; pending ones are cancelled with ``cancel_reason`` (nobody can be reminded).
        Suppressions keep their address hash, so an opt-out outlives the data, but lose the customer id
        that would tie the hash to this customer. Running it again changes nothing."""
        t = transactions.c
        event_ids: list[int] = []
        with self.begin() as conn:
            rows = conn.execute(self._lock(select(t.id, t.status, t.content, t.erased_at)
                                           .where(t.customer_id == customer_id).order_by(t.id))).mappings().all()
            now = self.clock()  # read after the locks, as every status change does
            erased = self._erase_rows(conn, [r for r in rows if r["erased_at"] is None], scrub, now)
            pending = [r["id"] for r in rows if r["status"] == PENDING]
            if pending:
                conn.execute(update(transactions).where(t.id.in_(pending), t.status == PENDING).values(
                    status=CANCELLED, cancelled_at=now, next_due_at=None, status_reason=cancel_reason,
                    settled_source="platform", settled_actor=None))
                for tx in conn.execute(select(transactions).where(t.id.in_(pending))).mappings():
                    self.events.note(conn, tx["id"], now, CANCELLED, "platform", note="personal data erased")
                    event_id = self.events.add(conn, tx, "transaction.cancelled", event_data(
                        tx, status=CANCELLED, source="platform", actor=None, reason=cancel_reason, at=now), now)
                    if event_id is not None:
                        event_ids.append(event_id)
            if rows:
                conn.execute(update(suppressions).where(suppressions.c.customer_id == customer_id)
                             .values(customer_id=None))
        return Erasure(len(rows), erased, pending, event_ids)

    def erase_settled(self, before: datetime, scrub: Scrub, *, limit: int) -> list[str]:
        """Erase the personal data of up to ``limit`` transactions settled before ``before``, oldest
        first, on the retention index (only settled rows still holding data are in it); two sweepers
        take disjoint rows (SKIP LOCKED). Returns the ids erased."""
        with self.begin() as conn:
            rows = conn.execute(self._lock(self.retention_query(before, limit), skip_locked=True)).mappings().all()
            return self._erase_rows(conn, rows, scrub, self.clock())

    @staticmethod
    def retention_query(before: datetime, limit: int):
        """The oldest settled transactions that still hold personal data: its terms are the index's own
        (ix_transactions_retention), so both databases read only the rows it returns."""
        t = transactions.c
        return (select(t.id, t.content)
                .where(t.erased_at.is_(None), SETTLED_AT.is_not(None), SETTLED_AT < before)
                .order_by(SETTLED_AT).limit(limit))

    def _erase_rows(self, conn: Connection, rows: Sequence[Mapping[str, Any]], scrub: Scrub,
                    now: datetime) -> list[str]:
        """Rewrite each row's content without its personal data, and any delivery reason quoting a
        removed value in full (reasons are masked when written; this is the backstop)."""
        if not rows:
            return []
        changes, replaced = [], {}
        for row in rows:
            content, removed = scrub(row["content"])
            changes.append({"b_id": row["id"], "b_content": content, "b_at": now})
            if removed:
                replaced[row["id"]] = removed
        conn.execute(update(transactions).where(transactions.c.id == bindparam("b_id")).values(
            content=bindparam("b_content", type_=transactions.c.content.type), erased_at=bindparam("b_at")),
            changes)
        forget_rolled_phones(conn, [row["id"] for row in rows])  # a masked phone regroups an older SMS's cost
        if replaced:
            d = deliveries.c
            quoted = conn.execute(select(d.id, d.transaction_id, d.reason).where(
                d.transaction_id.in_(list(replaced)), d.reason.is_not(None))).all()
            fixes = []
            for delivery_id, tx_id, reason in quoted:
                clean = reason
                for value, mask in replaced[tx_id]:
                    clean = clean.replace(value, mask)
                if clean != reason:
                    fixes.append({"b_id": delivery_id, "b_reason": clean})
            if fixes:
                conn.execute(update(deliveries).where(d.id == bindparam("b_id")).values(
                    reason=bindparam("b_reason")), fixes)
        return [row["id"] for row in rows]

    # -- early provider callbacks ----------------------------------------------------------------

    def keep_early_callback(self, provider: str, provider_id: str, status: str, code: str | None, *,
                            keep: timedelta) -> None:
        """Keep a status callback whose message has no delivery with that provider id yet; callbacks
        older than ``keep`` are dropped on the way (they belonged to no delivery of ours)."""
        from sqlalchemy import delete

        now = self.clock()
        with self.begin() as conn:
            conn.execute(delete(early_callbacks).where(early_callbacks.c.received_at < now - keep))
            conn.execute(insert(early_callbacks).values(provider=provider, provider_id=provider_id, status=status,
                                                        code=code, received_at=now))

    def take_early_callbacks(self, conn: Connection | None, provider_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Remove and return the kept callbacks for these provider ids, oldest first. One statement
        (DELETE ... RETURNING), so of two callers racing for a callback exactly one gets it."""
        wanted = sorted({p for p in provider_ids if p})
        if not wanted:
            return []
        if conn is None:
            with self.begin() as c:
                return self.take_early_callbacks(c, wanted)
        from sqlalchemy import delete

        e = early_callbacks.c
        if self.pg:  # one array parameter: the same statement text for any number of ids
            stmt = text("DELETE FROM early_callbacks WHERE provider_id = ANY(:ids) "
                        "RETURNING id, provider, provider_id, status, code")
            found = conn.execute(stmt, {"ids": wanted}).mappings()
        else:
            found = conn.execute(delete(early_callbacks).where(e.provider_id.in_(wanted))
                                 .returning(e.id, e.provider, e.provider_id, e.status, e.code)).mappings()
        return sorted((dict(r) for r in found), key=lambda r: r["id"])

    def matched_early_callbacks(self, limit: int = 500) -> list[str]:
        """Provider ids of kept callbacks whose delivery now carries that id (for a sweep)."""
        e = early_callbacks.c
        known = select(deliveries.c.id).where(deliveries.c.provider_id == e.provider_id).exists()
        with self.engine.connect() as conn:
            return list(conn.execute(select(e.provider_id).where(known).distinct().limit(limit)).scalars())

    def deliveries_of(self, tx_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(deliveries).where(deliveries.c.transaction_id == tx_id)
                                .order_by(deliveries.c.due_at, deliveries.c.id)).mappings()
            return [dict(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Transactions by status and deliveries by status, for `remind status` and metrics; queued
        deliveries held for quiet hours (not enqueued yet) are counted as ``held``."""
        with self.engine.connect() as conn:
            tx = conn.execute(select(transactions.c.status, func.count()).group_by(transactions.c.status)).all()
            state = HELD_STATE.label("state")
            dl = conn.execute(select(state, func.count()).group_by(state)).all()
        return {**{f"transactions_{s}": n for s, n in tx}, **{f"deliveries_{s}": n for s, n in dl}}

    def leave_to_tick(self, *, deliveries: Sequence[int] = (), events: Sequence[int] = ()) -> None:
        """Work whose broker message never left (a CLI command has no broker; Redis was down): its lease
        ends now, so the next tick of any scheduler enqueues it, as it would a lost message."""
        now = self.clock()
        if deliveries:
            self.expire_leases(now, deliveries)
        if events:
            self.events.expire(now, events)

    def statuses(self, ids: Sequence[str]) -> dict[str, str]:
        """The current status of each transaction of ``ids`` that exists."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(transactions.c.id, transactions.c.status).where(
                transactions.c.id.in_(list(ids)))).all())

    def unsettled(self, ids: Sequence[str]) -> list[str]:
        """Of ``ids``, those still pending or with deliveries not finished."""
        with self.engine.connect() as conn:
            busy_tx = conn.execute(select(transactions.c.id).where(
                transactions.c.id.in_(ids), transactions.c.status == PENDING)).scalars().all()
            busy_dl = conn.execute(select(deliveries.c.transaction_id).where(
                deliveries.c.transaction_id.in_(ids),
                or_(deliveries.c.status == "queued", deliveries.c.status == "sending"))).scalars().all()
        return sorted(set(busy_tx) | set(busy_dl))


__all__ = ["CANCELLED", "CONFIRMED", "ESCALATED", "PENDING", "SETTLED", "Cursor", "Erasure", "NewDelivery",
           "NewTransaction", "Scrub", "Store", "and_", "metrics_snapshot"]


#: /metrics counts a table's rows exactly while PostgreSQL estimates it below this many rows; above, the
#: settled statuses are estimated from the planner's statistics (see metrics_snapshot).
EXACT_BELOW = 100_000
#: The due steps waiting are counted up to this many: a larger backlog reads as this figure (the
#: scheduler lag shows how far behind it is).
DUE_COUNT_CAP = 10_000
#: Provider latency is read from the newest 1000 sent deliveries (by id) among the newest this many.
LATENCY_WINDOW = 20_000
#: Statuses a delivery holds while it is in flight: always counted exactly (on the lease index).
IN_FLIGHT = ("queued", "sending")


def metrics_snapshot(store: Store, now: datetime) -> dict[str, Any]:
    """Figures for /metrics, read from SQL so every process reports the same truth, and read from indexes
    or statistics so a scrape costs the same at a thousand rows or ten million:

    - transactions by status, deliveries by (channel, status): exact while the table is small (below
      ``EXACT_BELOW`` rows, and always on SQLite); on a larger PostgreSQL table the settled statuses are
      ``pg_class.reltuples`` times their frequency in the planner's statistics (``pg_stats``, and the
      (channel, status) MCV list of ``st_deliveries_channel_status``), as fresh as the last ANALYZE; the
      live ones stay exact: pending transactions on ``ix_transactions_next_due_at`` (while fewer than
      ``EXACT_BELOW``), queued and sending deliveries on the lease index;
    - due steps waiting: counted on ``ix_transactions_next_due_at`` up to ``DUE_COUNT_CAP``;
      the oldest due step: one index probe;
    - retries: on ``ix_deliveries_retried`` (only deliveries tried more than once);
    - provider latency: the newest 1000 sent deliveries (by id) among the newest ``LATENCY_WINDOW``."""
    t, d = transactions.c, deliveries.c
    due_rows = select(t.id).where(t.next_due_at <= now, t.status == PENDING).limit(DUE_COUNT_CAP).subquery()
    with store.engine.connect() as conn:
        tx, dl = _status_counts(store, conn)
        due_count, oldest_due, newest = conn.execute(select(  # three index probes, one round trip
            select(func.count()).select_from(due_rows).scalar_subquery(),
            select(func.min(t.next_due_at)).where(t.next_due_at <= now, t.status == PENDING).scalar_subquery(),
            select(func.max(d.id)).scalar_subquery())).one()
        retries = conn.execute(select(d.channel, func.sum(d.attempts - 1)).where(text("attempts > 1"))
                               .group_by(d.channel)).all()
        recent = conn.execute(select(d.channel, d.started_at, d.sent_at)  # backwards on the primary key, no sort
                              .where(d.id > (newest or 0) - LATENCY_WINDOW, d.sent_at.is_not(None),
                                     d.started_at.is_not(None))
                              .order_by(d.id.desc()).limit(1000)).all()
    return {
        "transactions": tx,
        "deliveries": dl,
        "due_waiting": due_count or 0,
        "oldest_due": oldest_due,
        "retries": {c: int(n or 0) for c, n in retries},
        # the provider call's duration, from the newest 1000 sends (started = decided, sent = provider answered)
        "latencies": [(c, (sent - started).total_seconds()) for c, started, sent in recent],
    }


def _status_counts(store: Store, conn: Connection) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Transactions by status and deliveries by (channel, status): exact, or estimated on a large
    PostgreSQL table (see metrics_snapshot)."""
    t, d = transactions.c, deliveries.c
    stats = _statistics(conn) if store.pg else {}
    tx_rows, dl_rows = stats.get("transactions", -1), stats.get("deliveries", -1)
    if tx_rows < EXACT_BELOW or stats["status"] is None:
        tx = {s: n for s, n in conn.execute(select(t.status, func.count()).group_by(t.status))}
    else:  # rows x each status's frequency in pg_stats
        tx = {value: round(tx_rows * freq) for value, freq in zip(*stats["status"], strict=True)}
        if tx.get(PENDING, 0) < EXACT_BELOW:  # the live ones, on the partial index of the scheduler's cursor
            tx[PENDING] = conn.execute(select(func.count()).where(
                t.next_due_at.is_not(None), t.status == PENDING)).scalar() or 0
    if dl_rows < EXACT_BELOW or stats["channel_status"] is None:
        state = HELD_STATE.label("state")  # "held": waiting out quiet hours
        return tx, {(c, s): n for c, s, n in conn.execute(
            select(d.channel, state, func.count()).group_by(d.channel, state))}
    # rows x each (channel, status) pair's frequency in the MCV list of st_deliveries_channel_status
    dl = {(pair[0], pair[1]): round(dl_rows * freq) for pair, freq in zip(*stats["channel_status"], strict=True)
          if pair[1] not in IN_FLIGHT}
    state = HELD_STATE.label("state")
    dl.update({(c, s): n for c, s, n in conn.execute(
        select(d.channel, state, func.count()).where(d.lease_until.is_not(None), d.status.in_(IN_FLIGHT))
        .group_by(d.channel, state))})
    return tx, dl


_STATISTICS = text("""
    SELECT (SELECT reltuples FROM pg_class WHERE oid = to_regclass('transactions')) AS transactions,
           (SELECT reltuples FROM pg_class WHERE oid = to_regclass('deliveries')) AS deliveries,
           s.most_common_vals::text::text[] AS status_values, s.most_common_freqs AS status_freqs,
           x.most_common_vals AS pair_values, x.most_common_freqs AS pair_freqs
    FROM (SELECT 1) AS one
    LEFT JOIN pg_stats AS s ON s.schemaname = current_schema() AND s.tablename = 'transactions'
                           AND s.attname = 'status'
    LEFT JOIN pg_stats_ext AS x ON x.statistics_schemaname = current_schema() AND x.statistics_name = :name""")


def _statistics(conn: Connection) -> dict[str, Any]:
    """In one round trip, PostgreSQL's estimates (as of the last ANALYZE; -1 rows before the first): each
    table's rows (``pg_class.reltuples``), the frequencies of ``transactions.status`` (``pg_stats``) and of
    the (channel, status) pairs (the MCV list of ``st_deliveries_channel_status``, ``pg_stats_ext``)."""
    row = conn.execute(_STATISTICS, {"name": DELIVERY_STATISTICS}).mappings().one()
    return {"transactions": float(row["transactions"] if row["transactions"] is not None else -1),
            "deliveries": float(row["deliveries"] if row["deliveries"] is not None else -1),
            "status": (row["status_values"], row["status_freqs"]) if row["status_values"] is not None else None,
            "channel_status": (row["pair_values"], row["pair_freqs"]) if row["pair_values"] is not None else None}
