"""The HTTP API and the one-tap confirmation pages, through a real HTTP client against the app."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from starlette.testclient import TestClient
from support import T0, Clock, make_settings, transaction

from worker.broker import InProcessWorker, bind, make_broker
from worker.links import make_token
from worker.service import Remind
from worker.web.app import create_app

AUTH = {"Authorization": "Bearer new-token"}


@pytest.fixture
def remind(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'web.db'}", api_tokens="old-token, new-token")
    return Remind.from_settings(settings, clock=Clock())


@pytest.fixture
def client(remind):
    with TestClient(create_app(remind)) as c:
        yield c


def post_tx(client, body, **kw):
    return client.post("/v1/transactions", content=json.dumps(body) if not isinstance(body, bytes) else body,
                       headers={**AUTH, "content-type": "application/json"}, **kw)


def test_requests_without_a_valid_token_are_refused(client):
    assert client.get("/v1/transactions/x").status_code == 401
    assert client.get("/v1/transactions/x", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/transactions/x", headers={"Authorization": "Basic bmV3LXRva2Vu"}).status_code == 401
    # both tokens work during a rotation
    assert client.get("/v1/transactions/x", headers={"Authorization": "Bearer old-token"}).status_code == 404
    assert client.get("/v1/transactions/x", headers=AUTH).status_code == 404


def test_register_is_created_then_idempotent_then_a_conflict(client):
    first = post_tx(client, transaction("tx_h"))
    assert first.status_code == 201 and first.json()["status"] == "pending"
    assert first.json()["timeline"][0]["status"] == "planned"
    assert post_tx(client, transaction("tx_h")).status_code == 200
    conflict = post_tx(client, transaction("tx_h", fee="13.00"))
    assert conflict.status_code == 409 and conflict.json()["fields"] == ["fee"]


def test_exact_json_numbers_are_accepted(client):
    body = json.dumps(transaction("tx_n")).replace('"1000.00"', "1000.10")
    response = post_tx(client, body.encode())
    assert response.status_code == 201 and response.json()["amount"] == "1000.10"


@pytest.mark.parametrize("body,status,field", [
    (b"{not json", 400, None),
    (b"[1, 2]", 422, "(body)"),
    (json.dumps(transaction(amount="1.234")).encode(), 422, "amount"),
    (json.dumps(transaction(customer={"phone": "12345"})).encode(), 422, "customer.phone"),
    (json.dumps({"id": "x"}).encode(), 422, "customer"),
])
def test_invalid_bodies_get_a_4xx_naming_the_field(client, body, status, field):
    response = post_tx(client, body)
    assert response.status_code == status
    if field:
        assert field in response.json()["problems"]


def test_bodies_over_the_cap_are_refused(client):
    big = transaction("tx_big", metadata={"x": "y" * 70_000})
    assert post_tx(client, big).status_code == 413


def test_confirm_and_cancel(client):
    post_tx(client, transaction("tx_a"))
    post_tx(client, transaction("tx_b"))
    assert client.post("/v1/transactions/tx_a/confirm", headers=AUTH).json()["status"] == "confirmed"
    assert client.post("/v1/transactions/tx_a/confirm", headers=AUTH).status_code == 200
    assert client.post("/v1/transactions/tx_a/cancel", headers=AUTH, json={"reason": "x"}).status_code == 409
    cancelled = client.post("/v1/transactions/tx_b/cancel", headers=AUTH, json={"reason": "customer asked"})
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["status_reason"] == "customer asked"
    again = client.post("/v1/transactions/tx_b/confirm", headers=AUTH)
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    assert client.post("/v1/transactions/tx_b/cancel", headers=AUTH, json={}).status_code == 422
    assert client.post("/v1/transactions/nope/confirm", headers=AUTH).status_code == 404


def test_health_readiness_and_metrics(client):
    post_tx(client, transaction("tx_m"))
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    metrics = client.get("/metrics").text
    assert 'remind_transactions{status="pending"} 1.0' in metrics
    assert "remind_scheduler_lag_seconds" in metrics


def test_metrics_report_sends_retries_and_provider_latency(remind, client, tmp_path):
    from worker.errors import TransientSendError
    from worker.senders import OutboxSender

    class SlowOnce(OutboxSender):
        calls = 0

        def send(self, message):
            SlowOnce.calls += 1
            remind.store.clock.set(remind.store.clock() + timedelta(seconds=2))  # the call takes 2 s
            if SlowOnce.calls == 1:
                raise TransientSendError("busy")
            return super().send(message)

    remind.senders["push"] = SlowOnce(tmp_path / "out.jsonl")
    post_tx(client, transaction("tx_lat"))
    remind.store.clock.set(T0 + timedelta(minutes=16))
    remind.enqueue = lambda ids: None  # the test plays the actor itself
    [delivery_id] = remind.tick(T0 + timedelta(minutes=16)).enqueued
    with pytest.raises(TransientSendError):
        remind.deliver(delivery_id)
    assert remind.deliver(delivery_id) == "sent"
    metrics = client.get("/metrics").text
    assert 'remind_deliveries{channel="push",status="sent"} 1.0' in metrics
    assert 'remind_retries_total{channel="push"} 1.0' in metrics
    assert 'remind_provider_latency_seconds{channel="push",quantile="0.5"} 2.0' in metrics


def test_readiness_fails_when_the_broker_is_down(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(Remind.from_settings(settings))) as c:
        ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("unreachable")


@pytest.fixture
def reminded(remind, client):
    """A transaction whose first reminder was sent; returns the confirmation path from its message."""
    broker = make_broker(remind.settings)
    bind(remind, broker)
    worker = InProcessWorker(broker, threads=2).start()
    post_tx(client, transaction("tx_link", customer={"locale": "en"}))
    remind.store.clock.set(T0 + timedelta(minutes=16))
    remind.tick(T0 + timedelta(minutes=16))
    worker.join(remind.settings.queue_name)
    worker.stop()
    line = json.loads(remind.settings.outbox.read_text().splitlines()[0])
    assert line["channel"] == "push"
    return re.fullmatch(r"https://pay\.example(/c/[\w.\-]+)", line["data"]["confirm_url"]).group(1)


def test_a_get_on_the_link_shows_the_transfer_and_never_confirms(client, reminded, remind):
    for _ in range(3):  # mail scanners, link previews
        page = client.get(reminded)
        assert page.status_code == 200
        assert "CN¥1,000.00" in page.text and "CN¥12.50" in page.text and "CN¥1,012.50" in page.text
        assert "Bank card ending 1234" in page.text and "<form method=\"post\"" in page.text
    assert remind.show("tx_link")["status"] == "pending"
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["x-frame-options"] == "DENY"


def test_the_button_confirms_and_a_reused_link_says_so(client, reminded, remind):
    done = client.post(reminded)
    assert done.status_code == 200 and "Transfer confirmed" in done.text and "arrive around" in done.text
    assert remind.show("tx_link")["status"] == "confirmed"
    again = client.post(reminded)
    assert again.status_code == 200 and "Already confirmed" in again.text


def test_a_tampered_or_expired_link_changes_nothing(client, reminded, remind):
    tampered = reminded[:-3] + ("aaa" if not reminded.endswith("aaa") else "bbb")
    assert client.post(tampered).status_code == 400
    assert "not valid" in client.get(tampered).text
    expired = "/c/" + make_token("test-secret", "tx_link", T0)  # its deadline has passed
    page = client.post(expired)
    assert page.status_code == 410 and "expired" in page.text
    other_key = "/c/" + make_token("another-secret", "tx_link", T0 + timedelta(days=9999))
    assert client.post(other_key).status_code == 400
    assert remind.show("tx_link")["status"] == "pending"


def test_the_link_of_a_cancelled_transaction_says_it_was_cancelled(client, reminded, remind):
    remind.cancel("tx_link", "platform")
    page = client.post(reminded)
    assert page.status_code == 409 and "cancelled" in page.text
    assert remind.show("tx_link")["status"] == "cancelled"


def test_the_link_flow_follows_the_injected_clock_a_year_ahead(tmp_path):
    """The pages read the service's clock, never the wall clock: a year from today the flow still works,
    and the link dies at the deadline of that clock, not of today's."""
    from datetime import UTC, datetime

    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)
    clock = Clock(start)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'year.db'}", api_tokens="new-token")
    remind = Remind.from_settings(settings, clock=clock)
    with TestClient(create_app(remind)) as c:
        assert post_tx(c, transaction("tx_year", created_at=start.isoformat(),
                                      customer={"locale": "en"})).status_code == 201
        deadline = datetime.fromisoformat(remind.show("tx_year")["deadline"])
        path = "/c/" + make_token("test-secret", "tx_year", deadline)
        clock.set(start + timedelta(minutes=16))
        assert c.get(path).status_code == 200  # a year ahead of the wall clock, the link is alive
        clock.set(deadline)
        assert c.get(path).status_code == 410  # and it dies at the injected deadline
        clock.set(deadline - timedelta(seconds=1))
        done = c.post(path)
        assert done.status_code == 200 and "Transfer confirmed" in done.text
    assert remind.show("tx_year")["status"] == "confirmed"


def test_scheduler_lag_is_measured_on_the_service_clock(remind, client):
    post_tx(client, transaction("tx_lag"))  # its first step (the nudge) is due at T0 + 15 min
    remind.store.clock.set(T0 + timedelta(hours=1))
    metrics = client.get("/metrics").text
    assert "remind_scheduler_lag_seconds 2700.0" in metrics


def test_a_customer_link_never_overrides_a_review(client, remind):
    """A risk-flagged transfer escalated to ops review at its deadline; the web process's clock is a second
    behind the scheduler's, so the link is still alive. The customer's tap must not confirm a transfer
    that ops are reviewing (only ops may)."""
    from datetime import datetime

    assert post_tx(client, transaction("tx_risk", risk_flag=True, customer={"locale": "en"})).status_code == 201
    deadline = datetime.fromisoformat(remind.show("tx_risk")["deadline"])
    remind.enqueue = lambda ids: None  # the notices are not what this test is about
    remind.tick(deadline)  # the scheduler reached the deadline: escalated
    remind.store.clock.set(deadline - timedelta(seconds=1))
    path = "/c/" + make_token(remind.settings.secret_key, "tx_risk", deadline)
    page = client.get(path)
    assert page.status_code == 409 and "under review" in page.text and "<form" not in page.text
    tapped = client.post(path)
    assert tapped.status_code == 409 and "under review" in tapped.text
    assert remind.show("tx_risk")["status"] == "escalated"
    assert remind.confirm("tx_risk")["status"] == "confirmed"  # ops still can


def test_a_valid_token_for_an_unknown_transaction_changes_nothing(client, remind):
    path = "/c/" + make_token(remind.settings.secret_key, "tx_nobody", T0 + timedelta(days=1))
    for response in (client.get(path), client.post(path)):
        assert response.status_code == 404 and "not valid" in response.text
    assert remind.store.counts() == {}
