"""The cost figures' roll-up: each rolled-up transaction's billed customer messages (worker/store/rollup.py).

``cost_units`` keeps, per rolled-up transaction and (kind, step, variant), its reminders and notices with
``sent_at`` set: messages by channel, billed SMS segments and where the SMS went (calling code, or the phone's
prefix for an SMS sent before 0008). ``funnel_units.by_customer`` marks a unit whose attributed confirmation
is the customer's own, so /ops and /v1/stats read the customer confirmations per step from the roll-up too.

**Backfill.** The units written before this revision have no cost units, and the roll-up now also waits for a
transaction's notices in flight; so this revision empties the roll-up (``funnel_units``, ``funnel_rolled``,
``funnel_rollup_state``) and the sweep starts over, writing both kinds of units together: the scheduler's
tick a step at a time, or all at once with ``remind db rollup --again`` once no process of the previous
release runs any more (80 s for bench/scale.py's 1,000,000 transactions on two busy cores; its VACUUM ANALYZE
lets both tables be read by index only at once). Until a transaction is rolled up again the funnel and the
costs compute it live: the figures are the same, only slower. The previous release's processes, still running
during a deploy, do not know the cost units: their scheduler's roll-up cannot mark anything rolled
(``funnel_rolled.version`` has no default on PostgreSQL: its inserts fail and its tick logs it), but their web
and workers' changes to a settled transaction forget only its funnel units, and their notices forget nothing;
``--again`` writes anew what was rolled up beside them.

Indexes are built CONCURRENTLY on PostgreSQL, as 0007 and 0009 do (on tables this revision has emptied); the
statistics ``st_cost_units_groups`` tell its planner that a window's cost units fall in a handful of groups
(it aggregates them in parallel then), from the first ANALYZE after the backfill (``remind db rollup``
runs one; autovacuum's otherwise).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

from worker.store.tables import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_ROLLUP = ("funnel_units", "funnel_rolled", "funnel_rollup_state")
_STATISTICS = "st_cost_units_groups"
_COST_FIGURES = ["sms", "sms_segments", "country_code", "prefix", "phone", "email", "push"]
_ATTRIBUTED = {"postgresql_where": sa.text("seconds IS NOT NULL"), "sqlite_where": sa.text("seconds IS NOT NULL")}
#: name, table, columns, options
_INDEXES = (
    ("ix_cost_units_created_at", "cost_units", ["created_at"],
     {"postgresql_include": ["schedule", "kind", "step", "variant", *_COST_FIGURES]}),
)


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    if pg:
        op.execute(f"TRUNCATE {', '.join(_ROLLUP)}")
    else:
        for table in _ROLLUP:
            op.execute(f"DELETE FROM {table}")
    # On PostgreSQL what comes before the concurrent index builds is committed when they start, while
    # alembic_version moves only at the end: a build cancelled (a deploy's timeout, an old snapshot it waited
    # for) leaves the revision to be run again, so each step here may find itself done already.
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    columns = {t: {c["name"] for c in sa.inspect(op.get_bind()).get_columns(t)} for t in ("funnel_units",
                                                                                          "funnel_rolled")}
    if "by_customer" not in columns["funnel_units"]:
        op.add_column("funnel_units", sa.Column("by_customer", sa.Boolean, nullable=False,
                                                server_default=sa.text("false")))
    # which roll-up marked it (rollup.VERSION): without a default on PostgreSQL, the previous release's roll-up,
    # still running in a scheduler during the deploy, cannot insert (the tick logs it and goes on); SQLite, one
    # process, adds a NOT NULL column only with a default
    if "version" not in columns["funnel_rolled"]:
        op.add_column("funnel_rolled", sa.Column("version", sa.SmallInteger, nullable=False,
                                                 server_default=None if pg else sa.text("2")))
    if "cost_units" not in existing:
        _create_cost_units()
    if not pg:  # SQLite's attributed index has no INCLUDE: unchanged
        for name, table, columns_, options in _INDEXES:
            op.create_index(name, table, columns_, **options)
        return
    _concurrent_indexes()


def _create_cost_units() -> None:
    op.create_table(
        "cost_units",
        sa.Column("transaction_id", sa.String(64), sa.ForeignKey("transactions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("step", sa.String(64), primary_key=True),
        sa.Column("variant", sa.String(32), primary_key=True),
        sa.Column("schedule", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("sms", sa.Integer, nullable=False),
        sa.Column("sms_segments", sa.Integer, nullable=False),
        sa.Column("country_code", sa.Integer),
        sa.Column("prefix", sa.String(8)),
        sa.Column("phone", sa.Text),
        sa.Column("email", sa.Integer, nullable=False),
        sa.Column("push", sa.Integer, nullable=False),
    )


def _concurrent_indexes() -> None:
    with op.get_context().autocommit_block():
        # the customer confirmations read the attributed units' by_customer from the index too
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_funnel_units_attributed")
        op.create_index("ix_funnel_units_attributed", "funnel_units", ["created_at"], postgresql_concurrently=True,
                        postgresql_include=["schedule", "step", "variant", "seconds", "by_customer"], **_ATTRIBUTED)
        for name, table, columns, options in _INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")  # a failed concurrent build leaves one behind
            op.create_index(name, table, columns, postgresql_concurrently=True, **options)
    op.execute(f"CREATE STATISTICS IF NOT EXISTS {_STATISTICS} (ndistinct) "
               "ON schedule, kind, step, variant, country_code, prefix FROM cost_units")


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    if pg:
        op.execute(f"DROP STATISTICS IF EXISTS {_STATISTICS}")
    for name, table, _columns, _options in reversed(_INDEXES):
        op.drop_index(name, table)
    op.drop_table("cost_units")
    with op.batch_alter_table("funnel_rolled") as batch:
        batch.drop_column("version")
    if pg:
        op.drop_index("ix_funnel_units_attributed", "funnel_units")
    with op.batch_alter_table("funnel_units") as batch:
        batch.drop_column("by_customer")
    if pg:
        op.create_index("ix_funnel_units_attributed", "funnel_units", ["created_at"],
                        postgresql_include=["schedule", "step", "variant", "seconds"], **_ATTRIBUTED)
