"""The SQL store: the source of truth. The only package that knows SQLAlchemy."""

from .db import make_engine, normalize_url
from .funnel import funnel_figures, funnel_rows
from .history import history_rows
from .migrate import upgrade
from .repo import (
    CANCELLED,
    CONFIRMED,
    ESCALATED,
    PENDING,
    SETTLED,
    Cursor,
    NewDelivery,
    NewTransaction,
    Store,
    metrics_snapshot,
)

__all__ = ["CANCELLED", "CONFIRMED", "ESCALATED", "PENDING", "SETTLED", "Cursor", "NewDelivery",
           "NewTransaction", "Store", "funnel_figures", "funnel_rows", "history_rows", "make_engine",
           "metrics_snapshot", "normalize_url", "upgrade"]
