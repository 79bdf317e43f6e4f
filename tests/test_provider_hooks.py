"""Status webhooks from Twilio and SendGrid: verified with the SDKs' validators; forged ones change nothing."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.testclient import TestClient
from support import transaction
from twilio.request_validator import RequestValidator

from worker.senders import OutboxSender
from worker.web.app import create_app

AUTH_TOKEN = "twilio-auth-token-for-tests"
PUBLIC = "https://pay.example"


class WithIds(OutboxSender):
    """The outbox, answering with provider-style message ids (SM… for SMS, a message id for email)."""

    def send(self, message):
        super().send(message)
        return {"sms": "SM", "email": "EM", "push": "PU"}[message.channel] + message.idempotency_key


@pytest.fixture
def ec_key():
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, base64.b64encode(der).decode()


@pytest.fixture
def setup(make_harness, tmp_path, ec_key):
    sender = WithIds(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": sender, "email": sender, "push": sender}, twilio_auth_token=AUTH_TOKEN,
                     sendgrid_event_public_key=ec_key[1])
    h.remind.register(transaction())
    h.at(minutes=125).tick()  # the reminder: SMS + push
    with TestClient(create_app(h.remind)) as client:
        yield h, client


def entries(h, step):
    return {e["channel"]: e for e in h.remind.show("tx_1")["timeline"] if e["step"] == step}


def sms_sid(h) -> str:
    return "SMdl_" + str(next(d["id"] for d in h.remind.store.deliveries_of("tx_1") if d["channel"] == "sms"))


def twilio_post(client, path, params, *, token=AUTH_TOKEN):
    signature = RequestValidator(token).compute_signature(f"{PUBLIC}{path}", params)
    return client.post(path, data=params, headers={"X-Twilio-Signature": signature})


def test_twilio_delivered_is_recorded(setup):
    h, client = setup
    response = twilio_post(client, "/webhooks/twilio/status", {"MessageSid": sms_sid(h), "MessageStatus": "delivered"})
    assert response.status_code == 204
    assert entries(h, "reminder")["sms"]["status"] == "delivered"


def test_a_forged_or_unsigned_twilio_callback_changes_nothing(setup):
    h, client = setup
    params = {"MessageSid": sms_sid(h), "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert twilio_post(client, "/webhooks/twilio/status", params, token="not-the-token").status_code == 403
    assert client.post("/webhooks/twilio/status", data=params).status_code == 403
    assert entries(h, "reminder")["sms"]["status"] == "sent"


def test_twilio_undelivered_falls_back_to_email(setup):
    h, client = setup
    params = {"MessageSid": sms_sid(h), "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert twilio_post(client, "/webhooks/twilio/status", params).status_code == 204
    h.drain()
    reminder = entries(h, "reminder")
    assert reminder["sms"]["status"] == "failed" and "30003" in reminder["sms"]["reason"]
    assert reminder["email"]["status"] == "sent" and reminder["email"]["reason"].startswith("fallback: sms failed")
    # the audit trail keeps what the provider said, when, and about which message
    [line] = [x for x in h.remind.show("tx_1")["history"] if x["source"] == "provider"]
    assert (line["action"], line["actor"], line["note"]) == ("undelivered", "twilio", "reminder sms (error 30003)")
    assert line["at"] == h.clock().isoformat().replace("+00:00", "Z")


def test_an_inbound_stop_turns_sms_off_for_later_steps(setup):
    h, client = setup
    response = twilio_post(client, "/webhooks/twilio/inbound", {"From": "+8613800138000", "Body": " stop "})
    assert response.status_code == 200 and "<Response>" in response.text
    h.at(minutes=1205).tick()
    final = entries(h, "final_warning")
    assert final["sms"]["status"] == "skipped" and final["sms"]["reason"] == "the customer opted out of SMS"
    assert final["email"]["status"] == "sent"


def sendgrid_post(client, key, events, *, tamper=False):
    body = json.dumps(events)
    timestamp = str(int(time.time()))
    signature = base64.b64encode(key.sign((timestamp + body).encode(), ec.ECDSA(hashes.SHA256()))).decode()
    if tamper:
        body = body.replace("delivered", "bounce")
    return client.post("/webhooks/sendgrid/events", content=body, headers={
        "X-Twilio-Email-Event-Webhook-Signature": signature, "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "content-type": "application/json"})


def email_key(h) -> str:
    h.at(minutes=1205).tick()  # final warning: SMS, email and push
    return "dl_" + str(next(d["id"] for d in h.remind.store.deliveries_of("tx_1") if d["channel"] == "email"))


def test_sendgrid_events_are_verified_and_recorded(setup, ec_key):
    h, client = setup
    key = email_key(h)
    event = {"event": "delivered", "email": "li.wei@example.com", "delivery_key": key, "timestamp": 1}
    assert sendgrid_post(client, ec_key[0], [event], tamper=True).status_code == 403
    assert entries(h, "final_warning")["email"]["status"] == "sent"
    assert sendgrid_post(client, ec_key[0], [event]).status_code == 204
    assert entries(h, "final_warning")["email"]["status"] == "delivered"


def test_a_sendgrid_bounce_fails_the_email_and_an_unsubscribe_stops_email(setup, ec_key):
    h, client = setup
    key = email_key(h)
    bounce = {"event": "bounce", "email": "li.wei@example.com", "delivery_key": key,
              "reason": "550 5.1.1 <li.wei@example.com>: mailbox unavailable"}
    unsubscribe = {"event": "unsubscribe", "email": "li.wei@example.com", "delivery_key": key}
    assert sendgrid_post(client, ec_key[0], [bounce, unsubscribe]).status_code == 204
    email = entries(h, "final_warning")["email"]
    assert email["status"] == "failed" and "l***@e***.com" in email["reason"]
    assert "li.wei@example.com" not in email["reason"]
    history = [(x["action"], x["actor"], x["note"]) for x in h.remind.show("tx_1")["history"]]
    assert ("bounce", "sendgrid", "final_warning email") in history
    assert "li.wei@example.com" not in str(history)
    h.remind.register(transaction("tx_2", created_at=(h.clock() - timedelta(minutes=35)).isoformat(),
                                  customer={"segment": "new"}))
    h.tick()  # new_customer's guide goes by email + push: email is now off for this customer
    guide = {e["channel"]: e for e in h.remind.show("tx_2")["timeline"] if e["step"] == "guide"}
    assert guide["email"]["status"] == "skipped" and "unsubscribed" in guide["email"]["reason"]


def test_an_inbound_start_after_stop_turns_sms_back_on(setup):
    h, client = setup
    stop = twilio_post(client, "/webhooks/twilio/inbound", {"From": "+8613800138000", "Body": "STOP"})
    assert stop.status_code == 200
    response = twilio_post(client, "/webhooks/twilio/inbound", {"From": "+8613800138000", "Body": " Start "})
    assert response.status_code == 200 and "<Response>" in response.text
    h.at(minutes=1205).tick()
    final = entries(h, "final_warning")
    assert final["sms"]["status"] == "sent"  # re-subscribed: the final warning goes by SMS again
    assert [line["recipient"] for line in h.lines("tx_1") if line["step"] == "final_warning"
            and line["channel"] == "sms"] == ["+8613800138000"]


# -- a status callback that beats the worker's write of the message id --------------------------------


class CallbackFirst(WithIds):
    """Twilio at its fastest: the status callback reaches us before send() has even returned the sid,
    so before the worker can write it on the delivery."""

    def __init__(self, path, status: str, code: str | None = None) -> None:
        super().__init__(path)
        self.client = None
        self.status, self.code = status, code
        self.answers: list[int] = []

    def send(self, message):
        sid = super().send(message)
        if message.channel == "sms":
            params = {"MessageSid": sid, "MessageStatus": self.status}
            if self.code:
                params["ErrorCode"] = self.code
            self.answers.append(twilio_post(self.client, "/webhooks/twilio/status", params).status_code)
        return sid


def early(make_harness, tmp_path, status, code=None):
    sender = CallbackFirst(tmp_path / "outbox.jsonl", status, code)
    h = make_harness(senders={"sms": sender, "email": sender, "push": sender}, twilio_auth_token=AUTH_TOKEN)
    return h, sender


def test_a_twilio_callback_before_the_sid_is_written_is_kept_and_applied(make_harness, tmp_path):
    h, sender = early(make_harness, tmp_path, "delivered")
    with TestClient(create_app(h.remind)) as client:
        sender.client = client
        h.remind.register(transaction())
        h.at(minutes=125).tick()  # the reminder: SMS + push; Twilio says "delivered" mid-send
    assert sender.answers == [204]
    assert entries(h, "reminder")["sms"]["status"] == "delivered"
    assert entries(h, "reminder")["push"]["status"] == "sent"  # only the message the callback named


def test_an_early_undelivered_callback_falls_back_once_the_sid_is_written(make_harness, tmp_path):
    h, sender = early(make_harness, tmp_path, "undelivered", "30003")
    with TestClient(create_app(h.remind)) as client:
        sender.client = client
        h.remind.register(transaction())
        h.at(minutes=125).tick()
        h.drain()
    reminder = entries(h, "reminder")
    assert reminder["sms"]["status"] == "failed" and "30003" in reminder["sms"]["reason"]
    assert reminder["email"]["status"] == "sent" and reminder["email"]["reason"].startswith("fallback: sms failed")
    # the audit trail keeps what the provider said, when, and about which message
    [line] = [x for x in h.remind.show("tx_1")["history"] if x["source"] == "provider"]
    assert (line["action"], line["actor"], line["note"]) == ("undelivered", "twilio", "reminder sms (error 30003)")
    assert line["at"] == h.clock().isoformat().replace("+00:00", "Z")


def test_a_kept_callback_is_applied_by_the_sweep_when_the_worker_stopped_before_looking(setup):
    h, client = setup
    sid = sms_sid(h)
    d = h.remind.store.delivery_by_provider_id(sid)
    h.remind.store.update_delivery(None, d["id"], provider_id=None)  # as if the worker had not written it yet
    assert twilio_post(client, "/webhooks/twilio/status", {"MessageSid": sid, "MessageStatus": "delivered"}
                       ).status_code == 204
    assert entries(h, "reminder")["sms"]["status"] == "sent"  # kept, not lost, not applied to anything
    h.remind.store.update_delivery(None, d["id"], provider_id=sid)  # ... and then it wrote it, and stopped
    h.remind.tick()  # the scheduler's next tick sweeps
    assert entries(h, "reminder")["sms"]["status"] == "delivered"
    assert h.remind.outcomes.sweep_early_callbacks() == 0  # applied once


# -- hard bounces and blocks stop email like an unsubscribe --------------------------------------------


@pytest.mark.parametrize("event", [
    {"event": "bounce", "type": "bounce", "reason": "550 5.1.1 mailbox does not exist"},
    {"event": "bounce", "type": "blocked", "reason": "554 5.7.1 blocked by policy"},
    {"event": "dropped", "reason": "Bounced Address"},
])
def test_a_hard_bounce_or_block_suppresses_the_address_for_later_reminders(setup, ec_key, event):
    h, client = setup
    key = email_key(h)
    assert sendgrid_post(client, ec_key[0], [{**event, "email": "li.wei@example.com", "delivery_key": key}]
                         ).status_code == 204
    assert entries(h, "final_warning")["email"]["status"] == "failed"
    h.remind.register(transaction("tx_2", created_at=(h.clock() - timedelta(minutes=35)).isoformat(),
                                  customer={"segment": "new"}))
    h.tick()  # new_customer's guide goes by email + push
    guide = {e["channel"]: e for e in h.remind.show("tx_2")["timeline"] if e["step"] == "guide"}
    assert guide["email"]["status"] == "skipped" and "bounced" in guide["email"]["reason"]
    assert guide["push"]["status"] == "sent"

