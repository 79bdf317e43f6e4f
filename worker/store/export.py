"""Rows for the cost figures and the stats export (worker/export.py): plain SQL, no attribution.

Three queries at most: the transactions in scope; their customer messages the provider accepted
(``sent_at`` set: reminders and notices, not platform webhooks), grouped per (transaction, kind, step,
variant, channel, destination calling code); and, only for SMS sent before migration 0008 recorded
the calling code, those transactions' phones.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, func, select, text

from .funnel import window_sql
from .repo import Store
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
                 priced: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The cost figures aggregated by the database, never per transaction (for ``/v1/stats`` and ``/ops``):

    - per schedule: ``transactions`` and ``customer_confirmations`` (confirmed, ``settled_source =
      'customer'``) of those created at or after ``since``;
    - their customer messages the provider accepted, per (schedule, kind, step, variant, channel,
      country_code): ``messages`` and ``billed_segments``. An SMS without a recorded calling code (before
      migration 0008) is grouped by the first four characters of the transaction's phone instead, with
      ``phone`` one of them: phones are E.164 (ingest), and calling codes are prefix-free, so those four
      characters fix the code; the masked (erased) phones are one group (prefix ``*``). Not read unless ``priced``
      (without a price table every cost is null);
    - per (schedule, step, variant): ``customer_confirmations`` attributed to it as in the funnel (the
      last step first sent at or before the confirmation; ties by step and variant), from the customers'
      confirmed transactions only."""
    t, d = transactions.c, deliveries.c
    scope = _scope(since, None, schedule, None)
    customer = and_(t.status == "confirmed", t.settled_source == "customer", t.confirmed_at.is_not(None))
    totals = (select(t.schedule, func.count().label("transactions"),
                     func.sum(case((customer, 1), else_=0)).label("customer_confirmations"))
              .where(*scope).group_by(t.schedule))
    legacy = and_(d.channel == "sms", d.country_code.is_(None))
    phone = t.content["customer"]["phone"].as_string()
    # one key, not two: the planner then expects few enough groups to hash them, rather than sort every row
    prefix = case((legacy, case((phone.like("%*%"), "*"), else_=func.substr(phone, 1, 4)))).label("prefix")
    keys = [t.schedule, d.kind, d.step, d.variant, d.channel, d.country_code]
    grouped = (select(*keys, prefix, func.min(case((legacy, phone))).label("phone"),
                      func.count().label("messages"),
                      func.sum(func.coalesce(d.segments, 1)).label("billed_segments"))
               .select_from(deliveries.join(transactions))
               .where(d.kind.in_(("reminder", "notice")), d.channel.in_(CUSTOMER_CHANNELS), d.sent_at.is_not(None),
                      *scope)
               .group_by(*keys, text("prefix")))  # by name: the expression once
    with store.engine.begin() as conn:
        if store.pg:  # the window's messages by transaction, through uq_deliveries_tx_step_channel, rather than
            # a scan of the whole table: random reads priced as on SSD storage, for this transaction only
            conn.execute(text("SET LOCAL random_page_cost = 1.1"))
            conn.execute(text("SET LOCAL work_mem = '64MB'"))
            conn.execute(text("SET LOCAL jit = off"))
        schedules = [dict(r) for r in conn.execute(totals).mappings()]
        groups = [dict(r) for r in conn.execute(grouped).mappings()] if priced else []
        attributed = _customer_confirmations(conn, store.pg, since, schedule)
    for s in schedules:
        s["customer_confirmations"] = int(s["customer_confirmations"] or 0)
    for g in groups:
        g["billed_segments"] = int(g["billed_segments"] or 0)
    return schedules, groups, attributed


def _customer_confirmations(conn: Any, pg: bool, since: datetime | None, schedule: str | None
                            ) -> list[dict[str, Any]]:
    """Per (schedule, step, variant), the customer confirmations attributed to it: of each confirmed
    transaction's reminders that went out at or before its confirmation (ix_deliveries_funnel), grouped
    per (step, variant) with their first send, the last in (first send, step, variant) order. Only the
    units before the confirmation are read, and only of the customers' confirmations."""
    scope, params = window_sql(since, schedule)
    scope += ["t.status = 'confirmed'", "t.settled_source = 'customer'", "t.confirmed_at IS NOT NULL"]
    collate = ' COLLATE "C"' if pg else ""
    stmt = text(f"""
        SELECT u.schedule, u.step, u.variant, COUNT(*) AS customer_confirmations FROM (
            SELECT t.schedule, d.step, d.variant,
                   ROW_NUMBER() OVER (PARTITION BY t.id ORDER BY MIN(d.sent_at) DESC, d.step{collate} DESC,
                                      d.variant{collate} DESC) AS last
            FROM transactions AS t JOIN deliveries AS d ON d.transaction_id = t.id
            WHERE {" AND ".join(scope)} AND d.kind = 'reminder' AND d.status IN ('sent', 'delivered')
              AND d.sent_at IS NOT NULL AND d.sent_at <= t.confirmed_at
            GROUP BY t.id, d.step, d.variant) AS u
        WHERE u.last = 1
        GROUP BY u.schedule, u.step, u.variant""")
    if since is not None:
        stmt = stmt.bindparams(bindparam("since", type_=transactions.c.created_at.type))
    return [{**r, "customer_confirmations": int(r["customer_confirmations"])}
            for r in conn.execute(stmt, params).mappings()]
