"""Signed webhooks to the platform (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from ..errors import TransientSendError
from .base import DEFAULT_POOL_SIZE, OutgoingMessage, retry_after


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
    """POSTs the event body to the platform; anything but a 2xx is retried (the platform may be down).

    Parameters:
        secret: the Standard Webhooks secret (``whsec_...``).
        timeout: seconds to wait for the platform (connect, each read and write, and for a pooled
            connection).
        pool_size: keep-alive connections kept (across the hosts posted to): the number of ``send`` calls
            the caller runs at once on this one sender. The number of open connections is not capped
            (httpx's default of 100 would make threads beyond it wait for one), as with the other senders'
            non-blocking pools: a thread beyond ``pool_size`` opens a connection that is closed after use.
        client: an ``httpx.Client`` of the caller's instead (``timeout`` and ``pool_size`` are then its own).

    A 429 is a ``TransientSendError`` with ``throttled=True``; every other failure is not throttled.
    """

    name = "webhook"

    def __init__(self, secret: str, *, timeout: float = 10.0, pool_size: int = DEFAULT_POOL_SIZE,
                 client: httpx.Client | None = None) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size!r}")
        self.secret = secret
        self.client = client or httpx.Client(
            timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=pool_size))

    def send(self, message: OutgoingMessage) -> str | None:
        headers = sign_headers(self.secret, message.idempotency_key, message.body)
        try:
            response = self.client.post(message.recipient, content=message.body.encode(), headers=headers)
        except httpx.HTTPError as exc:
            raise TransientSendError(f"webhook not delivered: {type(exc).__name__}") from None
        if not response.is_success:
            raise TransientSendError(f"webhook answered HTTP {response.status_code}",
                                     retry_after=retry_after(response.headers.get("retry-after")),
                                     code=str(response.status_code), throttled=response.status_code == 429)
        return message.idempotency_key
