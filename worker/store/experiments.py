"""Rows for the variant comparison (worker/experiments.py): two queries, the attribution in Python.

Kept apart from the funnel's query (``repo.funnel_rows``) because it reads more of each transaction:
who settled it (``settled_source``), its ``segment`` and the customer's ``locale`` (from the JSON
content, kept by an erasure), for the breakdowns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from .repo import Store
from .tables import deliveries, transactions


def variant_rows(store: Store, since: datetime | None, schedule: str | None) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """The transactions in scope (created at or after ``since``, on ``schedule``), and their reminders that
    went out (``kind = 'reminder'``, ``sent``/``delivered``) grouped per (transaction, step, variant, channel)
    with the earliest ``sent_at`` as ``first_sent``."""
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
