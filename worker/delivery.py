"""Deliver one delivery: re-check the transaction, render, send, record. Idempotent by construction:
only a delivery still ``queued`` is sent, and the row lock makes duplicates wait and then do nothing.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jinja2 import TemplateError

from .contacts import CONTACT_FIELD, all_pairs, usable
from .errors import PermanentSendError, SendError, TransientSendError
from .links import confirm_url
from .masking import mask_recipient
from .outcomes import Outcomes
from .render import Templates, facts_for
from .senders import OutgoingMessage, Sender
from .sms import segments
from .store import CANCELLED, ESCALATED, PENDING, Store

log = logging.getLogger("remind.delivery")

#: The status a transaction must still have when each kind of delivery goes out
#: (a reminder.failed webhook goes out whatever happened since).
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


def webhook_body(d: dict[str, Any], tx: dict[str, Any]) -> str:
    """The event the platform receives; built from stored facts only, so every retry is identical."""
    kind = d["template"] or f"transaction.{tx['status']}"
    if kind == "reminder.failed":
        at = d["due_at"]
        data = {"id": tx["id"], "status": tx["status"], "step": d["step"],
                "reason": "no channel could deliver this reminder"}
    else:
        status = kind.removeprefix("transaction.")
        at = tx["cancelled_at"] if status == CANCELLED else tx["escalated_at"]
        data = {"id": tx["id"], "status": status, "reason": tx["status_reason"]}
    stamp = at.isoformat().replace("+00:00", "Z")
    data.update(at=stamp, customer_id=tx["customer_id"], amount=tx["content"]["amount"], currency=tx["currency"])
    return json.dumps({"type": kind, "timestamp": stamp, "data": data}, sort_keys=True)


def build_messages(d: dict[str, Any], tx: dict[str, Any], templates: Templates, opts: DeliveryOptions,
                   now: datetime, recipients: list[str]) -> list[OutgoingMessage]:
    """The rendered message(s) for one delivery: one per usable push token, else exactly one."""
    content = tx["content"]
    if d["channel"] == "webhook":
        return [OutgoingMessage(tx["id"], d["step"], "webhook", opts.webhook_url or "", webhook_body(d, tx),
                                idempotency_key=f"evt_{d['id']}")]
    link = confirm_url(opts.public_base, opts.secret_key, tx["id"], tx["deadline"])
    facts = facts_for(content, now=now, deadline=tx["deadline"], confirm_url=link,
                      restart_url=opts.restart_url, step=d["step"], reason=tx["status_reason"] or "")
    locale = content["customer"].get("locale") or "en"
    rendered = templates.render(d["template"], d["channel"], locale, facts)
    data = {"confirm_url": link, "transaction_id": tx["id"]} if d["kind"] == "reminder" else {
        "transaction_id": tx["id"]}
    return [OutgoingMessage(tx["id"], d["step"], d["channel"], r, rendered.body, rendered.subject,
                            rendered.html, d["variant"], data, idempotency_key=f"dl_{d['id']}",
                            expires_at=tx["deadline"] if d["kind"] == "reminder" else None)
            for r in recipients]


class Deliverer:
    def __init__(self, store: Store, templates: Callable[[], Templates], senders: Mapping[str, Sender],
                 opts: DeliveryOptions, outcomes: Outcomes) -> None:
        self.store = store
        self.templates = templates
        self.senders = senders
        self.opts = opts
        self.outcomes = outcomes
        #: Set by the broker wiring: throttle(channel) -> False when the provider's rate limit is reached.
        self.throttle: Callable[[str], bool] | None = None

    def deliver(self, delivery_id: int) -> str:
        """Send one delivery; returns the outcome. Raises TransientSendError after recording it,
        so the caller (the actor) retries with backoff."""
        if self.throttle is not None:
            channel = self.store.delivery_channel(delivery_id)
            if channel is not None and not self.throttle(channel):
                raise TransientSendError(f"{channel} rate limit reached", retry_after=0.5 + random.random())
        with self.store.begin() as conn:
            locked = self.store.lock_delivery(conn, delivery_id)
            if locked is None:
                return "duplicate"
            d, tx = locked
            now = self.store.clock()
            if d["template"] != "reminder.failed" and tx["status"] not in REQUIRED_STATUS[d["kind"]]:
                self.store.update_delivery(conn, delivery_id, status="skipped", lease_until=None,
                                           reason=f"not sent: the transaction was {tx['status']} first")
                return "skipped"
            sender = self.senders.get(d["channel"])
            recipients: list[str] = []
            if d["channel"] in CONTACT_FIELD:
                recipients, why = usable(tx["content"]["customer"], d["channel"],
                                         self.store.suppressed(conn, all_pairs(tx["content"]["customer"])))
            try:
                if sender is None:
                    raise PermanentSendError(f"no sender is configured for channel {d['channel']}")
                if d["channel"] in CONTACT_FIELD and not recipients:
                    raise PermanentSendError(f"not sent: {why}")
                messages = build_messages(d, tx, self.templates(), self.opts, now, recipients)
            except (TemplateError, PermanentSendError) as exc:
                reason = exc.reason if isinstance(exc, PermanentSendError) else f"template error: {exc}"
                failure = reason
            else:
                failure = None
                attempts = d["attempts"] + 1
                self.store.update_delivery(conn, delivery_id, status="sending", started_at=now,
                                           attempts=attempts, lease_until=now + self.opts.lease)
        if failure is not None:
            log.error("delivery %s of %s failed: %s", delivery_id, tx["id"], failure)
            self.outcomes.failed(delivery_id, failure)
            return "failed"
        return self._send(d, tx, messages, sender, attempts)

    def _send_all(self, d: dict[str, Any], tx: dict[str, Any], messages: list[OutgoingMessage],
                  sender: Sender) -> list[str | None]:
        """Send each message. A push token reported unregistered is dropped for good. When some of a
        customer's devices got the push, the delivery is sent: retrying would push the others twice."""
        provider_ids: list[str | None] = []
        errors: list[SendError] = []
        for message in messages:
            try:
                provider_ids.append(sender.send(message))
            except SendError as exc:
                if d["channel"] == "push" and exc.code == "UNREGISTERED":
                    self.store.suppress(None, "push", message.recipient, tx["customer_id"],
                                        "the push provider reported the token unregistered")
                elif len(messages) == 1:
                    raise
                errors.append(exc)
        if not provider_ids:
            if all(e.code == "UNREGISTERED" for e in errors):
                raise PermanentSendError("every push token was reported unregistered", code="UNREGISTERED")
            raise next((e for e in errors if e.transient), errors[0])
        if errors:
            log.warning("%s %s push: %d of %d devices failed (%s); the others got it", d["transaction_id"],
                        d["step"], len(errors), len(messages), errors[0].reason)
        return provider_ids

    def _send(self, d: dict[str, Any], tx: dict[str, Any], messages: list[OutgoingMessage], sender: Sender,
              attempts: int) -> str:
        limit = self.opts.webhook_max_attempts if d["channel"] == "webhook" else self.opts.max_attempts
        try:
            provider_ids = self._send_all(d, tx, messages, sender)
        except TransientSendError as exc:
            now = self.store.clock()
            if attempts >= limit:
                self.outcomes.failed(d["id"], f"gave up after {attempts} attempts: {exc.reason}")
                log.error("%s %s %s gave up after %d attempts: %s", d["transaction_id"], d["step"],
                          d["channel"], attempts, exc.reason)
                return "failed"
            self.store.update_delivery(None, d["id"], status="queued", reason=f"retrying: {exc.reason}",
                                       lease_until=now + self.opts.lease)
            log.warning("%s %s %s attempt %d failed, will retry: %s", d["transaction_id"], d["step"],
                        d["channel"], attempts, exc.reason)
            raise
        except PermanentSendError as exc:
            self.outcomes.failed(d["id"], exc.reason, code=exc.code)
            log.error("%s %s %s refused: %s", d["transaction_id"], d["step"], d["channel"], exc.reason)
            return "failed"
        now = self.store.clock()
        keep = d["reason"] if d["reason"] and not d["reason"].startswith("retrying") else None
        billed = sum(segments(m.body).segments for m in messages) if d["channel"] == "sms" else None
        self.store.update_delivery(None, d["id"], status="sent", sent_at=now, lease_until=None, reason=keep,
                                   segments=billed,
                                   provider_id=next((p for p in provider_ids if p), None))
        log.info("sent %s %s to %s · %s", d["step"], d["channel"],
                 ", ".join(mask_recipient(m.channel, m.recipient) for m in messages) or "-", d["transaction_id"])
        return "sent"
