"""Timing and arrival rules (issue #12, item 5): a registration whose deadline has passed is refused, and
cancellation notices and fallback messages wait out the customer's quiet hours like reminders do.

Every time here is on the injected service clock; the sample customer lives in Asia/Shanghai (UTC+8),
whose quiet hours in the shipped schedules are 22:00-08:00 for SMS and push."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from starlette.testclient import TestClient
from support import T0, Clock, make_settings, transaction

from worker.errors import PermanentSendError
from worker.senders import OutboxSender
from worker.service import Remind
from worker.web.app import create_app

AUTH = {"Authorization": "Bearer platform-token", "content-type": "application/json"}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def sent(h, tx_id="tx_1"):
    return sorted((line["step"], line["channel"]) for line in h.lines(tx_id))


def entries(h, step, tx_id="tx_1"):
    return {e["channel"]: e for e in h.remind.show(tx_id)["timeline"] if e["step"] == step}


def delivery(h, step, channel, tx_id="tx_1"):
    return next(d for d in h.remind.store.deliveries_of(tx_id) if d["step"] == step and d["channel"] == channel)


class Refusing:
    """Refuses the messages of some steps for good; sends the others to the outbox."""

    name = "refusing"

    def __init__(self, outbox, steps: set[str]) -> None:
        self.inner = OutboxSender(outbox)
        self.steps = steps

    def send(self, message):
        if message.step in self.steps:
            raise PermanentSendError("the provider refused the address", code="invalid")
        return self.inner.send(message)


# -- a registration whose deadline has passed ------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'api.db'}", api_tokens="platform-token")
    remind = Remind.from_settings(settings, clock=Clock(T0))
    with TestClient(create_app(remind)) as client:
        yield remind, client, settings.outbox


def post(client, body):
    return client.post("/v1/transactions", content=json.dumps(body), headers=AUTH)


def test_an_expired_registration_is_refused_naming_expires_at_and_nothing_is_stored_or_sent(api):
    remind, client, outbox = api
    late = transaction("tx_late", expires_at=(T0 - timedelta(minutes=1)).isoformat(),
                       created_at=(T0 - timedelta(hours=2)).isoformat())
    answer = post(client, late)
    assert answer.status_code == 422, answer.text
    assert set(answer.json()["problems"]) == {"expires_at"}
    assert "already passed" in answer.json()["problems"]["expires_at"]
    del late["created_at"]  # created "now": the same refusal
    assert set(post(client, late).json()["problems"]) == {"expires_at"}
    exactly_now = transaction("tx_now", expires_at=T0.isoformat(), created_at=(T0 - timedelta(hours=1)).isoformat())
    assert post(client, exactly_now).status_code == 422  # a deadline at this very moment has passed too
    remind.tick(T0 + timedelta(minutes=1))
    assert remind.store.counts() == {}
    assert not outbox.exists()
    assert client.get("/v1/transactions/tx_late", headers=AUTH).status_code == 404


def test_a_created_at_older_than_the_schedules_own_deadline_is_refused_naming_created_at(api):
    remind, client, _ = api
    old = transaction("tx_old", created_at=(T0 - timedelta(hours=24)).isoformat())  # default cancels at 24h
    answer = post(client, old)
    assert answer.status_code == 422
    problems = answer.json()["problems"]
    assert set(problems) == {"created_at"}
    assert "would have cancelled it at 2026-11-25T09:00:00Z" in problems["created_at"]
    risky = transaction("tx_risky", risk_flag=True, created_at=(T0 - timedelta(hours=9)).isoformat())
    assert "would have escalated it" in post(client, risky).json()["problems"]["created_at"]  # 8h on risk_review
    fresh = transaction("tx_fresh", created_at=(T0 - timedelta(hours=23, minutes=59)).isoformat())
    assert post(client, fresh).status_code == 201  # a minute left: accepted
    assert remind.store.counts() == {"transactions_pending": 1}


def test_a_repeat_of_a_registered_transaction_is_still_idempotent_after_its_deadline(api):
    remind, client, _ = api
    body = transaction("tx_1", expires_at=(T0 + timedelta(hours=3)).isoformat())
    assert post(client, body).status_code == 201
    remind.store.clock.set(T0 + timedelta(hours=5))  # the deadline passed; the platform retries
    again = post(client, body)
    assert again.status_code == 200 and again.json()["id"] == "tx_1"
    without_created_at = {k: v for k, v in body.items() if k != "created_at"}
    assert post(client, without_created_at).status_code == 200
    assert post(client, {**body, "fee": "1.00"}).status_code == 409  # other content: still a conflict
    assert post(client, {**body, "id": "tx_2"}).status_code == 422  # a new one: refused
