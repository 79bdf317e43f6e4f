"""WebhookSender posts signed events to a local platform fake (a FakeServer that verifies the Standard
Webhooks signature)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
from fakes import FakeRequest, FakeResponse, FakeServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.errors import TransientSendError
from worker.senders.base import OutgoingMessage
from worker.senders.webhook import WebhookSender

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class PlatformFake(FakeServer):
    """Accepts a signed POST to /events with 204; fails with "429" or "500" when told."""

    KINDS: ClassVar[frozenset[str]] = FakeServer.KINDS | {"429", "500"}

    def _handle(self, request: FakeRequest) -> FakeResponse | object:
        self._count_request()
        try:
            event = Webhook(SECRET).verify(request.body, {k.lower(): v for k, v in request.headers.items()})
        except WebhookVerificationError as exc:
            return self._reject(FakeResponse(400, b"bad signature"), str(exc))
        injected = self._injected({})
        if injected is not None:
            return injected
        self._record(event)
        return FakeResponse(204)

    def _failure(self, kind: str, retry_after: float | None, context: dict[str, Any]) -> FakeResponse:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        return FakeResponse(int(kind), b"", headers)


@pytest.fixture
def platform():
    with PlatformFake(hang_seconds=5.0) as fake:
        yield fake
    assert not fake.errors, f"the fake itself failed: {fake.errors}"


def event(fake: PlatformFake, i: int = 0) -> OutgoingMessage:
    return OutgoingMessage(transaction_id="tx_1", step="cancel", channel="webhook", recipient=f"{fake.base_url}/events",
                           body=json.dumps({"type": "transaction.cancelled", "n": i}), idempotency_key=f"ev_{i}")


def test_posts_a_signed_event(platform):
    assert WebhookSender(SECRET, timeout=2.0).send(event(platform)) == "ev_0"
    assert platform.messages == [{"type": "transaction.cancelled", "n": 0}]


def test_concurrent_sends_share_pool_size_keep_alive_connections(platform, connections, slow, at_once):
    s = WebhookSender(SECRET, timeout=2.0, pool_size=64)
    opened = connections(platform)
    slow(platform, 0.05)

    first = at_once(lambda i: s.send(event(platform, i)), 64)
    second = at_once(lambda i: s.send(event(platform, 64 + i)), 64)

    assert first + second == [f"ev_{i}" for i in range(128)]
    assert sorted(m["n"] for m in platform.messages) == list(range(128))
    assert opened.opened <= 64  # httpx's default keeps 20 and would open more for the second wave


@pytest.mark.parametrize(("kind", "throttled"), [("429", True), ("500", False)])
def test_only_too_many_requests_is_throttled(platform, kind, throttled):
    platform.fail_next(1, kind, retry_after=7)
    with pytest.raises(TransientSendError) as caught:
        WebhookSender(SECRET, timeout=2.0).send(event(platform))
    assert caught.value.throttled is throttled and caught.value.retry_after == 7 and caught.value.code == kind


def test_pool_size_must_be_positive():
    with pytest.raises(ValueError):
        WebhookSender(SECRET, pool_size=0)
