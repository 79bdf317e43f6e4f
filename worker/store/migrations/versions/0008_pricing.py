"""The destination's country calling code on each SMS delivery, for what it cost (worker/pricing.py).

Written at send time: an erased transaction keeps only a masked phone, and the price depends on where the
message went. Rows sent before this have none; the cost falls back to the transaction's phone, then to
pricing.yaml's default.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("country_code", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("country_code")
