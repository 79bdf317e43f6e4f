"""Figures for the variant comparison (worker/experiments.py), aggregated by the database.

``variant_figures`` gives rows per (schedule, step, variant, segment, locale, channel mix, concurrent), never
per transaction, so the web process's memory does not grow with the window: the attribution (each
transaction's units of (step, variant) with the next unit's first send, by ``LEAD``), the outcome of each
unit, and the counts happen in SQL; the statistics run in Python on the small table. ``variant_rows`` reads
the same transactions row by row: the reference the tests hold the aggregation to (worker.experiments.attribute).

Kept apart from the funnel's statements (``repo.funnel_figures``) because it reads more of each transaction:
who settled it (``settled_source``), its ``segment`` and the customer's ``locale`` (from the JSON content,
kept by an erasure), for the breakdowns.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, text

from .funnel import window_sql
from .repo import Store
from .tables import deliveries, transactions

#: Reminders that went out (the funnel's rows: ix_deliveries_funnel's predicate).
WENT_OUT = "d.kind = 'reminder' AND d.status IN ('sent', 'delivered') AND d.sent_at IS NOT NULL"
CHANNELS = ("sms", "email", "push")
#: Quartiles of time to confirm: the SQL returns, per arm, the two ranks around each (n - 1) * q.
QUARTERS = (1, 2, 3)


def _seconds(pg: bool, later: str, earlier: str) -> str:
    if pg:
        return f"CAST(EXTRACT(EPOCH FROM ({later} - {earlier})) AS double precision)"
    return f"ROUND((julianday({later}) - julianday({earlier})) * 86400.0, 3)"


def customer_field(pg: bool, name: str) -> str:
    """SQL for ``content.customer.<name>`` as text (NULL when absent)."""
    return f"(t.content -> 'customer' ->> '{name}')" if pg else f"json_extract(t.content, '$.customer.{name}')"


def _scope(since: datetime | None, schedule: str | None, among: Sequence[str] | None) -> tuple[str, dict[str, Any]]:
    scope, params = window_sql(since, schedule)
    if among is not None:
        names = {f"among_{i}": name for i, name in enumerate(among)}
        scope.append(f"t.schedule IN ({', '.join(':' + k for k in names)})" if names else "1 = 0")
        params.update(names)
    return " AND ".join(scope), params


OUTCOME = """CASE
    WHEN u.status = 'confirmed' AND u.confirmed_at IS NOT NULL AND u.first_sent <= u.confirmed_at
         AND (u.next_sent IS NULL OR u.confirmed_at < u.next_sent)
      THEN CASE u.settled_source WHEN 'customer' THEN 'confirmed_by_customer' WHEN 'ops' THEN 'confirmed_by_ops'
                                 WHEN 'platform' THEN 'confirmed_by_platform' ELSE 'confirmed_other' END
    WHEN u.next_sent IS NOT NULL OR (u.status = 'confirmed' AND u.confirmed_at < u.first_sent) THEN 'moved_on'
    WHEN u.status IN ('cancelled', 'escalated') THEN u.status
    ELSE 'open' END"""
OUTCOMES = ("confirmed_by_customer", "confirmed_by_ops", "confirmed_by_platform", "confirmed_other", "moved_on",
            "cancelled", "escalated", "open")


def variant_figures(store: Store, since: datetime | None, schedule: str | None,
                    among: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One statement. Rows with ``part = 'cell'``: per (schedule, step, variant, segment, locale, sms, email,
    push, concurrent) the units ``reached`` and the count of each outcome (``OUTCOMES``), the earliest
    ``first_sent``, ``created_from`` / ``created_to`` (its transactions' ``created_at`` range) and
    ``first_offset`` (earliest first send after ``created_at``, seconds); ``sms``/``email``/``push`` are 1
    when the unit went out on that channel; ``concurrent`` is 1 when the transaction was created while every
    arm of its step was being sent. Rows with ``part = 'time'``: per (schedule, step, variant), the customer
    confirmations' times to confirm (``seconds``) at the ranks (``rn`` of ``n``) around each quartile.
    ``among``: only these schedules."""
    pg = store.pg
    where, params = _scope(since, schedule, among)
    collate = ' COLLATE "C"' if pg else ""  # ties in first_sent go by step and variant, as Python orders them
    flags = ", ".join(f"MAX(CASE WHEN d.channel = '{c}' THEN 1 ELSE 0 END) AS {c}" for c in CHANNELS)
    counts = ", ".join(f"SUM(CASE WHEN o.outcome = '{k}' THEN 1 ELSE 0 END) AS {k}" for k in OUTCOMES)
    around = ", ".join(f"((o.n - 1) * {q}) / 4 + {k}" for q in QUARTERS for k in (1, 2))
    sql = f"""
        WITH tx AS {"MATERIALIZED" if pg else ""} (
            SELECT t.id, t.schedule, t.status, t.confirmed_at, t.settled_source, t.created_at, t.segment,
                   {customer_field(pg, 'locale')} AS locale
            FROM transactions AS t WHERE {where}),
        units AS (
            SELECT t.schedule, t.status, t.confirmed_at, t.settled_source, t.created_at, t.segment, t.locale,
                   d.step, d.variant, MIN(d.sent_at) AS first_sent, {flags},
                   LEAD(MIN(d.sent_at)) OVER (PARTITION BY t.id ORDER BY MIN(d.sent_at), d.step{collate},
                                              d.variant{collate}) AS next_sent
            FROM tx AS t JOIN deliveries AS d ON d.transaction_id = t.id
            WHERE {WENT_OUT}
            GROUP BY t.id, t.schedule, t.status, t.confirmed_at, t.settled_source, t.created_at, t.segment, t.locale,
                     d.step, d.variant),
        outcomes AS (
            SELECT u.schedule, u.step, u.variant, u.segment, u.locale, u.sms, u.email, u.push, u.created_at,
                   u.first_sent, {OUTCOME} AS outcome,
                   {_seconds(pg, 'u.first_sent', 'u.created_at')} AS first_offset,
                   {_seconds(pg, 'u.confirmed_at', 'u.first_sent')} AS seconds
            FROM units AS u),
        arms AS (
            SELECT schedule, step, variant, MIN(created_at) AS lo, MAX(created_at) AS hi
            FROM outcomes GROUP BY schedule, step, variant),
        bounds AS (
            SELECT schedule, step, MAX(lo) AS lo, MIN(hi) AS hi FROM arms GROUP BY schedule, step),
        cells AS (
            SELECT o.schedule, o.step, o.variant, o.segment, o.locale, o.sms, o.email, o.push,
                   CASE WHEN o.created_at >= b.lo AND o.created_at <= b.hi THEN 1 ELSE 0 END AS concurrent,
                   o.outcome, o.first_sent, o.created_at, o.first_offset
            FROM outcomes AS o JOIN bounds AS b ON b.schedule = o.schedule AND b.step = o.step),
        times AS (
            SELECT schedule, step, variant, seconds,
                   ROW_NUMBER() OVER (PARTITION BY schedule, step, variant ORDER BY seconds) AS rn,
                   COUNT(*) OVER (PARTITION BY schedule, step, variant) AS n
            FROM outcomes WHERE outcome = 'confirmed_by_customer')
        SELECT 'cell' AS part, o.schedule, o.step, o.variant, o.segment, o.locale, o.sms, o.email, o.push,
               o.concurrent, COUNT(*) AS reached, {counts}, MIN(o.first_sent) AS first_sent,
               MIN(o.created_at) AS created_from, MAX(o.created_at) AS created_to,
               MIN(o.first_offset) AS first_offset, NULL AS seconds, NULL AS rn, NULL AS n
        FROM cells AS o
        GROUP BY o.schedule, o.step, o.variant, o.segment, o.locale, o.sms, o.email, o.push, o.concurrent
        UNION ALL
        SELECT 'time', o.schedule, o.step, o.variant, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
               {", ".join("NULL" for _ in OUTCOMES)}, NULL, NULL, NULL, NULL, o.seconds, o.rn, o.n
        FROM times AS o WHERE o.rn IN ({around})"""
    when = transactions.c.created_at.type
    stmt = text(sql).columns(first_sent=when, created_from=when, created_to=when)
    if "since" in params:
        stmt = stmt.bindparams(bindparam("since", type_=when))
    with store.engine.begin() as conn:
        if pg:  # as the funnel: sorts in memory, no JIT, for this transaction only
            conn.execute(text("SET LOCAL work_mem = '64MB'"))
            conn.execute(text("SET LOCAL jit = off"))
        return [dict(r) for r in conn.execute(stmt, params).mappings()]


def variant_rows(store: Store, since: datetime | None, schedule: str | None) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """Row by row, for the reference computation (worker.experiments.attribute): the transactions in scope
    (created at or after ``since``, on ``schedule``), and their reminders that went out (``kind =
    'reminder'``, ``sent``/``delivered``) grouped per (transaction, step, variant, channel) with the earliest
    ``sent_at`` as ``first_sent``."""
    t, d = transactions.c, deliveries.c
    scope = []
    if since is not None:
        scope.append(t.created_at >= since)
    if schedule is not None:
        scope.append(t.schedule == schedule)
    locale = t.content["customer"]["locale"].as_string().label("locale")
    tx_query = select(t.id, t.schedule, t.status, t.created_at, t.confirmed_at, t.cancelled_at, t.escalated_at,
                      t.settled_source, t.segment, locale).where(*scope)
    keys = [d.transaction_id, d.step, d.variant, d.channel]
    dl_query = (select(*keys, func.min(d.sent_at).label("first_sent")).select_from(deliveries.join(transactions))
                .where(d.kind == "reminder", d.status.in_(("sent", "delivered")), *scope).group_by(*keys))
    with store.engine.connect() as conn:
        txs = [dict(r) for r in conn.execute(tx_query).mappings()]
        dls = [dict(r) for r in conn.execute(dl_query).mappings()]
    return txs, dls
