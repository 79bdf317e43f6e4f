"""Suppressions: addresses a customer opted out of, and push tokens the provider says are gone.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from worker.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("address_hash", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(128)),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_deliveries_provider_id", "deliveries", ["provider_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_provider_id", "deliveries")
    op.drop_table("suppressions")
