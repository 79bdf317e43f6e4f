"""Scale: the indexes the 7-day funnel and /metrics read, and (channel, status) statistics on deliveries.

On PostgreSQL every index is built with CREATE INDEX CONCURRENTLY (outside the migration's transaction),
so a live system keeps registering and sending while a large table is indexed.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_FUNNEL_ROWS = sa.text("kind = 'reminder' AND status IN ('sent', 'delivered') AND sent_at IS NOT NULL")
_RETRIED = sa.text("attempts > 1")
_STATISTICS = "st_deliveries_channel_status"

#: name, table, columns, options
_INDEXES = (
    ("ix_transactions_created_at", "transactions", ["created_at"],
     {"postgresql_include": ["id", "schedule", "status", "confirmed_at", "settled_source"]}),
    ("ix_deliveries_funnel", "deliveries", ["transaction_id"],
     {"postgresql_include": ["step", "variant", "channel", "sent_at", "segments"],
      "postgresql_where": _FUNNEL_ROWS, "sqlite_where": _FUNNEL_ROWS}),
    ("ix_deliveries_retried", "deliveries", ["channel"],
     {"postgresql_include": ["attempts"], "postgresql_where": _RETRIED, "sqlite_where": _RETRIED}),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for name, table, columns, options in _INDEXES:
            op.create_index(name, table, columns, **options)
        return
    with op.get_context().autocommit_block():
        for name, table, columns, options in _INDEXES:
            # A concurrent build that failed leaves an invalid index behind: drop it before trying again.
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.create_index(name, table, columns, postgresql_concurrently=True, **options)
        op.execute(f"CREATE STATISTICS IF NOT EXISTS {_STATISTICS} (mcv) ON channel, status FROM deliveries")
        op.execute("ANALYZE transactions")
        op.execute("ANALYZE deliveries")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP STATISTICS IF EXISTS {_STATISTICS}")
    for name, table, _columns, _options in reversed(_INDEXES):
        op.drop_index(name, table)
