"""The funnel's roll-up: each settled transaction's units, attributed once, so the funnel stops re-reading them.

A *unit* is one transaction's sent reminders of one (step, variant) (see worker/stats.py for the funnel's
definitions). ``units_sql`` computes a set of transactions' units with their attribution: the one
definition both the live funnel and the roll-up use, so the two give the same figures to the last bit.
A *cost unit* is one transaction's billed customer messages of one (kind, step, variant): every reminder
and notice with ``sent_at`` set, even one reported failed later (it was billed); ``cost_units_sql`` is the
one definition the live cost figures (worker/store/export.py) and the roll-up share.

**What is rolled up.** A transaction that is settled (not ``pending``) and has no customer message (reminder
or notice) queued or in flight: nothing the tick or a worker does can change its units any more. ``roll_up``
(the scheduler's tick, a step at a time) writes its units to ``funnel_units`` and its cost units to
``cost_units`` and marks it in ``funnel_rolled``; the funnel and the cost figures read those and compute
every other transaction in their window live, each in one statement, so one snapshot decides which side each
transaction is on.

**What undoes it.** Each of these calls ``forget`` in its own database transaction, under the transaction's
row lock: a status change of a settled transaction (an ops approval or decline of an escalated one, or the
customer confirming it after a review contact: ``Store.settle``); a sent reminder reported failed later
(``Outcomes.failed``: its funnel units change, its cost does not); a notice written for a settled
transaction (a review contact, a notice's fallback: ``Store.add_deliveries``), which will be billed once
sent; and the erasure of a transaction that has an SMS without a recorded calling code (its cost is
grouped by the phone, now masked: ``Store`` erasure). ``forget`` deletes both kinds of units and marks the
transaction stale, so it is computed live until ``roll_up`` rolls it again. Pending transactions (the
deadline settles only those) are never rolled up. A roll-up locks the transactions it rolls (``FOR SHARE``;
SQLite: one writer at a time), so a change waits for it and then forgets what it wrote, or it sees the
change.

**How the sweep finds work.** Stale transactions first (a partial index), then the transactions in order
of (created_at, id) after a cursor, a batch per call; the ones it must leave (still pending, a reminder in
flight) set the low-water mark where the next round starts once the sweep reaches the newest, together
with the oldest pending transaction. A transaction registered late (created_at in the past) and settled
before a round starts below it is left to the live side: slower, never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, text

from .tables import transactions

if TYPE_CHECKING:
    from .repo import Store

#: Reminders that went out: the funnel's rows, in the words of ix_deliveries_funnel's predicate (so both
#: databases can read that index), and the channels a reminder can go on.
FUNNEL_ROWS = "d.kind = 'reminder' AND d.status IN ('sent', 'delivered') AND d.sent_at IS NOT NULL"
REMINDER_CHANNELS = ("sms", "email", "push")
#: A transaction's status as the funnel counts it: a confirmation by ops (a risk review's approval) is
#: ``approved``, apart from the customers' confirmations, which the reminders are judged by.
FUNNEL_STATUS = "CASE WHEN t.status = 'confirmed' AND t.settled_source = 'ops' THEN 'approved' ELSE t.status END"
#: The columns of a unit, as ``units_sql`` returns them and ``funnel_units`` keeps them.
UNIT_COLUMNS = ("transaction_id", "schedule", "created_at", "step", "variant", "first_offset", "sms", "email",
                "push", "segments", "seconds", "ending", "by_customer")
#: A unit's cost figures, as ``cost_units_sql`` returns them and ``cost_units`` keeps them: its messages by
#: channel, its SMS's billed segments (1 when none was recorded), and where that SMS went (one SMS at most:
#: uq_deliveries_tx_step_channel): its calling code, or for an SMS sent before migration 0008 recorded it, the
#: first four characters of the transaction's phone (``*`` when masked) and the phone itself.
COST_UNIT_COLUMNS = ("transaction_id", "schedule", "created_at", "kind", "step", "variant", "sms", "sms_segments",
                     "country_code", "prefix", "phone", "email", "push")
#: The customer messages that are billed: reminders and notices the provider accepted (not platform webhooks).
BILLED_ROWS = "d.kind IN ('reminder', 'notice') AND d.channel IN ('sms', 'email', 'push') AND d.sent_at IS NOT NULL"
#: Transactions rolled up per call of ``roll_up`` from the scheduler's tick: a small step (tens of ms).
TICK_STEP = 500
#: What this roll-up writes: 2 = funnel and cost units (migration 0010). ``funnel_rolled.version`` has no default
#: on PostgreSQL, so a scheduler of the previous release, still rolling up during a deploy, fails to mark
#: anything rolled (and logs it) rather than writing funnel units without their cost units.
VERSION = 2
_STATE = "funnel"


def seconds_sql(pg: bool, later: str, earlier: str) -> str:
    """SQL for ``later - earlier`` in seconds: exact on PostgreSQL; to the millisecond on SQLite (julianday)."""
    if pg:
        return f"CAST(EXTRACT(EPOCH FROM ({later} - {earlier})) AS double precision)"
    return f"ROUND((julianday({later}) - julianday({earlier})) * 86400.0, 3)"


def units_sql(pg: bool, where: str) -> str:
    """The units of the transactions ``t`` matching ``where``, one row each (``UNIT_COLUMNS``).

    Per transaction, its sent reminders are grouped per (step, variant) with their first ``sent_at``; LEAD
    over the groups in order of (first sent, step, variant) gives each the next unit's first sent. A
    confirmation belongs to the unit with ``first sent <= confirmed_at < next first sent`` (``seconds``: the
    time from its first sent; ``by_customer`` when the customer confirmed), a cancellation or escalation to the
    unit with no next one (``ending``)."""
    collate = ' COLLATE "C"' if pg else ""  # ties in first_sent are ordered by step and variant as Python does
    per_channel = ", ".join(f"SUM(CASE WHEN d.channel = '{c}' THEN 1 ELSE 0 END) AS {c}" for c in REMINDER_CHANNELS)
    attributed = ("u.status = 'confirmed' AND u.confirmed_at IS NOT NULL AND u.first_sent <= u.confirmed_at "
                  "AND (u.next_sent IS NULL OR u.next_sent > u.confirmed_at)")
    # Grouped on the transaction's primary key (its other columns come along without being grouped on),
    # with the next unit's first sent from a window over the groups: one level.
    return f"""
        SELECT u.transaction_id, u.schedule, u.created_at, u.step, u.variant, u.first_offset,
               {", ".join(f"u.{c}" for c in REMINDER_CHANNELS)}, u.segments,
               CASE WHEN {attributed} THEN {seconds_sql(pg, 'u.confirmed_at', 'u.first_sent')} END AS seconds,
               CASE WHEN u.next_sent IS NULL AND u.status IN ('cancelled', 'escalated') THEN u.status END AS ending,
               CASE WHEN {attributed} AND u.settled_source = 'customer' THEN TRUE ELSE FALSE END AS by_customer
        FROM (
            SELECT t.id AS transaction_id, t.schedule, t.created_at, {FUNNEL_STATUS} AS status, t.confirmed_at,
                   t.settled_source,
                   d.step, d.variant, MIN(d.sent_at) AS first_sent,
                   {seconds_sql(pg, "MIN(d.sent_at)", "t.created_at")} AS first_offset,
                   {per_channel}, SUM(CASE WHEN d.channel = 'sms' THEN d.segments END) AS segments,
                   LEAD(MIN(d.sent_at)) OVER (PARTITION BY t.id ORDER BY MIN(d.sent_at), d.step{collate},
                                              d.variant{collate}) AS next_sent
            FROM transactions AS t JOIN deliveries AS d ON d.transaction_id = t.id
            WHERE {where} AND {FUNNEL_ROWS}
            GROUP BY t.id, d.step, d.variant) AS u"""


def phone_sql(pg: bool) -> str:
    """SQL for the phone in the transaction ``t``'s canonical JSON (NULL when it has none)."""
    return "t.content -> 'customer' ->> 'phone'" if pg else "json_extract(t.content, '$.customer.phone')"


def cost_units_sql(pg: bool, where: str) -> str:
    """The cost units of the transactions ``t`` matching ``where``, one row each (``COST_UNIT_COLUMNS``): their
    billed messages (``BILLED_ROWS``) per (kind, step, variant)."""
    sms = "d.channel = 'sms'"
    legacy = f"{sms} AND d.country_code IS NULL"
    phone = phone_sql(pg)
    per_channel = ", ".join(f"SUM(CASE WHEN d.channel = '{c}' THEN 1 ELSE 0 END) AS {c}" for c in ("email", "push"))
    return f"""
        SELECT t.id AS transaction_id, t.schedule, t.created_at, d.kind, d.step, d.variant,
               SUM(CASE WHEN {sms} THEN 1 ELSE 0 END) AS sms,
               SUM(CASE WHEN {sms} THEN COALESCE(d.segments, 1) ELSE 0 END) AS sms_segments,
               MIN(CASE WHEN {sms} THEN d.country_code END) AS country_code,
               MIN(CASE WHEN {legacy} THEN CASE WHEN {phone} LIKE '%*%' THEN '*' ELSE SUBSTR({phone}, 1, 4) END END)
                   AS prefix,
               MIN(CASE WHEN {legacy} THEN {phone} END) AS phone, {per_channel}
        FROM transactions AS t JOIN deliveries AS d ON d.transaction_id = t.id
        WHERE {where} AND {BILLED_ROWS}
        GROUP BY t.id, d.kind, d.step, d.variant"""


#: A transaction the live funnel must compute: not rolled up, or rolled up and changed since (stale).
NOT_ROLLED = "NOT EXISTS (SELECT 1 FROM funnel_rolled AS f WHERE f.transaction_id = t.id AND NOT f.stale{window})"


#: Where a statement takes a list of transaction ids: one array parameter on PostgreSQL (a fixed text for
#: any number of ids), an expanding IN on SQLite.
IDS = "__IDS__"


def _of_ids(pg: bool):
    """``sql`` (with ``IDS`` where the list goes) as a statement taking ``ids``."""
    def statement(sql: str):
        if pg:
            return text(sql.replace(IDS, "= ANY(CAST(:ids AS text[]))"))
        return text(sql.replace(IDS, "IN :ids")).bindparams(bindparam("ids", expanding=True))
    return statement


def forget(conn: Connection, tx_ids: list[str]) -> None:
    """The units of these transactions no longer hold (their status or a sent reminder changed): delete them
    and mark the transactions stale, in the caller's database transaction, so the funnel computes them live
    until the next ``roll_up``. Costs nothing for a transaction that was never rolled up."""
    if not tx_ids:
        return
    of_ids = _of_ids(conn.dialect.name == "postgresql")
    conn.execute(of_ids(f"UPDATE funnel_rolled SET stale = true WHERE transaction_id {IDS} AND NOT stale"),
                 {"ids": tx_ids})
    conn.execute(of_ids(f"DELETE FROM funnel_units WHERE transaction_id {IDS}"), {"ids": tx_ids})
    conn.execute(of_ids(f"DELETE FROM cost_units WHERE transaction_id {IDS}"), {"ids": tx_ids})


def forget_phones(conn: Connection, tx_ids: list[str]) -> None:
    """These transactions' phones are masked now (an erasure): ``forget`` those whose rolled-up cost groups an
    SMS by the phone (one sent before its calling code was recorded). Call under their row locks."""
    if not tx_ids:
        return
    stmt = _of_ids(conn.dialect.name == "postgresql")(
        f"SELECT DISTINCT transaction_id FROM cost_units WHERE transaction_id {IDS} AND sms > 0 "
        "AND country_code IS NULL")
    forget(conn, [r[0] for r in conn.execute(stmt, {"ids": tx_ids})])


@dataclass(frozen=True)
class RollUp:
    """What one call of ``roll_up`` did."""

    rolled: int  # transactions whose units were written (new, or again after a change)
    examined: int  # transactions the sweep looked at
    caught_up: bool  # the sweep reached the newest transaction and nothing stale is left


def roll_up(store: Store, *, limit: int = TICK_STEP) -> RollUp:
    """Roll up to ``limit`` stale transactions and sweep ``limit`` more, in one database transaction. Another
    scheduler doing the same at this moment makes this call do nothing (PostgreSQL: the state row is taken
    with SKIP LOCKED; SQLite: writers take turns)."""
    with store.begin() as conn:
        state = _take_state(conn, store.pg)
        if state is None:
            return RollUp(0, 0, False)
        stale = [r[0] for r in conn.execute(text(
            "SELECT transaction_id FROM funnel_rolled WHERE stale ORDER BY transaction_id LIMIT :n"), {"n": limit})]
        swept = _sweep(conn, state, limit)
        waiting = [r for r in swept if r["status"] != "pending" and not r["rolled"]]
        rolled = _roll(conn, store.pg, stale + [r["id"] for r in waiting])
        left = [r["created_at"] for r in swept
                if r["status"] == "pending" or (not r["rolled"] and r["id"] not in rolled)]
        low = min([x for x in (state["low_created_at"], *left) if x is not None], default=None)
        end = len(swept) < limit
        if swept and not end:
            cursor: tuple[datetime | None, str | None] = (swept[-1]["created_at"], swept[-1]["id"])
        else:  # the newest was reached: the next round starts at the oldest transaction left behind
            oldest = conn.execute(text("SELECT MIN(created_at) AS oldest FROM transactions "
                                       "WHERE next_due_at IS NOT NULL AND status = 'pending'").columns(
                                           oldest=transactions.c.created_at.type)).scalar()
            start = min([x for x in (low, oldest) if x is not None], default=None)
            last = (swept[-1]["created_at"], swept[-1]["id"]) if swept else (state["after_created_at"],
                                                                              state["after_id"])
            cursor = (start, None) if start is not None else last
            low = None
        conn.execute(text("UPDATE funnel_rollup_state SET after_created_at = :after, after_id = :after_id, "
                          "low_created_at = :low WHERE name = :name").bindparams(
            bindparam("after", type_=transactions.c.created_at.type),
            bindparam("low", type_=transactions.c.created_at.type)),
            {"after": cursor[0], "after_id": cursor[1], "low": low, "name": _STATE})
    return RollUp(len(rolled), len(swept), end and len(stale) < limit)


def forget_all(store: Store) -> None:
    """Empty the roll-up (``remind db rollup --again``): every transaction is computed live until it is rolled up
    anew. For after a deploy in which processes of the previous release ran beside this one: a writer of that
    release changing a rolled-up transaction forgets only what it knew of (its funnel units, not its cost units,
    and a notice not at all), so what this release rolled up meanwhile may be short or counted twice."""
    with store.engine.begin() as conn:
        if store.pg:
            conn.execute(text("TRUNCATE funnel_units, cost_units, funnel_rolled, funnel_rollup_state"))
        else:
            for table in ("funnel_units", "cost_units", "funnel_rolled", "funnel_rollup_state"):
                conn.execute(text(f"DELETE FROM {table}"))


def roll_up_all(store: Store, *, limit: int = 5000) -> int:
    """Roll up everything that can be, now (``remind db rollup``, and after a migration on a large table):
    ``roll_up`` until the sweep has gone round once. Returns the transactions rolled up."""
    total = 0
    while True:
        step = roll_up(store, limit=limit)
        total += step.rolled
        if step.caught_up:
            break
    if store.pg and total:  # after a bulk fill: the planner's statistics, and the visibility map that lets
        # the funnel and the costs read funnel_units and cost_units by index only (autovacuum would get there later)
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM (ANALYZE) funnel_units, cost_units, funnel_rolled"))
    return total


def _take_state(conn: Connection, pg: bool) -> dict[str, Any] | None:
    """The sweep's state row, locked for this database transaction; None when another scheduler has it."""
    conn.execute(text("INSERT INTO funnel_rollup_state (name) VALUES (:name) ON CONFLICT (name) DO NOTHING"),
                 {"name": _STATE})
    lock = " FOR UPDATE SKIP LOCKED" if pg else ""
    row = conn.execute(text("SELECT after_created_at, after_id, low_created_at FROM funnel_rollup_state "
                            f"WHERE name = :name{lock}").columns(
        after_created_at=transactions.c.created_at.type, low_created_at=transactions.c.created_at.type),
        {"name": _STATE}).mappings().first()
    return dict(row) if row else None


def _sweep(conn: Connection, state: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The next ``limit`` transactions after the cursor, by (created_at, id), each with its status and
    whether it is rolled up (and not stale)."""
    after, after_id = state["after_created_at"], state["after_id"]
    if after is None:
        where = "1 = 1"
    elif after_id is None:  # a new round: from this time on, inclusive
        where = "t.created_at >= :after"
    else:
        where = "t.created_at >= :after AND (t.created_at > :after OR t.id > :after_id)"  # a range of the index
    stmt = text(f"""
        SELECT t.id, t.created_at, t.status,
               EXISTS (SELECT 1 FROM funnel_rolled AS f WHERE f.transaction_id = t.id AND NOT f.stale) AS rolled
        FROM transactions AS t WHERE {where} ORDER BY t.created_at, t.id LIMIT :n""")
    if after is not None:
        stmt = stmt.bindparams(bindparam("after", type_=transactions.c.created_at.type))
    stmt = stmt.columns(created_at=transactions.c.created_at.type)
    params: dict[str, Any] = {"n": limit}
    if after is not None:
        params.update(after=after, **({"after_id": after_id} if after_id is not None else {}))
    rows = conn.execute(stmt, params).mappings()
    return [{**r, "rolled": bool(r["rolled"])} for r in rows]


def _roll(conn: Connection, pg: bool, candidates: list[str]) -> set[str]:
    """Write the units and cost units of those ``candidates`` that are settled, have no customer message
    queued or in flight and are not rolled up already; returns their ids. On PostgreSQL each is share-locked
    first (one a decision holds is left for the next call), so no change can come between the read and the
    write.

    The lock and the check are two statements: under READ COMMITTED a locking SELECT judges its other
    conditions (the message in flight) on the snapshot it started with, so a decision that committed a notice
    while it ran, and let go of the row just before it was locked, would go unseen and the notice's cost be
    lost to the roll-up. The check's own snapshot is taken with the locks held: every writer before is in it,
    every writer after waits for this transaction and then forgets what it wrote."""
    if not candidates:
        return set()
    of_ids = _of_ids(pg)
    ids = sorted(set(candidates))
    if pg:
        ids = [r[0] for r in conn.execute(of_ids(f"""
            SELECT t.id FROM transactions AS t WHERE t.id {IDS} AND t.status <> 'pending'
            FOR SHARE OF t SKIP LOCKED"""), {"ids": ids})]
        if not ids:
            return set()
    ready = [r[0] for r in conn.execute(of_ids(f"""
        SELECT t.id FROM transactions AS t
        WHERE t.id {IDS} AND t.status <> 'pending'
          AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.transaction_id = t.id
                                                         AND d.kind IN ('reminder', 'notice')
                                                         AND d.status IN ('queued', 'sending'))
          AND {NOT_ROLLED.format(window="")}"""), {"ids": ids})]
    if not ready:
        return set()
    params = {"ids": ready}
    for table, columns, sql in (("funnel_units", UNIT_COLUMNS, units_sql),
                                ("cost_units", COST_UNIT_COLUMNS, cost_units_sql)):
        listed = ", ".join(columns)
        conn.execute(of_ids(f"DELETE FROM {table} WHERE transaction_id {IDS}"), params)
        conn.execute(of_ids(f"INSERT INTO {table} ({listed}) SELECT {listed} FROM ({sql(pg, f't.id {IDS}')}) AS x"),
                     params)
    conn.execute(of_ids(f"""
        INSERT INTO funnel_rolled (transaction_id, created_at, stale, version)
        SELECT t.id, t.created_at, false, {VERSION} FROM transactions AS t WHERE t.id {IDS}
        ON CONFLICT (transaction_id) DO UPDATE SET stale = false, version = {VERSION}"""), params)
    return set(ready)
