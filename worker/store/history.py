"""Rows for the what-if replay (worker.whatif): the transactions of a period and their reminders that went out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from .repo import Store
from .tables import deliveries, transactions

_TX_COLUMNS = ("id", "schedule", "status", "segment", "content", "created_at", "expires_at", "deadline",
               "confirmed_at", "cancelled_at", "escalated_at", "settled_source")


def history_rows(store: Store, since: datetime | None, until: datetime | None = None) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """Transactions created in [since, until) (every schedule), and their reminder deliveries that went out
    (``sent``/``delivered``), one row each, ordered by transaction and ``sent_at``. Two queries."""
    scope = []
    if since is not None:
        scope.append(transactions.c.created_at >= since)
    if until is not None:
        scope.append(transactions.c.created_at < until)
    d = deliveries.c
    dl = (select(d.transaction_id, d.step, d.channel, d.template, d.variant, d.sent_at, d.segments)
          .select_from(deliveries.join(transactions))
          .where(d.kind == "reminder", d.status.in_(("sent", "delivered")), d.sent_at.is_not(None), *scope)
          .order_by(d.transaction_id, d.sent_at, d.id))
    with store.engine.connect() as conn:
        txs = [dict(r) for r in conn.execute(select(*(transactions.c[n] for n in _TX_COLUMNS)).where(*scope)
                                             .order_by(transactions.c.created_at, transactions.c.id)).mappings()]
        dls = [dict(r) for r in conn.execute(dl).mappings()]
    return txs, dls
