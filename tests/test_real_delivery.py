"""The pipeline with the real providers' SDKs, chosen from settings, against local fake servers that
check every request like the real APIs (OpenAPI documents for Twilio and SendGrid)."""

from __future__ import annotations

import pytest
from support import transaction


@pytest.fixture
def providers(make_harness, twilio_fake, sendgrid_fake, fcm_fake):
    def build(**overrides):
        return make_harness(
            twilio_account_sid=twilio_fake.account_sid, twilio_auth_token=twilio_fake.auth_token,
            twilio_messaging_service_sid=twilio_fake.messaging_service_sid, twilio_api_base_url=twilio_fake.base_url,
            sendgrid_api_key=sendgrid_fake.api_key, sendgrid_from_email="reminders@pay.example",
            sendgrid_api_base_url=sendgrid_fake.base_url,
            fcm_project_id=fcm_fake.project_id, fcm_credentials_file=fcm_fake.credentials_file,
            fcm_api_base_url=fcm_fake.base_url, provider_timeout=2.0, **overrides)
    return build


def timeline(h, step, tx_id="tx_1"):
    return {e["channel"]: e for e in h.remind.show(tx_id)["timeline"] if e["step"] == step}


def test_each_channel_delivers_through_its_provider(providers, twilio_fake, sendgrid_fake, fcm_fake):
    h = providers()
    assert {c: s.name for c, s in h.remind.senders.items()} == {"sms": "twilio", "email": "sendgrid", "push": "fcm"}
    h.remind.register(transaction())
    h.at(hours=20, minutes=1).tick()  # late: only the final warning, on all three channels
    [sms] = twilio_fake.messages
    assert sms.to == "+8613800138000" and "1,012.50" in sms.body and "https://pay.example/c/" in sms.body
    assert sms.messaging_service_sid == twilio_fake.messaging_service_sid
    assert sms.status_callback == "https://pay.example/webhooks/twilio/status"
    assert int(sms.validity_period) == 4 * 3600 - 60  # until the deadline, never after it
    [mail] = sendgrid_fake.messages
    assert "li.wei@example.com" in str(mail.to)
    assert mail.subject and "https://pay.example/c/" in mail.html and "12.50" in mail.text
    [push] = fcm_fake.messages
    assert push.token == "fcm-token-1" and push.data["confirm_url"].startswith("https://pay.example/c/")
    final = timeline(h, "final_warning")
    assert {c: e["status"] for c, e in final.items()} == {"sms": "sent", "email": "sent", "push": "sent"}
    assert h.remind.store.delivery_by_provider_id(sms.sid)["channel"] == "sms"


def test_transient_provider_errors_are_retried_then_succeed(providers, twilio_fake):
    h = providers()
    twilio_fake.fail_next(1, "500")
    twilio_fake.fail_next(1, "20429")
    h.remind.register(transaction())
    h.at(minutes=125).tick()  # reminder: SMS + push
    sms = timeline(h, "reminder")["sms"]
    # three requests; the 429 (Twilio did not look at the message) used none of the delivery's attempts
    assert sms["status"] == "sent" and sms["attempts"] == 2 and len(twilio_fake.messages) == 1
    assert twilio_fake.requests == 3


def test_a_throttled_delivery_never_runs_out_of_attempts(providers, twilio_fake):
    h = providers(max_attempts=2)
    twilio_fake.fail_next(4, "20429")  # more 429s in a row than the delivery has attempts
    h.remind.register(transaction())
    h.at(minutes=125).tick()
    sms = timeline(h, "reminder")["sms"]
    assert sms["status"] == "sent" and sms["attempts"] == 1 and len(twilio_fake.messages) == 1
    assert twilio_fake.requests == 5


def test_a_timeout_is_transient_and_bounded(providers, fcm_fake):
    h = providers()
    fcm_fake.fail_next(1, "timeout")
    h.remind.register(transaction())
    h.at(minutes=16).tick()  # nudge: push
    push = timeline(h, "nudge")["push"]
    assert push["status"] == "sent" and push["attempts"] == 2


def test_an_invalid_number_is_not_retried_and_falls_back_to_email(providers, twilio_fake, sendgrid_fake):
    h = providers()
    twilio_fake.fail_next(1, "21211")
    h.remind.register(transaction())
    h.at(minutes=125).tick()
    reminder = timeline(h, "reminder")
    assert reminder["sms"]["status"] == "failed" and "21211" in reminder["sms"]["reason"]
    assert twilio_fake.requests == 1  # never retried
    assert reminder["email"]["status"] == "sent" and len(sendgrid_fake.messages) == 1


def test_an_opted_out_number_is_not_texted_again(providers, twilio_fake):
    h = providers()
    twilio_fake.opt_out("+8613800138000")
    h.remind.register(transaction())
    h.at(minutes=125).tick()
    h.at(hours=20, minutes=1).tick()
    assert twilio_fake.requests == 1
    final = timeline(h, "final_warning")
    assert final["sms"]["status"] == "skipped" and "opted out" in final["sms"]["reason"]


def test_an_unregistered_push_token_is_dropped_from_the_customer(providers, fcm_fake):
    h = providers()
    fcm_fake.unregister("fcm-token-1")
    h.remind.register(transaction(customer={"push_tokens": ["fcm-token-1", "fcm-token-2"]}))
    h.at(minutes=16).tick()
    h.at(minutes=125).tick()
    assert [m.token for m in fcm_fake.messages] == ["fcm-token-2", "fcm-token-2"]
    assert fcm_fake.requests == 3  # token 1 was tried once, then never again
