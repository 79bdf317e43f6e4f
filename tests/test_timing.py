"""Timing and arrival rules (issue #12, item 5): a registration whose deadline has passed is refused, and
cancellation notices and fallback messages wait out the customer's quiet hours like reminders do.

Every time here is on the injected service clock; the sample customer lives in Asia/Shanghai (UTC+8),
whose quiet hours in the shipped schedules are 22:00-08:00 for SMS and push."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from starlette.testclient import TestClient
from support import T0, Clock, make_settings, transaction, write_files

from worker.errors import AlreadySettled, PermanentSendError
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


# -- notices wait out quiet hours; the status does not ------------------------------------------------


def test_a_cancellation_at_0230_changes_the_status_then_and_sends_the_notice_at_0800(make_harness):
    h = make_harness()
    # created 17:00 in Shanghai; expires 02:30 the next night, inside quiet hours (22:00-08:00)
    h.remind.register(transaction(expires_at="2026-11-26T02:30:00+08:00"))
    planned = {e["channel"]: e["due_at"] for e in h.remind.show("tx_1")["timeline"] if e["step"] == "cancel"}
    assert planned == {"email": "2026-11-25T18:30:00Z", "sms,push": "2026-11-26T00:00:00Z"}  # shown ahead
    for at in ("2026-11-25T09:16", "2026-11-25T11:01"):  # the nudge and the 2h reminder (19:00 there)
        h.clock.set(utc(at))
        h.tick()
    before = len(h.lines())

    h.clock.set(utc("2026-11-25T18:30"))  # 02:30 in Shanghai: the deadline
    h.tick()
    view = h.remind.show("tx_1")
    assert view["status"] == "cancelled" and view["cancelled_at"] == "2026-11-25T18:30:00Z"
    assert [(x["step"], x["channel"]) for x in h.lines()[before:]] == [("cancel", "email")]  # email is not held
    notice = entries(h, "cancel")
    for channel in ("sms", "push"):  # planned for 08:00 in Shanghai, and why
        assert notice[channel]["status"] == "planned" and notice[channel]["state"] == "queued"
        assert notice[channel]["due_at"] == "2026-11-26T00:00:00Z"
        assert "quiet hours until 08:00 (Asia/Shanghai)" in notice[channel]["reason"]
    assert h.remind.store.counts()["deliveries_held"] == 2

    h.clock.set(utc("2026-11-25T19:00"))  # 03:00: the customer tries the link; too late, and it stays so
    with pytest.raises(AlreadySettled):
        h.remind.confirm("tx_1", by_customer=True)
    held = delivery(h, "cancel", "sms")
    assert h.remind.deliver(held["id"]) == "duplicate"  # a stray message sends nothing early
    assert delivery(h, "cancel", "sms") == held  # and leaves the row as it was: deferred, not skipped
    h.clock.set(utc("2026-11-25T23:59"))  # 07:59
    assert not h.tick().released and len(h.lines()) == before + 1

    h.clock.set(utc("2026-11-26T00:00"))  # 08:00
    assert h.tick().released == 2
    assert [(x["step"], x["channel"]) for x in h.lines()[before + 1:]] in (
        [("cancel", "sms"), ("cancel", "push")], [("cancel", "push"), ("cancel", "sms")])
    assert {e["status"] for e in entries(h, "cancel").values()} == {"sent"}
    h.clock.set(utc("2026-11-26T01:00"))
    h.tick()
    assert len(h.lines()) == before + 3  # exactly once


def test_an_escalation_notice_held_for_the_night_keeps_to_its_outcome(make_harness):
    """risk_review escalates at 8h: at 02:30 in Shanghai the status changes and the email goes; the SMS
    waits for 08:00, and once ops confirmed the transaction in between it never goes out."""
    h = make_harness()
    h.clock.set(utc("2026-11-25T10:30"))  # 18:30 in Shanghai
    h.remind.register(transaction(risk_flag=True, created_at="2026-11-25T18:30:00+08:00"))
    for at in ("2026-11-25T10:36", "2026-11-25T11:31", "2026-11-25T14:00", "2026-11-25T18:30"):
        h.clock.set(utc(at))
        h.tick()
    assert h.remind.show("tx_1")["escalated_at"] == "2026-11-25T18:30:00Z"
    notice = entries(h, "escalate")
    assert notice["email"]["status"] == "sent" and notice["sms"]["due_at"] == "2026-11-26T00:00:00Z"
    h.clock.set(utc("2026-11-25T20:00"))
    assert h.remind.confirm("tx_1")["status"] == "confirmed"  # ops, after review
    h.clock.set(utc("2026-11-26T00:01"))
    h.tick()
    assert ("escalate", "sms") not in sent(h)
    sms = entries(h, "escalate")["sms"]
    assert sms["status"] == "skipped" and "confirmed first" in sms["reason"]


def test_a_notices_fallback_waits_like_the_notice(make_harness, tmp_path):
    """The escalation email at 02:30 is refused; its fallback (push) waits for 08:00 with the SMS."""
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": outbox, "push": outbox, "email": Refusing(tmp_path / "outbox.jsonl",
                                                                               {"escalate"})})
    h.clock.set(utc("2026-11-25T10:30"))
    h.remind.register(transaction(risk_flag=True, created_at="2026-11-25T18:30:00+08:00"))
    h.clock.set(utc("2026-11-25T18:30"))  # 02:30 in Shanghai: everything before is skipped as late
    h.tick()
    notice = entries(h, "escalate")
    assert h.remind.show("tx_1")["status"] == "escalated" and notice["email"]["status"] == "failed"
    assert notice["push"]["status"] == "planned" and notice["push"]["due_at"] == "2026-11-26T00:00:00Z"
    assert "held for quiet hours until 08:00" in notice["push"]["reason"]
    assert ("escalate", "push") not in sent(h)
    h.clock.set(utc("2026-11-26T00:00"))
    h.tick()
    assert [step for step in sent(h) if step[0] == "escalate"] == [("escalate", "push"), ("escalate", "sms")]


# -- fallbacks wait out quiet hours; the final warning's never past the deadline --------------------------


def test_a_fallback_that_would_land_in_quiet_hours_waits_for_their_end(make_harness, tmp_path):
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": outbox, "email": outbox, "push": Refusing(tmp_path / "outbox.jsonl", {"nudge"})})
    h.clock.set(utc("2026-11-25T13:30"))  # 21:30 in Shanghai
    h.remind.register(transaction(created_at="2026-11-25T21:30:00+08:00"))
    h.clock.set(utc("2026-11-25T14:10"))  # 22:10: the 21:45 nudge goes late; its push is refused
    h.tick()
    assert h.lines() == []
    nudge = entries(h, "nudge")
    assert nudge["push"]["status"] == "failed" and nudge["push"]["reason"].endswith("falling back to sms")
    assert nudge["sms"]["status"] == "planned" and nudge["sms"]["due_at"] == "2026-11-26T00:00:00Z"
    assert nudge["sms"]["reason"].startswith("fallback: push failed")
    assert nudge["sms"]["reason"].endswith("held for quiet hours until 08:00 (Asia/Shanghai)")
    held = delivery(h, "nudge", "sms")
    assert h.remind.deliver(held["id"]) == "duplicate" and h.lines() == []  # a stray message: nothing early

    h.clock.set(utc("2026-11-25T23:59"))
    h.tick()
    assert h.lines() == []
    h.clock.set(utc("2026-11-26T00:00"))  # 08:00: the held fallback, with the 2h reminder held as well
    result = h.tick()
    assert result.released == 1 and ("nudge", "sms") in sent(h)
    assert entries(h, "nudge")["sms"]["status"] == "sent"


FINAL_EMAIL_ONLY = """\
name: default
match: {}
priority: 100
quiet_hours: {start: "22:00", end: "08:00", channels: [sms, push]}
steps:
  - after: 1h
    channels: [email]
    template: reminder
  - after: 20h
    channels: [email]
    template: final_warning
    fallback: [sms]
cancel:
  after: 24h
  template: cancelled
  reason: not_confirmed
  channels: [email]
"""


@pytest.mark.parametrize("created,warned,held_until", [
    # the final warning at 23:00, the deadline at 03:00: 08:00 would pass it, so its fallback goes now
    ("2026-11-24T19:00", "2026-11-25T15:00", None),
    # the final warning at 06:30, the deadline at 10:30: 08:00 leaves the final gap (2h), so it waits
    ("2026-11-25T02:30", "2026-11-25T22:30", "2026-11-26T00:00:00Z"),
])
def test_the_final_warnings_fallback_is_never_held_past_the_deadline(make_harness, tmp_path, created, warned,
                                                                       held_until):
    folder = write_files(tmp_path / "schedules", {"default.yaml": FINAL_EMAIL_ONLY})
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(schedules_dir=folder,
                     senders={"sms": outbox, "push": outbox, "email": Refusing(tmp_path / "outbox.jsonl",
                                                                               {"final_warning"})})
    h.clock.set(utc(created))
    h.remind.register(transaction(created_at=utc(created).isoformat()))
    h.clock.set(utc(created) + timedelta(hours=1, minutes=1))
    h.tick()
    h.clock.set(utc(warned))  # inside quiet hours in Shanghai; the email is refused
    h.tick()
    sms = entries(h, "final_warning")["sms"]
    deadline = utc(created) + timedelta(hours=24)
    if held_until is None:
        assert sent(h) == [("final_warning", "sms"), ("reminder", "email")]
        assert sms["status"] == "sent" and "final warning not held" in sms["reason"]
    else:
        assert sent(h) == [("reminder", "email")]
        assert sms["status"] == "planned" and sms["due_at"] == held_until
        h.clock.set(utc(held_until[:16]))
        h.tick()
        assert sent(h) == [("final_warning", "sms"), ("reminder", "email")]
        assert utc(held_until[:16]) + timedelta(hours=2) <= deadline  # the final gap is kept
    h.clock.set(deadline)
    h.tick()
    assert h.remind.show("tx_1")["status"] == "cancelled"


def test_fallback_time_follows_the_ladders_quiet_hour_rules():
    from support import ROOT

    from worker.ladder import fallback_time, load_file

    default = load_file(ROOT / "schedules" / "default.yaml")
    created, zone = utc("2026-11-25T09:00"), "Asia/Shanghai"  # 17:00 there; cancel at 24h
    deadline = created + timedelta(hours=24)

    def when(step, channel, at, deadline=deadline, created=created):
        return fallback_time(default, step, channel, utc(at), created_at=created, deadline=deadline, zone=zone)

    assert when("reminder", "sms", "2026-11-25T13:00") == (utc("2026-11-25T13:00"), None)  # 21:00: at once
    assert when("reminder", "email", "2026-11-25T15:00") == (utc("2026-11-25T15:00"), None)  # email is not held
    at, note = when("reminder", "sms", "2026-11-25T15:00")  # 23:00: to 08:00
    assert at == utc("2026-11-26T00:00") and note == "held for quiet hours until 08:00 (Asia/Shanghai)"
    # an expires_at at 07:00 there: the nudge held until 08:00 would come after it: dropped; the 2h
    # reminder is now this transaction's final warning (the 20h one falls after the deadline): at once
    assert when("nudge", "sms", "2026-11-25T15:00", utc("2026-11-25T23:00"))[0] is None
    assert when("reminder", "sms", "2026-11-25T15:00", utc("2026-11-25T23:00"))[0] == utc("2026-11-25T15:00")
    # created 03:00 there: the final warning (20h) at 23:00, the deadline at 03:00; 08:00 would pass it
    night = utc("2026-11-24T19:00")
    at, note = when("final_warning", "sms", "2026-11-25T15:30", night + timedelta(hours=24), night)
    assert at == utc("2026-11-25T15:30") and "final warning not held" in note
