"""Failures while sending: transient ones retry with backoff, permanent ones never; platform webhooks
are signed (Standard Webhooks) and retried until the platform answers 2xx."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import T0, transaction
from standardwebhooks.webhooks import Webhook

from worker.errors import PermanentSendError, TransientSendError
from worker.senders import OutboxSender

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


class Flaky:
    """A sender that fails the first ``failures`` calls the given way, then delegates to the outbox."""

    name = "flaky"

    def __init__(self, outbox, failures: int, error: type) -> None:
        self.inner = OutboxSender(outbox)
        self.failures = failures
        self.error = error
        self.calls = 0
        self.lock = threading.Lock()

    def send(self, message):
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                raise self.error("provider said no", retry_after=0.2)
        return self.inner.send(message)


def test_transient_failures_are_retried_then_succeed(make_harness, tmp_path):
    flaky = Flaky(tmp_path / "outbox.jsonl", failures=2, error=TransientSendError)
    h = make_harness(senders={"sms": flaky, "email": flaky, "push": flaky})
    h.remind.register(transaction())
    h.at(minutes=16).tick()
    assert flaky.calls == 3 and len(h.lines()) == 1
    [entry] = [e for e in h.remind.show("tx_1")["timeline"] if e["step"] == "nudge"]
    assert entry["status"] == "sent" and entry["attempts"] == 3


def test_transient_failures_give_up_after_max_attempts_with_the_reason(make_harness, tmp_path):
    flaky = Flaky(tmp_path / "outbox.jsonl", failures=99, error=TransientSendError)
    h = make_harness(senders={"sms": flaky, "email": flaky, "push": flaky}, max_attempts=2)
    h.remind.register(transaction())
    h.at(minutes=16).tick()
    [entry] = [e for e in h.remind.show("tx_1")["timeline"] if e["step"] == "nudge"]
    assert flaky.calls == 2 and entry["status"] == "failed"
    assert entry["reason"] == "gave up after 2 attempts: provider said no"


def test_permanent_failures_are_not_retried(make_harness, tmp_path):
    flaky = Flaky(tmp_path / "outbox.jsonl", failures=99, error=PermanentSendError)
    h = make_harness(senders={"sms": flaky, "email": flaky, "push": flaky})
    h.remind.register(transaction())
    h.at(minutes=16).tick()
    [entry] = [e for e in h.remind.show("tx_1")["timeline"] if e["step"] == "nudge"]
    assert flaky.calls == 1 and entry["status"] == "failed" and entry["reason"] == "provider said no"


@pytest.fixture
def platform():
    """A platform endpoint that verifies each webhook and answers 503 to the first one."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            payload = Webhook(SECRET).verify(body, headers)  # raises on a bad signature
            received.append({"id": headers["webhook-id"], "payload": payload})
            self.send_response(503 if len(received) == 1 else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hooks", received
    server.shutdown()


def test_cancellation_webhook_is_signed_and_retried_with_the_same_event_id(make_harness, platform):
    url, received = platform
    h = make_harness(platform_webhook_url=url, webhook_secret=SECRET)
    h.remind.register(transaction(expires_at=(T0 + timedelta(hours=1)).isoformat()))
    h.at(hours=2).tick()
    h.at(hours=3).tick()
    assert len(received) == 2 and received[0]["id"] == received[1]["id"]
    event = received[1]["payload"]
    assert event["type"] == "transaction.cancelled"
    assert event["data"]["id"] == "tx_1" and event["data"]["reason"] == "not_confirmed"
    [hook] = [e for e in h.remind.show("tx_1")["timeline"] if e["channel"] == "webhook"]
    assert hook["status"] == "sent" and hook["attempts"] == 2
    assert json.dumps(event)  # a plain JSON object


def test_risk_transactions_escalate_instead_of_cancelling(make_harness, platform):
    url, received = platform
    h = make_harness(platform_webhook_url=url, webhook_secret=SECRET)
    h.remind.register(transaction(risk_flag=True))
    h.at(hours=9).tick()
    view = h.remind.show("tx_1")
    assert view["status"] == "escalated" and view["status_reason"] == "risk_review"
    assert {line["step"] for line in h.lines()} == {"escalate"}
    assert received[-1]["payload"]["type"] == "transaction.escalated"
    assert h.remind.confirm("tx_1")["status"] == "confirmed"  # ops may still confirm after review


def test_a_send_interrupted_by_a_dead_worker_is_failed_not_resent(make_harness):
    h = make_harness(start_worker=False, lease_seconds=30)
    h.remind.register(transaction())
    [delivery_id] = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    # The worker got as far as marking the row "sending", then died before recording the outcome.
    h.remind.store.update_delivery(None, delivery_id, status="sending", lease_until=T0 + timedelta(minutes=16,
                                                                                                    seconds=30))
    result = h.remind.tick(T0 + timedelta(minutes=17))
    assert result.lost_in_send == 1 and result.enqueued == []
    [entry] = [e for e in h.remind.show("tx_1")["timeline"] if e["step"] == "nudge"]
    assert entry["status"] == "failed" and "outcome unknown" in entry["reason"]
    assert h.remind.deliver(delivery_id) == "duplicate"  # a late message for it sends nothing


def test_logs_never_carry_a_full_phone_email_or_token(make_harness, caplog):
    caplog.set_level("DEBUG")
    h = make_harness()
    h.remind.register(transaction(expires_at=(T0 + timedelta(hours=21)).isoformat()))
    for hours in (1, 3, 20.5, 22):
        h.at(hours=hours).tick()
    assert len(h.lines()) == 9
    text = caplog.text
    assert "sent cancel sms to +86*******8000" in text
    for secret in ("+8613800138000", "li.wei@example.com", "fcm-token-1"):
        assert secret not in text
