"""The sender interface: one message in, a provider id out, or a classified SendError."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter


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


def environ_proxy(url: str) -> str | None:
    """The proxy ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` name for ``url`` now, None when there is
    none or ``NO_PROXY`` exempts the host (requests' own reading of them)."""
    return requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))


def environ_ca_bundle() -> str | None:
    """The CA bundle ``REQUESTS_CA_BUNDLE`` (or ``CURL_CA_BUNDLE``) names, if any."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def read_environment_once(session: Any, url: str) -> None:
    """Fix a ``requests.Session``'s proxy and CA settings from the environment now, for ``url``.

    requests reads them again on every request (``trust_env``): scanning ``os.environ`` and the proxy
    tables cost about a tenth of a millisecond per send, a tenth of a delivery's CPU. ``HTTPS_PROXY``,
    ``NO_PROXY`` and ``REQUESTS_CA_BUNDLE`` still apply; a change to them needs a restart."""
    session.proxies.update(requests.utils.get_environ_proxies(url))
    bundle = environ_ca_bundle()
    if bundle and session.verify is True:
        session.verify = bundle
    session.trust_env = False


def mount_pool(session: requests.Session, pool_size: int) -> None:
    """Pool up to ``pool_size`` keep-alive connections per host, for http and https, never retrying.

    ``pool_block=False``: the caller sizes ``pool_size`` to the sends it keeps in flight, so the pool is
    never short in normal running; if it is (a caller that runs more threads than it said), a blocking
    pool would hold the extra threads waiting for a connection with no time limit (requests passes no
    ``pool_timeout``), beyond the send timeout and unseen, whereas a non-blocking one opens an extra
    connection, closes it after that request and logs urllib3's "Connection pool is full" warning: a
    little slower, bounded by the timeout, and visible. ``max_retries=0``: a POST that may have reached
    the provider is never sent again behind the caller's back; retrying is the queue's job."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size!r}")
    for prefix in ("https://", "http://"):
        session.mount(prefix, HTTPAdapter(pool_maxsize=pool_size, pool_block=False, max_retries=0))
