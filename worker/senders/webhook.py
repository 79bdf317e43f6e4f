"""Signed webhooks to the platform (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from ..errors import TransientSendError
from .base import OutgoingMessage, retry_after


def sign_headers(secret: str, event_id: str, body: str, *, at: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers; a fresh timestamp and signature on each attempt."""
    at = at or datetime.now(UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, at, body),
        "content-type": "application/json",
    }


class WebhookSender:
    """POSTs the event body to the platform; anything but a 2xx is retried (the platform may be down)."""

    name = "webhook"

    def __init__(self, secret: str, *, timeout: float = 10.0, client: httpx.Client | None = None) -> None:
        self.secret = secret
        self.client = client or httpx.Client(timeout=timeout)

    def send(self, message: OutgoingMessage) -> str | None:
        headers = sign_headers(self.secret, message.idempotency_key, message.body)
        try:
            response = self.client.post(message.recipient, content=message.body.encode(), headers=headers)
        except httpx.HTTPError as exc:
            raise TransientSendError(f"webhook not delivered: {type(exc).__name__}") from None
        if not response.is_success:
            raise TransientSendError(f"webhook answered HTTP {response.status_code}",
                                     retry_after=retry_after(response.headers.get("retry-after")),
                                     code=str(response.status_code))
        return message.idempotency_key
