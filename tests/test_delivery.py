"""Failures while sending: transient ones retry with backoff, permanent ones never; platform webhooks
are signed (Standard Webhooks) and retried until the platform answers 2xx."""

from __future__ import annotations

import re
import threading
from datetime import timedelta

import pytest
from standardwebhooks.webhooks import Webhook
from support import T0, serve_platform, transaction

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


def entries(h, step, tx_id="tx_1"):
    return {e["channel"]: e for e in h.remind.show(tx_id)["timeline"] if e["step"] == step}


def test_transient_failures_give_up_after_max_attempts_then_fall_back(make_harness, tmp_path):
    flaky = Flaky(tmp_path / "outbox.jsonl", failures=99, error=TransientSendError)
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": outbox, "email": outbox, "push": flaky}, max_attempts=2)
    h.remind.register(transaction())
    h.at(minutes=16).tick()
    nudge = entries(h, "nudge")
    assert flaky.calls == 2 and nudge["push"]["status"] == "failed"
    assert nudge["push"]["reason"] == "gave up after 2 attempts: provider said no; falling back to sms"
    assert nudge["sms"]["status"] == "sent" and nudge["sms"]["reason"].startswith("fallback: push failed")
    assert [(x["step"], x["channel"]) for x in h.lines()] == [("nudge", "sms")]


class Refusing:
    """A sender that refuses some recipients for good with a provider code, and sends to the rest."""

    name = "refusing"

    def __init__(self, outbox, refuse: set[str], code: str) -> None:
        self.inner = OutboxSender(outbox)
        self.refuse = refuse
        self.code = code
        self.calls: list[str] = []

    def send(self, message):
        self.calls.append(message.recipient)
        if message.recipient in self.refuse:
            raise PermanentSendError(f"provider code {self.code}", code=self.code)
        return self.inner.send(message)


def test_permanent_failures_are_not_retried_and_fall_back(make_harness, tmp_path):
    push = Refusing(tmp_path / "outbox.jsonl", {"fcm-token-1"}, "INVALID_ARGUMENT")
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": outbox, "email": outbox, "push": push})
    h.remind.register(transaction())
    h.at(minutes=16).tick()
    nudge = entries(h, "nudge")
    assert push.calls == ["fcm-token-1"]  # once: never retried
    assert nudge["push"]["status"] == "failed" and nudge["push"]["reason"].endswith("falling back to sms")
    assert nudge["sms"]["status"] == "sent"


def test_an_sms_opt_out_stops_sms_for_later_steps(make_harness, tmp_path):
    sms = Refusing(tmp_path / "outbox.jsonl", {"+8613800138000"}, "21610")
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": sms, "email": outbox, "push": outbox})
    h.remind.register(transaction())
    later = (T0 + timedelta(hours=1)).isoformat()
    h.remind.register(transaction("tx_2", created_at=later))  # the same customer's other transfer
    for minutes in (16, 125, 1205):
        h.at(minutes=minutes).tick()
    assert len(sms.calls) == 1  # the first STOP answer; never asked again
    reminder = entries(h, "reminder")
    assert reminder["sms"]["status"] == "failed" and "21610" in reminder["sms"]["reason"]
    final = entries(h, "final_warning")
    assert final["sms"]["status"] == "skipped" and final["sms"]["reason"] == "the customer opted out of SMS"
    assert final["email"]["status"] == "sent" and final["push"]["status"] == "sent"
    other = entries(h, "reminder", "tx_2")
    assert other["sms"]["status"] == "skipped" and other["email"]["reason"].startswith("instead of sms")


def test_an_unregistered_push_token_is_dropped(make_harness, tmp_path):
    push = Refusing(tmp_path / "outbox.jsonl", {"fcm-token-1"}, "UNREGISTERED")
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": outbox, "email": outbox, "push": push})
    h.remind.register(transaction(customer={"push_tokens": ["fcm-token-1", "fcm-token-2"]}))
    h.at(minutes=16).tick()
    h.at(minutes=125).tick()
    assert push.calls == ["fcm-token-1", "fcm-token-2", "fcm-token-2"]
    assert entries(h, "nudge")["push"]["status"] == "sent"


@pytest.fixture
def platform():
    """A platform endpoint that verifies each webhook and answers 503 to the first one."""
    received: list[dict] = []

    def answer(body, headers):
        payload = Webhook(SECRET).verify(body, headers)  # raises on a bad signature
        received.append({"id": headers["webhook-id"], "payload": payload})
        return 503 if len(received) == 1 else 204

    server, url = serve_platform(answer)
    yield url, received
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
    [hook] = h.remind.show("tx_1")["events"]
    assert hook["status"] == "delivered" and hook["attempts"] == 2 and hook["id"] == received[0]["id"]
    at = (T0 + timedelta(hours=2)).isoformat().replace("+00:00", "Z")  # the tick at +2h cancelled it
    assert event == {"type": "transaction.cancelled", "timestamp": at, "data": {
        "id": "tx_1", "status": "cancelled", "source": "deadline", "actor": None, "reason": "not_confirmed",
        "at": at, "customer_id": "c_42", "amount": "1000.00", "currency": "CNY"}}


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
    timeline = h.remind.show("tx_1")["timeline"]
    assert len([e for e in timeline if e["step"] == "nudge"]) == 1, timeline
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


def test_at_info_a_batch_is_one_log_line_and_debug_names_each_masked_send(make_harness, caplog):
    caplog.set_level("INFO", logger="remind.delivery")
    h = make_harness()
    h.remind.register(transaction(expires_at=(T0 + timedelta(hours=21)).isoformat()))
    h.at(hours=20.5).tick()  # the final warning: sms, email and push, one batch

    # a small tick spreads its deliveries over several messages: a line per batch, counting its outcomes
    batches = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch of")]
    assert batches and all(re.fullmatch(r"batch of (\d+): \1 sent", line) for line in batches), batches
    assert sum(int(re.match(r"batch of (\d+)", line)[1]) for line in batches) == 3
    assert not [r for r in caplog.records if r.getMessage().startswith("sent ")]

    caplog.clear()
    caplog.set_level("DEBUG", logger="remind.delivery")
    h.remind.register(transaction(id="tx_2", expires_at=(T0 + timedelta(hours=21)).isoformat()))
    h.at(hours=20.6).tick()
    sent = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("sent "))
    assert len(sent) == 3 and any("sms to +86*******8000" in line for line in sent), sent


def test_an_unknown_log_level_is_refused_naming_the_setting():
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="REMIND_LOG_LEVEL"):
        Settings(REMIND_LOG_LEVEL="loud", _env_file=None)
    assert Settings(REMIND_LOG_LEVEL="DEBUG", _env_file=None).log_level == "debug"


def test_a_reminder_no_channel_can_deliver_is_reported_to_the_platform(make_harness, platform, tmp_path):
    url, received = platform
    push = Refusing(tmp_path / "outbox.jsonl", {"only-token"}, "UNREGISTERED")
    h = make_harness(senders={"sms": push, "email": push, "push": push}, platform_webhook_url=url,
                     webhook_secret=SECRET)
    h.remind.register(transaction(customer={"phone": None, "email": None, "push_tokens": ["only-token"]}))
    h.at(minutes=16).tick()
    events = [r["payload"] for r in received]
    assert events, [(e["channel"], e["state"], e["reason"]) for e in h.remind.show("tx_1")["timeline"]]
    assert all(e["type"] == "reminder.failed" for e in events)
    assert events[-1]["data"]["step"] == "nudge" and events[-1]["data"]["id"] == "tx_1"
    assert events[-1]["data"]["source"] is None and events[-1]["data"]["reason"] == "undeliverable"
    nudge = entries(h, "nudge")
    assert nudge["push"]["reason"].endswith("no channel left for this step")
    assert [e["status"] for e in h.remind.show("tx_1")["events"]] == ["pending"]  # the platform said 503
    h.at(minutes=17).tick()  # its retry's time came
    assert [(e["status"], e["attempts"]) for e in h.remind.show("tx_1")["events"]] == [("delivered", 2)]
    h.at(minutes=125).tick()  # later steps: the token is gone, nothing to try
    reminder = entries(h, "reminder")
    assert reminder["push"]["status"] == "skipped" and reminder["sms"]["reason"] == "no phone number on file"


def test_a_fallback_into_a_held_channel_does_not_stall_the_scheduler(make_harness, tmp_path):
    """Quiet hours split the final warning: email at 05:00, SMS and push held to 08:00. The email
    bouncing must not make the held SMS collide with a fallback SMS and stop every tick."""
    email = Refusing(tmp_path / "outbox.jsonl", {"li.wei@example.com"}, "400")
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": outbox, "email": email, "push": outbox})
    h.remind.register(transaction(customer={"timezone": "UTC"}))
    h.remind.register(transaction("tx_other", customer={"timezone": "UTC", "phone": "+8613900139000"}))
    h.at(hours=20, minutes=1).tick()  # 05:01 UTC: the email part of the final warning, which bounces
    h.at(hours=23, minutes=1).tick()  # 08:01 UTC: the held SMS and push
    h.at(hours=24, minutes=1).tick()
    final = entries(h, "final_warning")
    assert final["email"]["status"] == "failed" and final["sms"]["status"] == "sent"
    assert {h.remind.show(t)["status"] for t in ("tx_1", "tx_other")} == {"cancelled"}


def test_a_reminder_reached_after_the_deadline_is_skipped_not_sent(make_harness, tmp_path):
    """Under a backlog a worker can reach a reminder after its transaction's deadline: "confirm by"
    a time already past would only confuse, and the cancellation comes next."""
    push = Refusing(tmp_path / "outbox.jsonl", set(), "-")
    h = make_harness(start_worker=False, senders={"sms": push, "email": push, "push": push})
    h.remind.register(transaction())
    [delivery_id] = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    h.clock.set(T0 + timedelta(hours=24, seconds=1))  # the worker gets to it only now

    assert h.remind.deliver(delivery_id) == "skipped"

    assert push.calls == []
    nudge = entries(h, "nudge")
    assert set(nudge) == {"push"} and nudge["push"]["reason"] == "not sent: the deadline passed first"


def test_a_reminder_refused_after_the_deadline_does_not_fall_back(make_harness):
    """The provider can refuse a reminder for its deadline (Twilio's validity period) while it is in
    flight; another channel would only carry a stale reminder."""
    h = make_harness(start_worker=False)
    h.remind.register(transaction())
    [delivery_id] = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    h.remind.store.update_delivery(None, delivery_id, status="sending")  # claimed, out at the provider
    h.clock.set(T0 + timedelta(hours=24, seconds=1))

    assert h.remind.outcomes.failed(delivery_id, "not sent: the reminder's deadline has passed") is None

    nudge = entries(h, "nudge")
    assert set(nudge) == {"push"}  # no fallback delivery was created
    assert nudge["push"]["reason"].endswith("no fallback: the deadline has passed")


def test_a_reminder_refused_before_the_deadline_still_falls_back(make_harness, tmp_path):
    push = Refusing(tmp_path / "outbox.jsonl", {"fcm-token-1"}, "INVALID_ARGUMENT")
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(start_worker=False, senders={"sms": outbox, "email": outbox, "push": push})
    h.remind.register(transaction())
    [delivery_id] = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    h.clock.set(T0 + timedelta(hours=23, minutes=59))
    assert h.remind.deliver(delivery_id) == "failed"
    stored = {d["channel"]: d["status"] for d in h.remind.store.deliveries_of("tx_1") if d["step"] == "nudge"}
    assert stored == {"push": "failed", "sms": "queued"}  # the fallback waits for a worker


@pytest.mark.parametrize("ops", ["cancel", "confirm"])
def test_an_escalation_settled_otherwise_before_it_went_out_is_never_announced(make_harness, platform, ops):
    """The "under review" notice and transaction.escalated wait in the queue; meanwhile ops cancel (or
    confirm) the transaction. Neither may go out: the customer and the platform would be told a review
    is pending for a transfer that was cancelled."""
    url, received = platform
    h = make_harness(platform_webhook_url=url, webhook_secret=SECRET)
    real_enqueue, real_events, held, held_events = h.remind.enqueue, h.remind.enqueue_events, [], []
    h.remind.enqueue, h.remind.enqueue_events = held.extend, held_events.extend
    h.remind.register(transaction(risk_flag=True, customer={"timezone": "UTC"}))  # 18:00 there: not quiet
    h.at(hours=9).tick(settle=False)
    assert h.remind.show("tx_1")["status"] == "escalated" and held and held_events  # notices and event wait
    h.remind.enqueue, h.remind.enqueue_events = real_enqueue, real_events
    if ops == "cancel":
        h.remind.review("tx_1", "decline", actor="Wang Fang", reason="compliance")
    else:
        h.remind.review("tx_1", "approve", actor="Wang Fang")
    real_enqueue(held)
    real_events(held_events)
    h.drain()
    view = h.remind.show("tx_1")
    assert {line["step"] for line in h.lines()} == {"cancel" if ops == "cancel" else "approve"}  # never "escalate"
    assert [r["payload"]["type"] for r in received] == [f"transaction.{view['status']}"]
    assert received[0]["payload"]["data"]["source"] == "ops" and received[0]["payload"]["data"]["actor"] == "Wang Fang"
    final = [e for e in view["timeline"] if e["step"] == "escalate"]
    assert len(final) == len(held)
    assert {(e["status"], e["reason"]) for e in final} == {
        ("skipped", f"not sent: the transaction was {view['status']} first")}
    assert [(e["type"], e["status"]) for e in view["events"]] == [
        ("transaction.escalated", "superseded"), (f"transaction.{view['status']}", "pending")]  # the 503 first


@pytest.fixture
def unreachable_platform():
    """A platform that answers every webhook with 503."""
    received: list[str] = []
    server, url = serve_platform(lambda body, headers: received.append(headers["webhook-id"]) or 503)
    yield url, received
    server.shutdown()


def test_an_event_the_platform_never_takes_is_retried_to_the_end_of_its_window_then_resent_on_demand(
        make_harness, unreachable_platform):
    url, received = unreachable_platform
    h = make_harness(platform_webhook_url=url, webhook_secret=SECRET, event_retry_hours=1)
    h.remind.register(transaction(expires_at=(T0 + timedelta(hours=1)).isoformat()))
    h.at(hours=2).tick()  # cancelled: the event's first attempt gets a 503
    for minutes in range(1, 62, 4):  # the tick hands back each retry whose backoff ended
        h.at(hours=2, minutes=minutes).tick()
    [event] = h.remind.show("tx_1")["events"]
    assert event["status"] == "failed" and len(set(received)) == 1 and len(received) == event["attempts"] > 3
    tries = len(received)
    h.at(hours=5).tick()  # given up: the tick does not bring it back
    assert len(received) == tries
    [failed] = h.remind.events(failed_only=True)
    assert failed["id"] == event["id"] and failed["delivery"]["last_error"] == "webhook answered HTTP 503"
    assert h.remind.resend_events(failed=True) == [event["id"]]
    h.drain()
    assert len(received) == tries + 1 and received[-1] == event["id"]  # the same webhook-id again
