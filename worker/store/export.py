"""Rows for the cost figures and the stats export (worker/export.py).

``export_rows`` (the export, and the row-by-row reference the tests hold the aggregate to): plain SQL, no
attribution, three queries at most: the transactions in scope; their customer messages the provider accepted
(``sent_at`` set: reminders and notices, not platform webhooks), grouped per (transaction, kind, step,
variant, channel, destination calling code); and, only for SMS sent before migration 0008 recorded
the calling code, those transactions' phones.

``cost_figures`` (``/v1/stats``, ``/ops``): aggregated by the database, rolled-up transactions read from the
roll-up (worker/store/rollup.py) and the others computed live, as the funnel does.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, func, select, text

from .funnel import window_sql
from .repo import Store
from .rollup import FUNNEL_ROWS, NOT_ROLLED, cost_units_sql
from .tables import deliveries, transactions

#: Delivery statuses of a message that went out (the funnel's "reached").
WENT_OUT = ("sent", "delivered")
#: Channels that message a customer (and cost money); ``webhook`` rows are the platform's.
CUSTOMER_CHANNELS = ("sms", "email", "push")


def _scope(since: datetime | None, until: datetime | None, schedule: str | None,
           ids: Iterable[str] | None) -> list:
    t = transactions.c
    where = []
    if since is not None:
        where.append(t.created_at >= since)
    if until is not None:
        where.append(t.created_at < until)
    if schedule is not None:
        where.append(t.schedule == schedule)
    if ids is not None:
        where.append(t.id.in_(list(ids)))
    return where


def export_rows(store: Store, *, since: datetime | None = None, until: datetime | None = None,
                schedule: str | None = None, ids: Iterable[str] | None = None) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], dict[str, str | None]]:
    """(transactions, message groups, phones).

    - transactions created in [since, until) (and on ``schedule``, or among ``ids``): id, schedule,
      segment, status, created_at, confirmed_at, settled_source;
    - their customer messages the provider accepted, per (transaction_id, kind, step, variant, channel,
      country_code): ``messages``, ``first_sent`` (the earliest ``sent_at`` among those still sent or
      delivered, None when every one was later reported failed), ``went_out`` (how many are still sent
      or delivered), ``segments`` (sum of the recorded SMS segments, None when none were recorded) and
      ``billed_segments`` (a row without a count bills 1 segment);
    - ``customer.phone`` of the transactions with an SMS whose calling code was not recorded (None
      when it was erased since)."""
    scope = _scope(since, until, schedule, ids)
    t, d = transactions.c, deliveries.c
    tx_cols = [t.id, t.schedule, t.segment, t.status, t.created_at, t.confirmed_at, t.settled_source]
    keys = [d.transaction_id, d.kind, d.step, d.variant, d.channel, d.country_code]
    went_out = d.status.in_(WENT_OUT)
    figures = [
        func.count().label("messages"),
        func.min(case((went_out, d.sent_at))).label("first_sent"),
        func.sum(case((went_out, 1), else_=0)).label("went_out"),
        func.sum(d.segments).label("segments"),
        func.sum(func.coalesce(d.segments, 1)).label("billed_segments"),
    ]
    grouped = (select(*keys, *figures).select_from(deliveries.join(transactions))
               .where(d.kind.in_(("reminder", "notice")), d.channel.in_(CUSTOMER_CHANNELS),
                      d.sent_at.is_not(None), *scope)
               .group_by(*keys))
    with store.engine.connect() as conn:
        txs = [dict(r) for r in conn.execute(select(*tx_cols).where(*scope)).mappings()]
        groups = [dict(r) for r in conn.execute(grouped).mappings()]
        unknown = sorted({g["transaction_id"] for g in groups if g["channel"] == "sms" and g["country_code"] is None})
        phones: dict[str, str | None] = {}
        for i in range(0, len(unknown), 500):
            chunk = unknown[i:i + 500]
            for tx_id, content in conn.execute(select(t.id, t.content).where(t.id.in_(chunk))):
                phones[tx_id] = ((content or {}).get("customer") or {}).get("phone")
    for g in groups:
        g["went_out"] = int(g["went_out"] or 0)
        g["billed_segments"] = int(g["billed_segments"] or 0)
    return txs, groups, phones


def cost_figures(store: Store, *, since: datetime | None = None, schedule: str | None = None,
                 priced: bool = True, rolled: bool = True) -> tuple[
                     list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The cost figures aggregated by the database, never per transaction (for ``/v1/stats`` and ``/ops``):

    - per schedule: ``transactions`` and ``customer_confirmations`` (confirmed, ``settled_source =
      'customer'``) of those created at or after ``since``;
    - their customer messages the provider accepted, per (schedule, kind, step, variant, channel,
      country_code): ``messages`` and ``billed_segments``. An SMS without a recorded calling code (before
      migration 0008) is grouped by the first four characters of the transaction's phone instead, with
      ``phone`` one of them: phones are E.164 (ingest), and calling codes are prefix-free, so those four
      characters fix the code; the masked (erased) phones are one group (prefix ``*``). An email or a push
      has no calling code (its price does not depend on one) and bills its messages. Not read unless ``priced``
      (without a price table every cost is null);
    - per (schedule, step, variant): ``customer_confirmations`` attributed to it as in the funnel (the
      last step first sent at or before the confirmation; ties by step and variant), from the customers'
      confirmed transactions only.

    The messages and the attributions of rolled-up transactions are read from the roll-up (``cost_units``,
    ``funnel_units``: worker/store/rollup.py), the others' computed live, each in one statement, so a
    transaction is counted on exactly one side; ``rolled=False`` computes all of them live (the tests)."""
    t = transactions.c
    scope = _scope(since, None, schedule, None)
    customer = and_(t.status == "confirmed", t.settled_source == "customer", t.confirmed_at.is_not(None))
    totals = (select(t.schedule, func.count().label("transactions"),
                     func.sum(case((customer, 1), else_=0)).label("customer_confirmations"))
              .where(*scope).group_by(t.schedule))
    window, params = window_sql(since, schedule)
    with store.engine.begin() as conn:
        if store.pg:  # the live side's messages by transaction, through uq_deliveries_tx_step_channel, rather
            # than a scan of the whole table: random reads priced as on SSD storage, for this transaction only
            conn.execute(text("SET LOCAL random_page_cost = 1.1"))
            conn.execute(text("SET LOCAL work_mem = '64MB'"))
            conn.execute(text("SET LOCAL jit = off"))
        schedules = [dict(r) for r in conn.execute(totals).mappings()]
        groups = _read(conn, _billed_sql(store.pg, window, rolled), since, params) if priced else []
        attributed = _read(conn, _customer_confirmations_sql(store.pg, window, rolled), since, params)
    for s in schedules:
        s["customer_confirmations"] = int(s["customer_confirmations"] or 0)
    for g in groups:
        g["messages"] = int(g["messages"])
        g["billed_segments"] = int(g["billed_segments"] or 0)
    for r in attributed:
        r["customer_confirmations"] = int(r["customer_confirmations"])
    return schedules, groups, attributed


def _read(conn: Any, sql: str, since: datetime | None, params: dict[str, Any]) -> list[dict[str, Any]]:
    stmt = text(sql)
    if since is not None:
        stmt = stmt.bindparams(bindparam("since", type_=transactions.c.created_at.type))
    return [dict(r) for r in conn.execute(stmt, params).mappings()]


def _sides(window: list[str], rolled: bool) -> tuple[str | None, str]:
    """(the rolled-up side's condition on ``r``, or None; the live side's on ``t``) for the window's
    conditions on ``t``: the rolled-up rows keep the transaction's created_at and schedule."""
    where = " AND ".join(window)
    if not rolled:
        return None, where
    since = " AND f.created_at >= :since" if ":since" in where else ""
    return where.replace("t.", "r."), f"{where} AND {NOT_ROLLED.format(window=since)}"


def _billed_sql(pg: bool, window: list[str], rolled: bool) -> str:
    """The window's billed customer messages per (schedule, kind, step, variant, channel, country_code,
    prefix): the cost units (rollup.cost_units_sql) of rolled-up transactions from ``cost_units``
    (ix_cost_units_created_at), the others' computed live, each side summed per group (so the rolled-up side
    is one aggregate over an index, in parallel on PostgreSQL), then both together, then split by channel."""
    kept, live = _sides(window, rolled)
    keys = "schedule, kind, step, variant"

    def summed(source: str) -> str:
        return (f"SELECT {keys}, country_code, prefix, MIN(phone) AS phone, SUM(sms) AS sms, "
                f"SUM(sms_segments) AS sms_segments, SUM(email) AS email, SUM(push) AS push "
                f"FROM {source} GROUP BY {keys}, country_code, prefix")

    sides = [summed(f"({cost_units_sql(pg, live)}) AS l")]
    if kept:
        sides.append(summed(f"cost_units AS r WHERE {kept}"))
    by_channel = " UNION ALL ".join(
        f"SELECT {keys}, '{c}' AS channel, {cc} AS country_code, {prefix} AS prefix, {phone} AS phone, "
        f"{c} AS messages, {billed} AS billed_segments FROM grouped WHERE {c} > 0"
        for c, cc, prefix, phone, billed in (("sms", "country_code", "prefix", "phone", "sms_segments"),
                                             ("email", "NULL", "NULL", "NULL", "email"),
                                             ("push", "NULL", "NULL", "NULL", "push")))
    both = " UNION ALL ".join(sides)
    materialized = " MATERIALIZED" if pg else ""  # read three times: computed once
    return f"""
        WITH grouped AS{materialized} ({summed(f"({both}) AS u")})
        SELECT {keys}, channel, country_code, prefix, MIN(phone) AS phone, SUM(messages) AS messages,
               SUM(billed_segments) AS billed_segments
        FROM ({by_channel}) AS c GROUP BY {keys}, channel, country_code, prefix"""


def _customer_confirmations_sql(pg: bool, window: list[str], rolled: bool) -> str:
    """Per (schedule, step, variant), the customer confirmations attributed to it: the rolled-up units
    (``funnel_units``, ix_funnel_units_attributed) whose attributed confirmation is the customer's, and for the
    other transactions, of each customer-confirmed one's reminders that went out at or before its confirmation
    (ix_deliveries_funnel), grouped per (step, variant) with their first send, the last in (first send, step,
    variant) order: the funnel's attribution (rollup.units_sql), read for the customers' confirmations only."""
    kept, live = _sides(window, rolled)
    collate = ' COLLATE "C"' if pg else ""
    rolled_up = (f"""SELECT r.schedule, r.step, r.variant, COUNT(*) AS n FROM funnel_units AS r
            WHERE {kept} AND r.seconds IS NOT NULL AND r.by_customer
            GROUP BY r.schedule, r.step, r.variant UNION ALL """ if kept else "")
    return f"""
        SELECT c.schedule, c.step, c.variant, SUM(c.n) AS customer_confirmations FROM (
            {rolled_up}SELECT u.schedule, u.step, u.variant, COUNT(*) AS n FROM (
                SELECT t.schedule, d.step, d.variant,
                       ROW_NUMBER() OVER (PARTITION BY t.id ORDER BY MIN(d.sent_at) DESC, d.step{collate} DESC,
                                          d.variant{collate} DESC) AS last
                FROM transactions AS t JOIN deliveries AS d ON d.transaction_id = t.id
                WHERE {live} AND t.status = 'confirmed' AND t.settled_source = 'customer'
                  AND t.confirmed_at IS NOT NULL AND {FUNNEL_ROWS} AND d.sent_at <= t.confirmed_at
                GROUP BY t.id, d.step, d.variant) AS u
            WHERE u.last = 1
            GROUP BY u.schedule, u.step, u.variant) AS c
        GROUP BY c.schedule, c.step, c.variant"""
