"""The funnel's SQL: the rows worker.stats aggregates, never a row per transaction to the caller.

``funnel_figures`` is what /ops, /v1/stats and ``remind stats`` read: the rolled-up units of settled
transactions (worker/store/rollup.py) plus the units of every other transaction in the window computed
live, in one statement; ``funnel_rows`` is the plain read the Python reference (worker.stats.summarize)
works on in the tests.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, case, func, select, text

from .rollup import FUNNEL_STATUS, NOT_ROLLED, REMINDER_CHANNELS, seconds_sql, units_sql
from .tables import deliveries, transactions

if TYPE_CHECKING:
    from .repo import Store

#: Upper bounds (exclusive, seconds) of the time-to-confirm buckets but the last; see worker.stats.BUCKETS.
HISTOGRAM_BOUNDS = (300, 900, 3600, 14400, 43200, 86400)


def window_sql(since: datetime | None, schedule: str | None) -> tuple[list[str], dict[str, Any]]:
    """The read side's window over transactions ``t`` in SQL: ``created_at >= since`` (on
    ix_transactions_created_at) and one schedule; the conditions and their parameters."""
    scope: list[str] = ["1 = 1"]
    params: dict[str, Any] = {}
    if since is not None:
        scope.append("t.created_at >= :since")
        params["since"] = since
    if schedule is not None:
        scope.append("t.schedule = :schedule")
        params["schedule"] = schedule
    return scope, params


def funnel_rows(store: Store, since: datetime | None, schedule: str | None) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for worker.stats: the transactions in scope, and their reminders that went out, grouped
    per (transaction, step, variant, channel) with the count, earliest ``sent_at`` and, when the
    table has a ``segments`` column, its sum. Two queries; the attribution is done in Python."""
    scope = []
    if since is not None:
        scope.append(transactions.c.created_at >= since)
    if schedule is not None:
        scope.append(transactions.c.schedule == schedule)
    tx_cols = [transactions.c[n] for n in ("id", "schedule", "created_at", "confirmed_at", "cancelled_at",
                                           "escalated_at")]
    tx_cols.append(case((and_(transactions.c.status == "confirmed", transactions.c.settled_source == "ops"),
                         "approved"), else_=transactions.c.status).label("status"))
    d = deliveries.c
    keys = [d.transaction_id, d.step, d.variant, d.channel]
    figures = [func.count().label("messages"), func.min(d.sent_at).label("first_sent")]
    if "segments" in d:
        figures.append(func.sum(d["segments"]).label("segments"))
    dl = (select(*keys, *figures).select_from(deliveries.join(transactions))
          .where(d.kind == "reminder", d.status.in_(("sent", "delivered")), *scope).group_by(*keys))
    with store.engine.connect() as conn:
        txs = [dict(r) for r in conn.execute(select(*tx_cols).where(*scope)).mappings()]
        dls = [dict(r) for r in conn.execute(dl).mappings()]
    return txs, dls


def _median_sql(groups: str, value: str, source: str) -> str:
    """Per ``groups``, the median of ``value`` over ``source`` (the mean of the two middle values for an even
    count, as statistics.median), with window functions: SQLite has no percentile_cont."""
    return f"""
        SELECT {groups}, AVG(v) AS median FROM (
            SELECT {groups}, {value} AS v,
                   ROW_NUMBER() OVER (PARTITION BY {groups} ORDER BY {value}) AS rn,
                   COUNT(*) OVER (PARTITION BY {groups}) AS n
            FROM {source}) AS ranked
        WHERE rn IN ((n + 1) / 2, (n + 2) / 2)
        GROUP BY {groups}"""


def funnel_figures(store: Store, since: datetime | None, schedule: str | None, *,
                   rolled: bool = True) -> dict[str, Any]:
    """The funnel's figures, aggregated by the database (see worker.stats for the definitions): rows per
    schedule, and per (schedule, step, variant), never per transaction, so the caller's memory does not
    grow with the table. The window is ``created_at >= since`` on ix_transactions_created_at (on
    PostgreSQL an index-only scan).

    The steps come from units (rollup.units_sql): those of rolled-up transactions from ``funnel_units``
    (ix_funnel_units_created_at), the others' computed live from their sent reminders
    (ix_deliveries_funnel), in one statement, so a transaction is counted on exactly one side.
    ``rolled=False`` computes every unit live (the tests compare the two)."""
    pg = store.pg
    scope, params = window_sql(since, schedule)
    where = " AND ".join(scope)
    in_scope = (f"SELECT t.id, t.schedule, {FUNNEL_STATUS} AS status, t.created_at, t.confirmed_at "
                f"FROM transactions AS t WHERE {where}")
    to_confirm = "c.seconds"  # computed once per row, in ``confirmed``
    bucket = "CASE " + " ".join(f"WHEN {to_confirm} < {hi} THEN {i}" for i, hi in enumerate(HISTOGRAM_BOUNDS)) + \
        f" ELSE {len(HISTOGRAM_BOUNDS)} END"
    to_confirm_sql = seconds_sql(pg, "s.confirmed_at", "s.created_at")
    timed = (f"(SELECT s.schedule, s.status, CASE WHEN s.status = 'confirmed' THEN {to_confirm_sql} END AS seconds "
             f"FROM ({in_scope}) AS s) AS c")
    confirmed = (f"(SELECT s.schedule, {to_confirm_sql} AS seconds "
                 f"FROM ({in_scope}) AS s WHERE s.status = 'confirmed' AND s.confirmed_at IS NOT NULL) AS c")
    counted = f"""
        u.schedule, u.step, u.variant, COUNT(*) AS reached,
        SUM(CASE WHEN u.seconds IS NOT NULL THEN 1 ELSE 0 END) AS confirmed_after,
        SUM(CASE WHEN u.ending = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,
        SUM(CASE WHEN u.ending = 'escalated' THEN 1 ELSE 0 END) AS escalated,
        {", ".join(f"SUM(u.{c}) AS {c}" for c in REMINDER_CHANNELS)}, SUM(u.segments) AS sms_segments,
        MIN(u.first_offset) AS first_offset"""
    keys = "m.schedule = n.schedule AND m.step = n.step AND m.variant = n.variant"
    # Counted in one pass (hashed: a handful of groups), the medians over the attributed units only; the
    # live units are computed once (materialized) for both.
    if pg:
        medians = ("SELECT a.schedule, a.step, a.variant, percentile_cont(0.5) WITHIN GROUP (ORDER BY a.seconds) "
                   "AS median FROM attributed AS a GROUP BY a.schedule, a.step, a.variant")
        schedule_median = (f"SELECT c.schedule, percentile_cont(0.5) WITHIN GROUP (ORDER BY {to_confirm}) AS median "
                           f"FROM {confirmed} GROUP BY c.schedule")
    else:
        medians = _median_sql("schedule, step, variant", "seconds", "attributed")
        schedule_median = _median_sql("schedule", "seconds", confirmed)
    steps = f"""{_units(pg, where, rolled)},
        counts AS (SELECT {counted} FROM units AS u GROUP BY u.schedule, u.step, u.variant),
        medians AS ({medians})
        SELECT n.*, m.median FROM counts AS n LEFT JOIN medians AS m ON {keys}"""
    statements = {
        # by status, and the confirmations by time to confirm, in one pass over the window
        "status": f"SELECT c.schedule, c.status, CASE WHEN c.seconds IS NOT NULL THEN {bucket} END AS bucket, "
                  f"COUNT(*) AS n FROM {timed} GROUP BY c.schedule, c.status, 3",
        "median": schedule_median,
        "steps": steps,
    }
    out: dict[str, Any] = {}
    with store.engine.begin() as conn:
        if pg:  # the live units' sorts in memory, and no JIT (compiling costs more than it saves here), for
            # this transaction only
            conn.execute(text("SET LOCAL work_mem = '64MB'"))
            conn.execute(text("SET LOCAL jit = off"))
        for name, sql in statements.items():
            stmt = text(sql)
            if "since" in params:
                stmt = stmt.bindparams(bindparam("since", type_=transactions.c.created_at.type))
            out[name] = [dict(r) for r in conn.execute(stmt, params).mappings()]
    by_status: dict[tuple[str, str], int] = {}
    for row in out["status"]:
        key = (row["schedule"], row["status"])
        by_status[key] = by_status.get(key, 0) + int(row["n"])
    out["histogram"] = [{"schedule": r["schedule"], "bucket": r["bucket"], "n": r["n"]} for r in out["status"]
                        if r["bucket"] is not None]
    out["status"] = [{"schedule": k[0], "status": k[1], "n": n} for k, n in by_status.items()]
    return out


def _units(pg: bool, where: str, rolled: bool) -> str:
    """CTEs of the window's units (``where`` on ``t``), ``units``, and of those a confirmation is attributed
    to, ``attributed``: rolled up, and computed live for the rest."""
    columns = "schedule, step, variant, first_offset, sms, email, push, segments, seconds, ending"
    keys = "schedule, step, variant, seconds"
    materialized = " MATERIALIZED" if pg else ""
    if not rolled:
        return f"""WITH live AS{materialized} (SELECT {columns} FROM ({units_sql(pg, where)}) AS l),
            units AS (SELECT {columns} FROM live),
            attributed AS (SELECT {keys} FROM live WHERE seconds IS NOT NULL)"""
    # The rolled-up side keeps the transaction's created_at and schedule, so the same window applies to it;
    # on the live side, the created_at bound lets PostgreSQL read only the window's part of funnel_rolled.
    kept = where.replace("t.", "r.")
    window = " AND f.created_at >= :since" if ":since" in where else ""
    live = f"{where} AND {NOT_ROLLED.format(window=window)}"
    return f"""WITH live AS{materialized} (SELECT {columns} FROM ({units_sql(pg, live)}) AS l),
        units AS (SELECT {columns} FROM funnel_units AS r WHERE {kept} UNION ALL SELECT {columns} FROM live),
        attributed AS (SELECT {keys} FROM funnel_units AS r WHERE {kept} AND r.seconds IS NOT NULL
                       UNION ALL SELECT {keys} FROM live WHERE seconds IS NOT NULL)"""
