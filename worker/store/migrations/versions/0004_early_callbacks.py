"""Early provider callbacks: a status that arrived before the worker recorded the provider id.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from worker.store.tables import Id, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "early_callbacks",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("provider_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("code", sa.String(32)),
        sa.Column("received_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_early_callbacks_provider_id", "early_callbacks", ["provider_id"])
    op.create_index("ix_early_callbacks_received_at", "early_callbacks", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_early_callbacks_received_at", "early_callbacks")
    op.drop_index("ix_early_callbacks_provider_id", "early_callbacks")
    op.drop_table("early_callbacks")
