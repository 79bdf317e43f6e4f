"""TwilioSender drives the real twilio SDK against the local Twilio fake, which checks each request against
Twilio's OpenAPI document."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
from fakes.twilio import operation
from openapi_schema_validator import OAS30Validator

from worker.errors import PermanentSendError, TransientSendError
from worker.senders.base import OutgoingMessage
from worker.senders.twilio_sms import TwilioSender, retry_after

PHONE = "+8613800138000"
NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
CALLBACK = "https://pay.example/hooks/twilio/status"


def sms(**overrides) -> OutgoingMessage:
    values = dict(transaction_id="tx_1", step="2h", channel="sms", recipient=PHONE,
                  body="Li Wei, please confirm your transfer of CNY 1,000.00: https://pay.example/c/abc",
                  idempotency_key="dl_7")
    values.update(overrides)
    return OutgoingMessage(**values)


def sender(fake, **overrides) -> TwilioSender:
    options = dict(messaging_service_sid=fake.messaging_service_sid, base_url=fake.base_url, timeout=2.0)
    options.update(overrides)
    return TwilioSender(fake.account_sid, fake.auth_token, **options)


def test_sends_through_the_messaging_service_with_callback_and_validity(twilio_fake):
    s = sender(twilio_fake, status_callback=CALLBACK, clock=lambda: NOW)

    sid = s.send(sms(expires_at=NOW + timedelta(minutes=10)))

    (m,) = twilio_fake.messages
    assert re.fullmatch(r"SM[0-9a-f]{32}", sid) and sid == m.sid
    assert m.to == PHONE and m.body == sms().body
    assert m.messaging_service_sid == twilio_fake.messaging_service_sid and m.from_ is None
    assert m.status_callback == CALLBACK
    assert m.validity_period == 600
    assert twilio_fake.rejected == []


def test_sends_from_a_number_and_omits_validity_without_a_deadline(twilio_fake):
    s = sender(twilio_fake, messaging_service_sid=None, from_number=twilio_fake.from_number)

    s.send(sms())

    (m,) = twilio_fake.messages
    assert m.from_ == twilio_fake.from_number and m.messaging_service_sid is None
    assert "ValidityPeriod" not in m.params and "StatusCallback" not in m.params


def test_validity_period_counts_down_to_the_deadline_on_the_real_clock(twilio_fake):
    expires_at = datetime.now(UTC) + timedelta(seconds=90)
    before = datetime.now(UTC)
    sender(twilio_fake).send(sms(expires_at=expires_at))
    after = datetime.now(UTC)
    # the seconds left when the sender read the clock, however slow the machine was around it
    assert int((expires_at - after).total_seconds()) <= twilio_fake.messages[0].validity_period
    assert twilio_fake.messages[0].validity_period <= int((expires_at - before).total_seconds())


@pytest.mark.parametrize(("left", "expected"), [(timedelta(days=3), 36_000), (timedelta(seconds=1.5), 1),
                                                 (timedelta(hours=10, seconds=1), 36_000)])
def test_validity_period_is_clamped_to_twilios_range(twilio_fake, left, expected):
    sender(twilio_fake, clock=lambda: NOW).send(sms(expires_at=NOW + left))
    assert twilio_fake.messages[0].validity_period == expected


@pytest.mark.parametrize("left", [timedelta(0), timedelta(seconds=0.5), timedelta(minutes=-5)])
def test_a_reminder_past_its_deadline_is_not_handed_to_twilio(twilio_fake, left):
    with pytest.raises(PermanentSendError, match="deadline has passed"):
        sender(twilio_fake, clock=lambda: NOW).send(sms(expires_at=NOW + left))
    assert twilio_fake.requests == 0


@pytest.mark.parametrize(("kind", "error", "code"), [
    ("21211", PermanentSendError, "21211"),
    ("21610", PermanentSendError, "21610"),
    ("21614", PermanentSendError, "21614"),
    ("20429", TransientSendError, "20429"),
    ("500", TransientSendError, "20500"),
    ("503", TransientSendError, "20503"),
])
def test_failures_are_classified_with_twilios_code(twilio_fake, kind, error, code):
    twilio_fake.fail_next(1, kind)

    with pytest.raises(error) as caught:
        sender(twilio_fake).send(sms())

    assert type(caught.value) is error and caught.value.code == code
    reason = caught.value.reason
    assert PHONE not in reason and PHONE not in str(caught.value) and twilio_fake.auth_token not in reason
    if error is PermanentSendError:
        assert "+86*******8000" in reason


def test_rate_limit_carries_retry_after(twilio_fake):
    twilio_fake.fail_next(1, "20429", retry_after=30)
    with pytest.raises(TransientSendError) as caught:
        sender(twilio_fake).send(sms())
    assert caught.value.retry_after == 30


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after("12") == 12 and retry_after(None) is None and retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert 55 <= retry_after(later) <= 60


def test_an_opted_out_number_is_refused_with_21610(twilio_fake):
    twilio_fake.opt_out(PHONE)
    with pytest.raises(PermanentSendError) as caught:
        sender(twilio_fake).send(sms())
    assert caught.value.code == "21610"


def test_a_timeout_is_transient_and_bounded_by_the_timeout(twilio_fake):
    twilio_fake.fail_next(1, "timeout")
    s = sender(twilio_fake, timeout=0.5)

    started = time.monotonic()
    with pytest.raises(TransientSendError, match="did not answer within 0.5 s"):
        s.send(sms())
    assert time.monotonic() - started < 0.5 + 3.0  # the timeout plus a slow machine's margin; the fake hangs 5 s

    assert s.send(sms()) == twilio_fake.messages[-1].sid  # and the next one goes through


def test_a_lost_response_is_transient_though_the_provider_has_the_message(twilio_fake):
    twilio_fake.fail_next(1, "lost_response")
    with pytest.raises(TransientSendError, match="did not answer"):
        sender(twilio_fake, timeout=0.5).send(sms())
    assert len(twilio_fake.messages) == 1  # a retry would send it twice: the provider has no idempotency key


def test_a_dropped_connection_or_no_server_is_transient(twilio_fake, closed_port):
    twilio_fake.fail_next(1, "disconnect")
    with pytest.raises(TransientSendError, match="not reached"):
        sender(twilio_fake).send(sms())
    with pytest.raises(TransientSendError, match="not reached"):
        sender(twilio_fake, base_url=f"http://127.0.0.1:{closed_port}").send(sms())


def test_the_base_url_wins_over_twilio_edge_and_region(twilio_fake, monkeypatch):
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_REGION", "au1")
    s = sender(twilio_fake, base_url=twilio_fake.base_url + "/")

    s.send(sms())

    assert len(twilio_fake.messages) == 1 and s.client.edge is None and s.client.region is None


def test_wrong_credentials_are_permanent_and_not_echoed(twilio_fake):
    s = TwilioSender(twilio_fake.account_sid, "not-the-token", messaging_service_sid=twilio_fake.messaging_service_sid,
                     base_url=twilio_fake.base_url)
    with pytest.raises(PermanentSendError) as caught:
        s.send(sms())
    assert caught.value.code == "20003" and "not-the-token" not in caught.value.reason


def test_fail_rate_is_reproducible_from_its_seed(twilio_fake):
    s = sender(twilio_fake)

    def outcomes() -> list[bool]:
        twilio_fake.fail_rate(p_5xx=0.5, seed=7)
        results = []
        for _ in range(20):
            try:
                s.send(sms())
                results.append(True)
            except TransientSendError:
                results.append(False)
        return results

    first, second = outcomes(), outcomes()
    assert first == second and 0 < sum(first) < 20
    twilio_fake.fail_rate(0, 0)
    s.send(sms())


def test_constructor_needs_a_sender_and_an_http_base_url(twilio_fake):
    with pytest.raises(ValueError):
        TwilioSender(twilio_fake.account_sid, twilio_fake.auth_token, base_url=twilio_fake.base_url)
    with pytest.raises(ValueError):
        sender(twilio_fake, base_url="api.twilio.com")


# The fake itself answers as Twilio does.

def post(fake, data, auth=None, **kwargs) -> requests.Response:
    url = f"{fake.base_url}/2010-04-01/Accounts/{fake.account_sid}/Messages.json"
    return requests.post(url, data=data, auth=auth or (fake.account_sid, fake.auth_token), timeout=5, **kwargs)


@pytest.mark.parametrize(("data", "code"), [
    ({"To": None}, 21604),
    ({"To": "12345"}, 21211),
    ({"To": "not a number"}, 21211),
    ({"MessagingServiceSid": None}, 21603),
    ({"Body": ""}, 21602),
    ({"ValidityPeriod": "soon"}, 21624),
    ({"ValidityPeriod": "0"}, 21624),
    ({"ValidityPeriod": "36001"}, 21624),
    ({"MessagingServiceSid": "MG123"}, 70002),
    ({"StatusCallback": "not a url"}, 70002),
    ({"Body": "x" * 1601}, 21617),
])
def test_the_fake_refuses_what_twilio_refuses(twilio_fake, data, code):
    form = {"To": PHONE, "Body": "hi", "MessagingServiceSid": twilio_fake.messaging_service_sid, **data}
    response = post(twilio_fake, {k: v for k, v in form.items() if v is not None})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == code and body["status"] == 400 and body["more_info"].endswith(str(code))
    assert twilio_fake.messages == []


def test_the_fake_wants_basic_auth_form_encoding_and_the_right_account(twilio_fake):
    form = {"To": PHONE, "Body": "hi", "From": twilio_fake.from_number}
    assert post(twilio_fake, form, auth=(twilio_fake.account_sid, "wrong")).json()["code"] == 20003
    assert post(twilio_fake, None, json=form).json()["code"] == 21604  # JSON is not read: no 'To'
    other = f"{twilio_fake.base_url}/2010-04-01/Accounts/AC{'0' * 32}/Messages.json"
    assert requests.post(other, data=form, auth=(twilio_fake.account_sid, twilio_fake.auth_token),
                         timeout=5).status_code == 404
    assert post(twilio_fake, form).status_code == 201


def test_the_fakes_answer_is_a_message_resource_as_the_spec_describes(twilio_fake):
    response = post(twilio_fake, {"To": PHONE, "Body": "hi", "From": twilio_fake.from_number})
    assert response.status_code == 201
    resource = response.json()
    OAS30Validator(operation().response_schema).validate(resource)
    assert resource["status"] == "queued" and resource["sid"] == twilio_fake.messages[0].sid


def test_proxy_settings_come_from_the_environment_as_it_was_at_start(twilio_fake, monkeypatch, closed_port):
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")  # a proxy that is down
    proxied = sender(twilio_fake)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = sender(twilio_fake)

    with pytest.raises(TransientSendError):
        proxied.send(sms())  # still goes through the proxy it was started with
    direct.send(sms())

    assert len(twilio_fake.messages) == 1


# Many threads, one sender: the worker keeps up to REMIND_SEND_CONCURRENCY sends in flight per process.

def test_concurrent_sends_share_pool_size_keep_alive_connections(twilio_fake, connections, slow, at_once,
                                                                 pool_full):
    s = sender(twilio_fake, pool_size=64)
    opened = connections(twilio_fake)
    slow(twilio_fake, 0.05)  # the sends of a wave overlap

    first = at_once(lambda i: s.send(sms(idempotency_key=f"dl_{i}")), 64)
    second = at_once(lambda i: s.send(sms(idempotency_key=f"dl_{64 + i}")), 64)

    assert all(isinstance(sid, str) for sid in first + second), [r for r in first + second if not isinstance(r, str)]
    assert len(twilio_fake.messages) == 128
    assert opened.opened <= 64  # the second wave reused the first wave's connections
    assert pool_full() == []


def test_a_pool_smaller_than_the_concurrency_does_not_hold_threads_back(twilio_fake, slow, at_once):
    s = sender(twilio_fake, pool_size=2, timeout=1.0)
    slow(twilio_fake, 0.3)

    started = time.monotonic()
    results = at_once(lambda i: s.send(sms()), 16)

    assert all(isinstance(sid, str) for sid in results)
    # at once: ~0.3 s; held back to the pool's 2: 16 / 2 answers one after another, 2.4 s. The bound
    # leaves a loaded machine a second of margin on either side.
    assert time.monotonic() - started < 0.3 * 5


@pytest.mark.parametrize(("kind", "throttled"), [("20429", True), ("500", False), ("503", False),
                                                 ("21211", False)])
def test_only_too_many_requests_is_throttled(twilio_fake, kind, throttled):
    twilio_fake.fail_next(1, kind)
    with pytest.raises((TransientSendError, PermanentSendError)) as caught:
        sender(twilio_fake).send(sms())
    assert caught.value.throttled is throttled
