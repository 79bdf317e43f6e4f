"""The SQL schema: the source of truth. Alembic migrations mirror this file."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in Python on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

transactions = Table(
    "transactions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("content", JSON, nullable=False),
    Column("customer_id", String(128), nullable=False, index=True),
    Column("segment", String(32)),
    Column("risk_flag", Boolean, nullable=False),
    Column("amount", Numeric(24, 8), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("schedule", String(64), nullable=False),
    Column("schedule_version", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
    Column("deadline", UTCDateTime, nullable=False),
    Column("registered_at", UTCDateTime, nullable=False),
    # The scheduler's cursor: due time of the newest step handled, and when to look next.
    Column("handled_until", UTCDateTime),
    Column("next_due_at", UTCDateTime),
    Column("confirmed_at", UTCDateTime),
    Column("cancelled_at", UTCDateTime),
    Column("escalated_at", UTCDateTime),
    Column("status_reason", Text),
    # When the customer's name, phone, email and push tokens were erased from ``content`` (on request, or
    # by REMIND_RETENTION_DAYS); NULL while they are held.
    Column("erased_at", UTCDateTime),
    # Who settled it: customer (the link), platform (API, CLI), ops (a review), deadline (the tick); and the
    # operator's name for ops. The audit table keeps every change; these answer "who" for stats at once.
    Column("settled_source", String(16)),
    Column("settled_actor", String(128)),
    # Risk review: NULL, or "contacted" once ops asked the customer to verify (then the customer's own
    # link may confirm the escalated transaction).
    Column("review_state", String(16)),
    Index(
        "ix_transactions_next_due_at",
        "next_due_at",
        postgresql_where="next_due_at IS NOT NULL",
        sqlite_where="next_due_at IS NOT NULL",
    ),
    # The funnel's window (the last 7 days by default): on PostgreSQL it carries every column the
    # funnel reads, so the window is an index-only range scan.
    Index("ix_transactions_created_at", "created_at",
          postgresql_include=["id", "schedule", "status", "confirmed_at", "settled_source"]),
)

#: When a transaction settled (confirmed, cancelled, or escalated for review); NULL while pending.
SETTLED_AT = func.coalesce(transactions.c.confirmed_at, transactions.c.cancelled_at, transactions.c.escalated_at)

# The retention sweep reads the oldest settled transactions that still hold personal data. Only those
# rows are in the index: pending ones (no settled time) and erased ones cost it nothing.
_HOLDS_PERSONAL_DATA = text("erased_at IS NULL AND coalesce(confirmed_at, cancelled_at, escalated_at) IS NOT NULL")
Index("ix_transactions_retention", SETTLED_AT, postgresql_where=_HOLDS_PERSONAL_DATA,
      sqlite_where=_HOLDS_PERSONAL_DATA)

# One row per (transaction, step, channel): a reminder, a final notice, or the platform webhook.
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("transaction_id", String(64), ForeignKey("transactions.id", ondelete="CASCADE"), nullable=False),
    Column("step", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # reminder | notice | webhook
    Column("channel", String(16), nullable=False),  # sms | email | push | webhook
    Column("template", String(64)),
    Column("variant", String(32), nullable=False),
    Column("due_at", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),  # queued | sending | sent | delivered | failed | skipped
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_until", UTCDateTime),
    Column("enqueued_at", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("sent_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("provider_id", String(128), index=True),
    Column("segments", Integer),  # SMS segments billed (GSM-7 / UCS-2), for the funnel
    Column("country_code", Integer),  # an SMS's destination calling code (86, 1), for its price
    UniqueConstraint("transaction_id", "step", "channel", name="uq_deliveries_tx_step_channel"),
    Index(
        "ix_deliveries_lease_until",
        "lease_until",
        postgresql_where="lease_until IS NOT NULL",
        sqlite_where="lease_until IS NOT NULL",
    ),
)

# The funnel reads, per transaction in its window, the reminders that went out: only those rows are in
# the index, with every column it needs (PostgreSQL: an index-only scan per transaction).
_FUNNEL_ROWS = text("kind = 'reminder' AND status IN ('sent', 'delivered') AND sent_at IS NOT NULL")
Index("ix_deliveries_funnel", deliveries.c.transaction_id,
      postgresql_include=["step", "variant", "channel", "sent_at", "segments"],
      postgresql_where=_FUNNEL_ROWS, sqlite_where=_FUNNEL_ROWS)
# /metrics' retries: only deliveries tried more than once are in it.
_RETRIED = text("attempts > 1")
Index("ix_deliveries_retried", deliveries.c.channel, postgresql_include=["attempts"],
      postgresql_where=_RETRIED, sqlite_where=_RETRIED)
#: PostgreSQL statistics on (channel, status) together: /metrics estimates the settled deliveries by
#: channel and status from them on a large table (see repo.metrics_snapshot).
DELIVERY_STATISTICS = "st_deliveries_channel_status"
event.listen(deliveries, "after_create", DDL(
    f"CREATE STATISTICS IF NOT EXISTS {DELIVERY_STATISTICS} (mcv) ON channel, status FROM deliveries"
).execute_if(dialect="postgresql"))

# Addresses that must not be used: an SMS STOP, an email unsubscribe or spam report, a push token
# the provider reports unregistered. Keyed by a hash of (channel, address), so it holds across
# transactions and outlives them.
suppressions = Table(
    "suppressions",
    metadata,
    Column("channel", String(16), primary_key=True),
    Column("address_hash", String(64), primary_key=True),
    Column("customer_id", String(128)),
    Column("reason", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Provider status callbacks that arrived before the worker recorded the message's provider id (Twilio
# can call back within milliseconds of accepting a message). Kept until the id is known, then applied
# and removed; ones never matched (another system's messages on the same account) expire.
early_callbacks = Table(
    "early_callbacks",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("provider", String(16), nullable=False),  # twilio
    Column("provider_id", String(128), nullable=False, index=True),
    Column("status", String(32), nullable=False),
    Column("code", String(32)),
    Column("received_at", UTCDateTime, nullable=False, index=True),
)

# What the platform is told (Standard Webhooks), an outbox written in the same database transaction as
# the change it reports, so no outcome is ever without its event. ``data`` is the snapshot sent on every
# attempt. ``next_attempt_at`` (indexed, partial) is set while the event waits for a (next) attempt or is
# being sent (then it is the lease); retries run for REMIND_EVENT_RETRY_HOURS from the first try.
events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("transaction_id", String(64), ForeignKey("transactions.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("type", String(40), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),  # pending | sending | delivered | failed | unsent
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime),
    Column("give_up_at", UTCDateTime),
    Column("last_error", Text),
    Column("delivered_at", UTCDateTime),
    Index(
        "ix_events_next_attempt_at",
        "next_attempt_at",
        postgresql_where="next_attempt_at IS NOT NULL",
        sqlite_where="next_attempt_at IS NOT NULL",
    ),
)

# The audit trail: who or what changed a transaction (customer link, platform API, CLI, ops with a name,
# the deadline), ops actions, and the provider events that came back (delivered, undelivered, bounced).
audit = Table(
    "audit",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("transaction_id", String(64), ForeignKey("transactions.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("at", UTCDateTime, nullable=False),
    Column("action", String(32), nullable=False),  # confirmed | cancelled | escalated | contacted | delivered | ...
    Column("source", String(16), nullable=False),  # customer | platform | cli | ops | deadline | provider
    Column("actor", String(128)),
    Column("note", Text),
)

# The funnel's roll-up (worker/store/rollup.py): a settled transaction's (step, variant) units, attributed once,
# so /ops and /v1/stats read them instead of attributing every sent reminder of the window again.
# ``funnel_rolled`` says which transactions are rolled up (with or without units); ``stale`` is set by a
# writer that changes a rolled transaction (an ops decision, a late failure report, a notice, an erasure of an
# older SMS's phone), whose units and cost units it deletes in the same database transaction: until it is
# rolled again, the funnel and the costs compute it live.
funnel_rolled = Table(
    "funnel_rolled",
    metadata,
    Column("transaction_id", String(64), ForeignKey("transactions.id", ondelete="CASCADE"), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),  # the transaction's, for the window
    Column("stale", Boolean, nullable=False),
    # which roll-up wrote it (rollup.VERSION); no default on PostgreSQL, so the roll-up of a scheduler still
    # running the previous release during a deploy fails instead of writing units this release reads wrongly
    Column("version", SmallInteger, nullable=False),
    # the funnel's live side: which transactions of the window are rolled up (index only)
    Index("ix_funnel_rolled_created_at", "created_at", "transaction_id", postgresql_where=text("NOT stale"),
          sqlite_where=text("NOT stale")),
    Index("ix_funnel_rolled_stale", "transaction_id", postgresql_where=text("stale"), sqlite_where=text("stale")),
)

#: What a unit carries: the columns the funnel sums, and its attribution (see rollup.units_sql).
FUNNEL_UNIT_FIGURES = ("first_offset", "sms", "email", "push", "segments", "seconds", "ending")
funnel_units = Table(
    "funnel_units",
    metadata,
    Column("transaction_id", String(64), ForeignKey("transactions.id", ondelete="CASCADE"), primary_key=True),
    Column("step", String(64), primary_key=True),
    Column("variant", String(32), primary_key=True),
    Column("schedule", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("first_offset", Double, nullable=False),  # seconds from created_at to the unit's first sent
    Column("sms", Integer, nullable=False),  # its messages that went out, by channel
    Column("email", Integer, nullable=False),
    Column("push", Integer, nullable=False),
    Column("segments", Integer),  # its SMS segments; NULL when none was recorded
    Column("seconds", Double),  # first sent -> confirmed_at when the confirmation is attributed to it, else NULL
    Column("ending", String(16)),  # cancelled | escalated: the transaction ended so with this unit its last
    # the confirmation attributed to it (``seconds``) is the customer's own (settled_source = 'customer')
    Column("by_customer", Boolean, nullable=False, server_default=text("false")),
    Index("ix_funnel_units_created_at", "created_at",
          postgresql_include=["schedule", "step", "variant", *FUNNEL_UNIT_FIGURES]),
    # the medians and the customer confirmations: only the units a confirmation is attributed to
    Index("ix_funnel_units_attributed", "created_at",
          postgresql_include=["schedule", "step", "variant", "seconds", "by_customer"],
          postgresql_where=text("seconds IS NOT NULL"), sqlite_where=text("seconds IS NOT NULL")),
)

# The cost figures' roll-up (worker/store/rollup.py, migration 0010): a rolled-up transaction's billed customer
# messages (reminders and notices with sent_at set) per (kind, step, variant), written and forgotten with its
# funnel units, so /ops and /v1/stats price them without reading the window's deliveries.
#: What a cost unit carries (see rollup.cost_units_sql).
COST_UNIT_FIGURES = ("sms", "sms_segments", "country_code", "prefix", "phone", "email", "push")
cost_units = Table(
    "cost_units",
    metadata,
    Column("transaction_id", String(64), ForeignKey("transactions.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(16), primary_key=True),  # reminder | notice
    Column("step", String(64), primary_key=True),
    Column("variant", String(32), primary_key=True),
    Column("schedule", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),  # the transaction's, for the window
    Column("sms", Integer, nullable=False),  # its billed messages, by channel
    Column("sms_segments", Integer, nullable=False),  # billed SMS segments (1 for an SMS without a count)
    Column("country_code", Integer),  # the SMS's destination calling code, when recorded
    Column("prefix", String(8)),  # else the first 4 characters of the transaction's phone, "*" when masked
    Column("phone", Text),  # and that phone
    Column("email", Integer, nullable=False),
    Column("push", Integer, nullable=False),
    Index("ix_cost_units_created_at", "created_at",
          postgresql_include=["schedule", "kind", "step", "variant", *COST_UNIT_FIGURES]),
)
#: PostgreSQL statistics on the cost figures' groups together: a handful, not one per row as the columns
#: apart would suggest, so the planner aggregates a window's cost units in parallel workers.
COST_STATISTICS = "st_cost_units_groups"
event.listen(cost_units, "after_create", DDL(
    f"CREATE STATISTICS IF NOT EXISTS {COST_STATISTICS} (ndistinct) "
    "ON schedule, kind, step, variant, country_code, prefix FROM cost_units").execute_if(dialect="postgresql"))

# Where the roll-up's sweep over transactions (by created_at, id) has got to, and the oldest transaction it
# had to leave (pending, or a reminder in flight), where the next round starts. The cursor's foreign key
# empties the row with the table (TRUNCATE … CASCADE), so the sweep starts over.
funnel_rollup_state = Table(
    "funnel_rollup_state",
    metadata,
    Column("name", String(16), primary_key=True),
    Column("after_created_at", UTCDateTime),
    Column("after_id", String(64), ForeignKey("transactions.id", ondelete="CASCADE")),
    Column("low_created_at", UTCDateTime),
)
