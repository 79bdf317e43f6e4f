"""SendGridSender drives the real sendgrid SDK against the local SendGrid fake, which checks each request
against SendGrid's OpenAPI document."""

from __future__ import annotations

import gzip
import json
import time

import pytest
import requests

from worker.errors import PermanentSendError, TransientSendError
from worker.senders.base import OutgoingMessage
from worker.senders.sendgrid_email import SendGridSender, retry_after

EMAIL = "li.wei@example.com"
FROM = "Pay Example <noreply@pay.example>"


def email(**overrides) -> OutgoingMessage:
    values = dict(transaction_id="tx_1", step="20h", channel="email", recipient=EMAIL,
                  body="Li Wei, please confirm your transfer: https://pay.example/c/abc",
                  subject="Please confirm your transfer", html="<p>Li Wei, please <a href='#'>confirm</a></p>",
                  idempotency_key="dl_42")
    values.update(overrides)
    return OutgoingMessage(**values)


def sender(fake, **overrides) -> SendGridSender:
    options = dict(base_url=fake.base_url, timeout=2.0)
    options.update(overrides)
    return SendGridSender(fake.api_key, FROM, **options)


def test_sends_subject_both_bodies_and_custom_args(sendgrid_fake):
    message_id = sender(sendgrid_fake).send(email())

    (m,) = sendgrid_fake.messages
    assert message_id == m.message_id and len(message_id) >= 16
    assert m.to == [EMAIL] and m.from_email == "noreply@pay.example" and m.from_name == "Pay Example"
    assert m.subject == "Please confirm your transfer"
    assert m.text == email().body and m.html == email().html
    assert [c["type"] for c in m.mail["content"]] == ["text/plain", "text/html"]
    assert m.custom_args == {"delivery_key": "dl_42", "transaction_id": "tx_1", "step": "20h"}
    assert sendgrid_fake.rejected == []


def test_plain_text_only_when_there_is_no_html(sendgrid_fake):
    sender(sendgrid_fake).send(email(html=None))
    (m,) = sendgrid_fake.messages
    assert m.html is None and [c["type"] for c in m.mail["content"]] == ["text/plain"]


@pytest.mark.parametrize(("kind", "error"), [
    ("400", PermanentSendError), ("401", PermanentSendError), ("403", PermanentSendError),
    ("413", PermanentSendError), ("429", TransientSendError), ("500", TransientSendError),
    ("503", TransientSendError),
])
def test_failures_are_classified_with_the_http_status_as_code(sendgrid_fake, kind, error):
    sendgrid_fake.fail_next(1, kind)

    with pytest.raises(error) as caught:
        sender(sendgrid_fake).send(email())

    assert type(caught.value) is error and caught.value.code == kind
    assert EMAIL not in caught.value.reason and sendgrid_fake.api_key not in caught.value.reason
    if error is PermanentSendError:
        assert "l***@e***.com" in caught.value.reason


def test_a_bad_request_names_the_fields(sendgrid_fake):
    sendgrid_fake.fail_next(1, "400")
    with pytest.raises(PermanentSendError, match=r"HTTP 400 \(personalizations.0.to.0.email\)"):
        sender(sendgrid_fake).send(email())


@pytest.mark.parametrize("address", ["li.wei.example.com", "li.wei@", "li@wei@example.com"])
def test_an_invalid_address_is_refused_without_quoting_it(sendgrid_fake, address):
    with pytest.raises(PermanentSendError) as caught:
        sender(sendgrid_fake).send(email(recipient=address))
    assert caught.value.code is None and address not in caught.value.reason
    assert sendgrid_fake.requests == 0


def test_rate_limit_honours_retry_after(sendgrid_fake):
    sendgrid_fake.fail_next(1, "429")
    with pytest.raises(TransientSendError) as caught:
        sender(sendgrid_fake).send(email())
    assert caught.value.retry_after == sendgrid_fake.rate_limit_retry_after

    sendgrid_fake.fail_next(1, "429", retry_after=45)
    with pytest.raises(TransientSendError) as caught:
        sender(sendgrid_fake).send(email())
    assert caught.value.retry_after == 45


def test_retry_after_falls_back_to_the_rate_limit_reset():
    assert retry_after({"Retry-After": "7"}) == 7
    assert 3 <= retry_after({"X-RateLimit-Reset": str(int(time.time()) + 5)}) <= 5
    assert retry_after({}) is None


def test_a_timeout_is_transient_and_bounded_by_the_timeout(sendgrid_fake):
    sendgrid_fake.fail_next(1, "timeout")
    s = sender(sendgrid_fake, timeout=0.5)

    started = time.monotonic()
    with pytest.raises(TransientSendError, match="did not answer within 0.5 s"):
        s.send(email())
    assert time.monotonic() - started < 0.5 + 3.0  # the timeout plus a slow machine's margin; the fake hangs 5 s

    assert s.send(email()) == sendgrid_fake.messages[-1].message_id


def test_a_lost_response_is_transient_though_the_provider_has_the_message(sendgrid_fake):
    sendgrid_fake.fail_next(1, "lost_response")
    with pytest.raises(TransientSendError, match="did not answer"):
        sender(sendgrid_fake, timeout=0.5).send(email())
    assert len(sendgrid_fake.messages) == 1  # a retry would send it twice: the provider has no idempotency key


def test_a_dropped_connection_or_no_server_is_transient(sendgrid_fake, closed_port):
    sendgrid_fake.fail_next(1, "disconnect")
    with pytest.raises(TransientSendError, match="not reached"):
        sender(sendgrid_fake).send(email())
    with pytest.raises(TransientSendError, match="not reached: ConnectionRefusedError"):
        sender(sendgrid_fake, base_url=f"http://127.0.0.1:{closed_port}").send(email())


def test_the_base_url_is_used(sendgrid_fake):
    sender(sendgrid_fake, base_url=sendgrid_fake.base_url + "/").send(email())
    assert sendgrid_fake.requests == 1 and len(sendgrid_fake.messages) == 1


def test_a_wrong_api_key_is_permanent_and_not_echoed(sendgrid_fake):
    s = SendGridSender("SG.not-the-key", FROM, base_url=sendgrid_fake.base_url)
    with pytest.raises(PermanentSendError) as caught:
        s.send(email())
    assert caught.value.code == "401" and "not-the-key" not in caught.value.reason


def test_fail_rate_times_out_some_requests(sendgrid_fake):
    sendgrid_fake.fail_rate(p_5xx=0.0, p_timeout=1.0, seed=1)
    with pytest.raises(TransientSendError, match="did not answer"):
        sender(sendgrid_fake, timeout=0.3).send(email())


# The fake itself answers as SendGrid does.

def post(fake, body, *, key=None, headers=None) -> requests.Response:
    auth = {"Authorization": f"Bearer {key or fake.api_key}"} if key != "" else {}
    return requests.post(f"{fake.base_url}/v3/mail/send", json=body, headers={**auth, **(headers or {})}, timeout=5)


def mail(**overrides) -> dict:
    body = {"personalizations": [{"to": [{"email": EMAIL}]}], "from": {"email": "noreply@pay.example"},
            "subject": "Hi", "content": [{"type": "text/plain", "value": "hello"}]}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(("body", "field"), [
    (mail(**{"from": None}), "from"),
    (mail(personalizations=None), "personalizations"),
    (mail(custom_args={"delivery_key": "dl_1"}), "custom_args"),  # the document types it as a string
    (mail(subject=None), "subject"),
    (mail(content=None), "content"),
    (mail(content=[{"type": "text/html", "value": "<p>x</p>"}, {"type": "text/plain", "value": "x"}]), "content"),
    (mail(personalizations=[{"to": []}]), "personalizations.0.to"),
    (mail(personalizations=[{"to": [{"name": "Li"}]}]), "personalizations.0.to.0.email"),
    (mail(personalizations=[{"to": [{"email": "li.wei.example.com"}]}]), "personalizations.0.to.0.email"),
    (mail(personalizations=[{"to": [{"email": EMAIL}], "custom_args": {"n": 1}}]),
     "personalizations.0.custom_args.n"),
])
def test_the_fake_refuses_what_sendgrid_refuses(sendgrid_fake, body, field):
    response = post(sendgrid_fake, body)
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert field in [e["field"] for e in errors] and all({"message", "field", "help"} <= set(e) for e in errors)
    assert sendgrid_fake.messages == []


# What openapi-core answered when it checked each request (before the fake compiled the document's schema):
# the same fields, in the same order.
@pytest.mark.parametrize(("body", "fields"), [
    (mail(personalizations=None), ["personalizations"]),
    (mail(personalizations=[]), ["personalizations"]),
    (mail(personalizations={"to": [{"email": EMAIL}]}), ["personalizations"]),
    (mail(personalizations=[{"to": EMAIL}]), ["personalizations.0.to"]),
    (mail(personalizations=[{"to": [{"email": "li.wei.example.com"}]}]), ["personalizations.0.to.0.email"]),
    (mail(**{"from": {"email": "noreply.pay.example"}}), ["from.email"]),
    (mail(content=None), ["content"]),
    (mail(content=[{"type": "text/plain"}]), ["content.0.value"]),
    (mail(content=[{"type": "text/plain", "value": 1}]), ["content.0.value"]),
    (mail(subject=42), ["subject"]),
    (mail(send_at="tomorrow"), ["send_at"]),
    (mail(personalizations=[{"to": [{"email": "x"}, {"name": "Li"}]}], subject=None, content=[]),
     ["personalizations.0.to.0.email", "personalizations.0.to.1.email"]),  # the schema first, then the rules
])
def test_the_fake_names_the_fields_openapi_core_named(sendgrid_fake, body, fields):
    response = post(sendgrid_fake, body)
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == fields
    assert sendgrid_fake.messages == [] and len(sendgrid_fake.rejected) == 1


def test_the_fake_accepts_every_part_of_the_documented_body(sendgrid_fake):
    body = mail(
        personalizations=[{"to": [{"email": EMAIL, "name": "Li Wei"}], "cc": [{"email": "cc@example.com"}],
                           "bcc": [{"email": "bcc@example.com"}], "subject": "Hi Li", "headers": {"X-A": "1"},
                           "substitutions": {"-name-": "Li"}, "custom_args": {"k": "v"}, "send_at": 1700000000}],
        reply_to={"email": "help@pay.example"}, reply_to_list=[{"email": "a@pay.example"}, {"email": "b@pay.example"}],
        content=[{"type": "text/plain", "value": "hello"}, {"type": "text/html", "value": "<p>hello</p>"}],
        attachments=[{"content": "aGVsbG8=", "type": "text/plain", "filename": "a.txt", "disposition": "inline",
                      "content_id": "a1"}],
        categories=["reminder"], custom_args="x", batch_id="b1", asm={"group_id": 1, "groups_to_display": [1]},
        ip_pool_name="transactional", mail_settings={"sandbox_mode": {"enable": False}},
        tracking_settings={"click_tracking": {"enable": False, "enable_text": False}})
    assert post(sendgrid_fake, body).status_code == 202
    refused = post(sendgrid_fake, {**body, "attachments": [{**body["attachments"][0], "disposition": "hidden"}]})
    assert [e["field"] for e in refused.json()["errors"]] == ["attachments.0.disposition"]


def test_the_fake_takes_a_gzip_body_and_no_other_encoding(sendgrid_fake):
    headers = {"Authorization": f"Bearer {sendgrid_fake.api_key}", "Content-Type": "application/json"}
    url = f"{sendgrid_fake.base_url}/v3/mail/send"
    zipped = requests.post(url, data=gzip.compress(json.dumps(mail()).encode()), timeout=5,
                           headers={**headers, "Content-Encoding": "gzip"})
    assert zipped.status_code == 202 and sendgrid_fake.messages[-1].subject == "Hi"
    deflated = requests.post(url, data=json.dumps(mail()), timeout=5,
                             headers={**headers, "Content-Encoding": "deflate"})
    assert deflated.status_code == 400
    assert deflated.json()["errors"][0]["message"] == "Invalid header parameter: Content-Encoding"


def test_the_fake_wants_a_bearer_key_and_json(sendgrid_fake):
    assert post(sendgrid_fake, mail(), key="").status_code == 401
    assert post(sendgrid_fake, mail(), key="SG.wrong").json()["errors"][0]["message"].startswith("The provided")
    raw = requests.post(f"{sendgrid_fake.base_url}/v3/mail/send", data="x=1", timeout=5,
                        headers={"Authorization": f"Bearer {sendgrid_fake.api_key}",
                                 "Content-Type": "application/x-www-form-urlencoded"})
    assert raw.status_code == 400
    assert requests.get(f"{sendgrid_fake.base_url}/v3/mail/send", timeout=5).status_code == 405
    accepted = post(sendgrid_fake, mail())
    assert accepted.status_code == 202 and accepted.content == b"" and accepted.headers["X-Message-Id"]


# Many threads, one sender: the worker keeps up to REMIND_SEND_CONCURRENCY sends in flight per process.

def test_sequential_sends_reuse_one_connection(sendgrid_fake, connections):
    s = sender(sendgrid_fake)
    opened = connections(sendgrid_fake)

    ids = [s.send(email(idempotency_key=f"dl_{i}")) for i in range(20)]

    assert ids == [m.message_id for m in sendgrid_fake.messages] and len(set(ids)) == 20
    assert opened.opened == 1  # the SDK alone opens one per email


def test_concurrent_sends_share_pool_size_keep_alive_connections(sendgrid_fake, connections, slow, at_once,
                                                                 pool_full):
    s = sender(sendgrid_fake, pool_size=64)
    opened = connections(sendgrid_fake)
    slow(sendgrid_fake, 0.05)

    first = at_once(lambda i: s.send(email(idempotency_key=f"dl_{i}")), 64)
    second = at_once(lambda i: s.send(email(idempotency_key=f"dl_{64 + i}")), 64)

    assert all(isinstance(mid, str) for mid in first + second), [r for r in first + second if not isinstance(r, str)]
    assert len(sendgrid_fake.messages) == 128 and sendgrid_fake.rejected == []
    assert sorted(m.custom_args["delivery_key"] for m in sendgrid_fake.messages) == sorted(
        f"dl_{i}" for i in range(128))
    assert opened.opened <= 64
    assert pool_full() == []


def test_errors_on_a_pooled_connection_leave_the_next_send_working(sendgrid_fake, connections):
    s = sender(sendgrid_fake)
    opened = connections(sendgrid_fake)
    for kind in ("429", "400", "500"):
        sendgrid_fake.fail_next(1, kind)
        with pytest.raises((TransientSendError, PermanentSendError)):
            s.send(email())
        assert s.send(email()) == sendgrid_fake.messages[-1].message_id
    assert opened.opened == 1  # an error answer does not cost the connection


@pytest.mark.parametrize(("kind", "throttled"), [("429", True), ("500", False), ("503", False), ("400", False)])
def test_only_too_many_requests_is_throttled(sendgrid_fake, kind, throttled):
    sendgrid_fake.fail_next(1, kind)
    with pytest.raises((TransientSendError, PermanentSendError)) as caught:
        sender(sendgrid_fake).send(email())
    assert caught.value.throttled is throttled


def test_the_request_is_the_sdks(sendgrid_fake):
    seen = []
    handle = sendgrid_fake._handle
    sendgrid_fake._handle = lambda request: seen.append(request) or handle(request)
    s = sender(sendgrid_fake)

    s.send(email())

    (request,) = seen
    assert request.header("Authorization") == f"Bearer {sendgrid_fake.api_key}"
    assert request.header("User-Agent") == s.client.useragent and request.header("Accept") == "application/json"
    assert request.header("Content-Type") == "application/json"
    assert request.body == json.dumps(s.build(email()).get()).encode("utf-8")  # as python_http_client encodes it


def test_proxy_settings_come_from_the_environment_as_it_was_at_start(sendgrid_fake, monkeypatch, closed_port):
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")  # a proxy that is down
    proxied = sender(sendgrid_fake)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = sender(sendgrid_fake)
    monkeypatch.delenv("NO_PROXY")

    with pytest.raises(TransientSendError, match="not reached"):
        proxied.send(email())  # still goes through the proxy it was started with
    direct.send(email())  # and this one still not

    assert len(sendgrid_fake.messages) == 1
