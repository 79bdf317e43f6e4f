"""The funnel's roll-up: each settled transaction's units (step, variant), attributed once (worker/store/rollup.py).

New, empty tables; the scheduler's tick fills them a step at a time, oldest transactions first
(``remind db rollup`` does all of it at once). Until a transaction is rolled up the funnel computes it live,
so the figures are the same before, during and after. Indexes on empty tables need no CONCURRENTLY; they
are still built so on PostgreSQL, as 0007 does, should the migration run again on filled tables.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from worker.store.tables import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_FIGURES = ["first_offset", "sms", "email", "push", "segments", "seconds", "ending"]
#: name, table, columns, options
_INDEXES = (
    ("ix_funnel_rolled_created_at", "funnel_rolled", ["created_at", "transaction_id"],
     {"postgresql_where": sa.text("NOT stale"), "sqlite_where": sa.text("NOT stale")}),
    ("ix_funnel_rolled_stale", "funnel_rolled", ["transaction_id"],
     {"postgresql_where": sa.text("stale"), "sqlite_where": sa.text("stale")}),
    ("ix_funnel_units_created_at", "funnel_units", ["created_at"],
     {"postgresql_include": ["schedule", "step", "variant", *_FIGURES]}),
    ("ix_funnel_units_attributed", "funnel_units", ["created_at"],
     {"postgresql_include": ["schedule", "step", "variant", "seconds"],
      "postgresql_where": sa.text("seconds IS NOT NULL"), "sqlite_where": sa.text("seconds IS NOT NULL")}),
)


def upgrade() -> None:
    tx_id = sa.String(64)
    op.create_table(
        "funnel_rolled",
        sa.Column("transaction_id", tx_id, sa.ForeignKey("transactions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("stale", sa.Boolean, nullable=False),
    )
    op.create_table(
        "funnel_units",
        sa.Column("transaction_id", tx_id, sa.ForeignKey("transactions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("step", sa.String(64), primary_key=True),
        sa.Column("variant", sa.String(32), primary_key=True),
        sa.Column("schedule", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("first_offset", sa.Double, nullable=False),
        sa.Column("sms", sa.Integer, nullable=False),
        sa.Column("email", sa.Integer, nullable=False),
        sa.Column("push", sa.Integer, nullable=False),
        sa.Column("segments", sa.Integer),
        sa.Column("seconds", sa.Double),
        sa.Column("ending", sa.String(16)),
    )
    op.create_table(
        "funnel_rollup_state",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("after_created_at", UTCDateTime),
        sa.Column("after_id", tx_id, sa.ForeignKey("transactions.id", ondelete="CASCADE")),
        sa.Column("low_created_at", UTCDateTime),
    )
    if op.get_bind().dialect.name != "postgresql":
        for name, table, columns, options in _INDEXES:
            op.create_index(name, table, columns, **options)
        return
    with op.get_context().autocommit_block():
        for name, table, columns, options in _INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")  # a failed concurrent build leaves one behind
            op.create_index(name, table, columns, postgresql_concurrently=True, **options)


def downgrade() -> None:
    for name, table, _columns, _options in reversed(_INDEXES):
        op.drop_index(name, table)
    op.drop_table("funnel_rollup_state")
    op.drop_table("funnel_units")
    op.drop_table("funnel_rolled")
