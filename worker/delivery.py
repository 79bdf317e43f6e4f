"""Deliver one delivery: re-check the transaction, render, send, record. Idempotent by construction:
only a delivery still ``queued`` is sent, and the row lock makes duplicates wait and then do nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jinja2 import TemplateError

from .errors import PermanentSendError, TransientSendError
from .links import confirm_url
from .masking import mask_recipient
from .render import Templates, facts_for
from .senders import OutgoingMessage, Sender
from .store import CANCELLED, ESCALATED, PENDING, Store

log = logging.getLogger("remind.delivery")

#: The status a transaction must still have when each kind of delivery goes out.
REQUIRED_STATUS = {"reminder": (PENDING,), "notice": (CANCELLED, ESCALATED), "webhook": (CANCELLED, ESCALATED)}


@dataclass(frozen=True)
class DeliveryOptions:
    public_base: str
    secret_key: str
    restart_url: str
    webhook_url: str | None
    lease: timedelta
    max_attempts: int
    webhook_max_attempts: int


def webhook_body(tx: dict[str, Any]) -> str:
    """The event the platform receives; built from stored facts only, so every retry is identical."""
    status = tx["status"]
    at = tx["cancelled_at"] if status == CANCELLED else tx["escalated_at"]
    stamp = at.isoformat().replace("+00:00", "Z")
    return json.dumps({
        "type": f"transaction.{status}",
        "timestamp": stamp,
        "data": {"id": tx["id"], "status": status, "reason": tx["status_reason"], "at": stamp,
                 "customer_id": tx["customer_id"], "amount": tx["content"]["amount"],
                 "currency": tx["currency"]},
    }, sort_keys=True)


def build_messages(d: dict[str, Any], tx: dict[str, Any], templates: Templates, opts: DeliveryOptions,
                   now: datetime) -> list[OutgoingMessage]:
    """The rendered message(s) for one delivery: one per push token, else exactly one."""
    content = tx["content"]
    if d["channel"] == "webhook":
        return [OutgoingMessage(tx["id"], d["step"], "webhook", opts.webhook_url or "", webhook_body(tx),
                                idempotency_key=f"evt_{d['id']}")]
    link = confirm_url(opts.public_base, opts.secret_key, tx["id"], tx["deadline"])
    facts = facts_for(content, now=now, deadline=tx["deadline"], confirm_url=link,
                      restart_url=opts.restart_url, step=d["step"], reason=tx["status_reason"] or "")
    locale = content["customer"].get("locale") or "en"
    rendered = templates.render(d["template"], d["channel"], locale, facts)
    customer = content["customer"]
    recipients = {"sms": [customer.get("phone")], "email": [customer.get("email")],
                  "push": list(customer.get("push_tokens") or [])}[d["channel"]]
    data = {"confirm_url": link, "transaction_id": tx["id"]} if d["kind"] == "reminder" else {
        "transaction_id": tx["id"]}
    return [OutgoingMessage(tx["id"], d["step"], d["channel"], r, rendered.body, rendered.subject,
                            rendered.html, d["variant"], data, idempotency_key=f"dl_{d['id']}",
                            expires_at=tx["deadline"] if d["kind"] == "reminder" else None)
            for r in recipients if r]


class Deliverer:
    def __init__(self, store: Store, templates: Callable[[], Templates], senders: Mapping[str, Sender],
                 opts: DeliveryOptions) -> None:
        self.store = store
        self.templates = templates
        self.senders = senders
        self.opts = opts

    def deliver(self, delivery_id: int) -> str:
        """Send one delivery; returns the outcome. Raises TransientSendError after recording it,
        so the caller (the actor) retries with backoff."""
        with self.store.begin() as conn:
            locked = self.store.lock_delivery(conn, delivery_id)
            if locked is None:
                return "duplicate"
            d, tx = locked
            now = self.store.clock()
            if tx["status"] not in REQUIRED_STATUS[d["kind"]]:
                self.store.update_delivery(conn, delivery_id, status="skipped", lease_until=None,
                                           reason=f"not sent: the transaction was {tx['status']} first")
                return "skipped"
            sender = self.senders.get(d["channel"])
            try:
                if sender is None:
                    raise PermanentSendError(f"no sender is configured for channel {d['channel']}")
                messages = build_messages(d, tx, self.templates(), self.opts, now)
            except (TemplateError, PermanentSendError) as exc:
                reason = exc.reason if isinstance(exc, PermanentSendError) else f"template error: {exc}"
                self.store.update_delivery(conn, delivery_id, status="failed", lease_until=None, reason=reason)
                log.error("delivery %s of %s failed: %s", delivery_id, tx["id"], reason)
                return "failed"
            attempts = d["attempts"] + 1
            self.store.update_delivery(conn, delivery_id, status="sending", started_at=now, attempts=attempts,
                                       lease_until=now + self.opts.lease)
        return self._send(d, messages, sender, attempts)

    def _send(self, d: dict[str, Any], messages: list[OutgoingMessage], sender: Sender, attempts: int) -> str:
        limit = self.opts.webhook_max_attempts if d["channel"] == "webhook" else self.opts.max_attempts
        provider_ids = []
        try:
            for message in messages:
                provider_ids.append(sender.send(message))
        except TransientSendError as exc:
            now = self.store.clock()
            if attempts >= limit:
                self.store.update_delivery(None, d["id"], status="failed", lease_until=None,
                                           reason=f"gave up after {attempts} attempts: {exc.reason}")
                log.error("%s %s %s gave up after %d attempts: %s", d["transaction_id"], d["step"],
                          d["channel"], attempts, exc.reason)
                return "failed"
            self.store.update_delivery(None, d["id"], status="queued", reason=f"retrying: {exc.reason}",
                                       lease_until=now + self.opts.lease)
            log.warning("%s %s %s attempt %d failed, will retry: %s", d["transaction_id"], d["step"],
                        d["channel"], attempts, exc.reason)
            raise
        except PermanentSendError as exc:
            self.store.update_delivery(None, d["id"], status="failed", lease_until=None, reason=exc.reason)
            log.error("%s %s %s refused: %s", d["transaction_id"], d["step"], d["channel"], exc.reason)
            return "failed"
        now = self.store.clock()
        self.store.update_delivery(None, d["id"], status="sent", sent_at=now, lease_until=None, reason=None,
                                   provider_id=next((p for p in provider_ids if p), None))
        log.info("sent %s %s to %s · %s", d["step"], d["channel"],
                 ", ".join(mask_recipient(m.channel, m.recipient) for m in messages) or "-", d["transaction_id"])
        return "sent"
