"""Events to the platform (an outbox with its own retries), the audit trail, who settled a transaction.

Platform webhooks used to be rows of ``deliveries`` (kind ``webhook``); the ones not yet delivered move to
``events`` here, so an upgrade loses none.

Revision ID: 0006
Revises: 0005
"""

import json
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from worker.store.tables import Id, UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_HAS_NEXT = "next_attempt_at IS NOT NULL"


def upgrade() -> None:
    op.add_column("transactions", sa.Column("settled_source", sa.String(16)))
    op.add_column("transactions", sa.Column("settled_actor", sa.String(128)))
    op.add_column("transactions", sa.Column("review_state", sa.String(16)))
    op.create_table(
        "events",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("transaction_id", sa.String(64), sa.ForeignKey("transactions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("give_up_at", UTCDateTime),
        sa.Column("last_error", sa.Text),
        sa.Column("delivered_at", UTCDateTime),
    )
    op.create_index("ix_events_transaction_id", "events", ["transaction_id"])
    op.create_index("ix_events_next_attempt_at", "events", ["next_attempt_at"],
                    postgresql_where=sa.text(_HAS_NEXT), sqlite_where=sa.text(_HAS_NEXT))
    op.create_table(
        "audit",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("transaction_id", sa.String(64), sa.ForeignKey("transactions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128)),
        sa.Column("note", sa.Text),
    )
    op.create_index("ix_audit_transaction_id", "audit", ["transaction_id"])
    _move_webhook_rows()


def _move_webhook_rows() -> None:
    """Webhook deliveries not yet delivered become pending events (the same facts the old sender used)."""
    bind = op.get_bind()
    d = sa.table("deliveries", sa.column("id", Id), sa.column("kind", sa.String), sa.column("status", sa.String),
                 sa.column("template", sa.String), sa.column("due_at", UTCDateTime),
                 sa.column("transaction_id", sa.String), sa.column("lease_until", UTCDateTime),
                 sa.column("reason", sa.Text))
    t = sa.table("transactions", sa.column("id", sa.String), sa.column("status", sa.String),
                 sa.column("status_reason", sa.Text), sa.column("customer_id", sa.String),
                 sa.column("currency", sa.String), sa.column("content", sa.JSON),
                 sa.column("cancelled_at", UTCDateTime), sa.column("escalated_at", UTCDateTime))
    e = sa.table("events", sa.column("transaction_id", sa.String), sa.column("type", sa.String),
                 sa.column("data", sa.JSON), sa.column("created_at", UTCDateTime), sa.column("status", sa.String),
                 sa.column("attempts", sa.Integer), sa.column("next_attempt_at", UTCDateTime),
                 sa.column("give_up_at", UTCDateTime))
    rows = bind.execute(sa.select(
        d.c.id.label("delivery_id"), d.c.template, d.c.due_at, t.c.status, t.c.status_reason, t.c.customer_id,
        t.c.currency, t.c.content, t.c.cancelled_at, t.c.escalated_at).join(t, t.c.id == d.c.transaction_id).where(
        d.c.kind == "webhook", d.c.status.in_(("queued", "sending", "failed")))).mappings().all()
    now = datetime.now(UTC)
    for r in rows:
        content = r["content"] if isinstance(r["content"], dict) else json.loads(r["content"])
        kind = r["template"] or f"transaction.{r['status']}"
        failed = kind == "reminder.failed"
        at = r["due_at"] if failed else (r["cancelled_at"] or r["escalated_at"] or r["due_at"])
        data = {"id": content["id"],
                "status": r["status"] if failed else kind.removeprefix("transaction."),
                "source": None if failed else "deadline", "actor": None,
                "reason": "undeliverable" if failed else r["status_reason"],
                "at": at.isoformat().replace("+00:00", "Z"), "amount": content["amount"],
                "currency": r["currency"], "customer_id": r["customer_id"]}
        bind.execute(sa.insert(e).values(transaction_id=content["id"], type=kind, data=data, created_at=now,
                                         status="pending", attempts=0, next_attempt_at=now,
                                         give_up_at=now + timedelta(days=3)))
        bind.execute(sa.update(d).where(d.c.id == r["delivery_id"]).values(
            status="skipped", lease_until=None, reason="moved to the events table"))


def downgrade() -> None:
    op.drop_table("audit")
    op.drop_index("ix_events_next_attempt_at", "events")
    op.drop_table("events")
    op.drop_column("transactions", "review_state")
    op.drop_column("transactions", "settled_actor")
    op.drop_column("transactions", "settled_source")
