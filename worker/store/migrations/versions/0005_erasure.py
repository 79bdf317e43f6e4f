"""Personal data erasure: when a transaction's personal data was erased, and the retention sweep's index.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from worker.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_SETTLED_AT = sa.text("coalesce(confirmed_at, cancelled_at, escalated_at)")
_HOLDS_PERSONAL_DATA = sa.text("erased_at IS NULL AND coalesce(confirmed_at, cancelled_at, escalated_at) IS NOT NULL")


def upgrade() -> None:
    op.add_column("transactions", sa.Column("erased_at", UTCDateTime))
    if op.get_bind().dialect.name != "postgresql":
        op.create_index("ix_transactions_retention", "transactions", [_SETTLED_AT], sqlite_where=_HOLDS_PERSONAL_DATA)
        return
    # Built CONCURRENTLY: a plain CREATE INDEX would block every write to transactions (registrations,
    # confirmations, the tick) for as long as it takes on a large table.
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_transactions_retention")  # a failed build's leftover
        op.create_index("ix_transactions_retention", "transactions", [_SETTLED_AT], postgresql_concurrently=True,
                        postgresql_where=_HOLDS_PERSONAL_DATA)


def downgrade() -> None:
    op.drop_index("ix_transactions_retention", "transactions")
    op.drop_column("transactions", "erased_at")
