"""Transactions and their deliveries.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from worker.store.tables import Id, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transactions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("content", sa.JSON, nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("segment", sa.String(32)),
        sa.Column("risk_flag", sa.Boolean, nullable=False),
        sa.Column("amount", sa.Numeric(24, 8), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("schedule", sa.String(64), nullable=False),
        sa.Column("schedule_version", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("deadline", UTCDateTime, nullable=False),
        sa.Column("registered_at", UTCDateTime, nullable=False),
        sa.Column("handled_until", UTCDateTime),
        sa.Column("next_due_at", UTCDateTime),
        sa.Column("confirmed_at", UTCDateTime),
        sa.Column("cancelled_at", UTCDateTime),
        sa.Column("escalated_at", UTCDateTime),
        sa.Column("status_reason", sa.Text),
    )
    op.create_index("ix_transactions_customer_id", "transactions", ["customer_id"])
    op.create_index(
        "ix_transactions_next_due_at", "transactions", ["next_due_at"],
        postgresql_where=sa.text("next_due_at IS NOT NULL"), sqlite_where=sa.text("next_due_at IS NOT NULL"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("transaction_id", sa.String(64), sa.ForeignKey("transactions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("template", sa.String(64)),
        sa.Column("variant", sa.String(32), nullable=False),
        sa.Column("due_at", UTCDateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_until", UTCDateTime),
        sa.Column("enqueued_at", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("sent_at", UTCDateTime),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("provider_id", sa.String(128)),
        sa.UniqueConstraint("transaction_id", "step", "channel", name="uq_deliveries_tx_step_channel"),
    )
    op.create_index(
        "ix_deliveries_lease_until", "deliveries", ["lease_until"],
        postgresql_where=sa.text("lease_until IS NOT NULL"), sqlite_where=sa.text("lease_until IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("transactions")
