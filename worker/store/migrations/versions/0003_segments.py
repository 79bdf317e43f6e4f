"""SMS segments per delivery, for what the funnel reports as spent.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("segments", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("segments")
