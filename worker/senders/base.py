"""The sender interface: one message in, a provider id out, or a classified SendError."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class OutgoingMessage:
    """One message to one recipient, already rendered."""

    transaction_id: str
    step: str
    channel: str  # sms | email | push | webhook
    recipient: str  # E.164 phone, email address, push token, or webhook URL
    body: str
    subject: str | None = None  # email subject, push title
    html: str | None = None
    variant: str = "default"
    data: dict[str, Any] = field(default_factory=dict)  # push data / webhook headers
    idempotency_key: str = ""  # stable across retries of the same delivery ("dl_<delivery id>")
    expires_at: datetime | None = None  # the transaction's deadline: a reminder is useless after it


class Sender(Protocol):
    """Hands a message to a provider. Raises TransientSendError or PermanentSendError on failure."""

    name: str

    def send(self, message: OutgoingMessage) -> str | None:
        """Send one message; return the provider's message id when it gives one."""
        ...


class FanOut:
    """Send to several sinks in order (outbox, then console): the embedded default."""

    def __init__(self, senders: list[Sender]) -> None:
        self.senders = senders
        self.name = "+".join(s.name for s in senders)

    def send(self, message: OutgoingMessage) -> str | None:
        ids = [s.send(message) for s in self.senders]
        return next((i for i in ids if i), None)


#: Keep-alive connections a sender pools to its provider when its caller does not say: as many as the
#: calls it is expected to have in flight at once (the caller passes its send concurrency).
DEFAULT_POOL_SIZE = 32
