"""FcmSender drives google-auth (service-account JWT grant, bearer token) and urllib3 against the local FCM fake,
which mints its own tokens and checks the v1 send format."""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from worker.errors import PermanentSendError, TransientSendError
from worker.senders.base import OutgoingMessage
from worker.senders.fcm_push import FcmSender

TOKEN = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx"


def push(**overrides) -> OutgoingMessage:
    values = dict(transaction_id="tx_1", step="15m", channel="push", recipient=TOKEN,
                  body="Please confirm your transfer of CNY 1,000.00", subject="Confirm your transfer",
                  data={"confirm_url": "https://pay.example/c/abc", "transaction_id": "tx_1", "attempt": 2,
                        "urgent": True},
                  idempotency_key="dl_9")
    values.update(overrides)
    return OutgoingMessage(**values)


def sender(fake, **overrides) -> FcmSender:
    options = dict(base_url=fake.base_url, timeout=2.0)
    options.update(overrides)
    return FcmSender(fake.project_id, fake.credentials_file, **options)


def test_sends_title_body_token_and_string_data_with_a_minted_token(fcm_fake):
    s = sender(fcm_fake)

    name = s.send(push())

    (m,) = fcm_fake.messages
    assert name == m.name and name.startswith(f"projects/{fcm_fake.project_id}/messages/")
    assert m.token == TOKEN and m.title == "Confirm your transfer" and m.body == push().body
    assert m.data == {"confirm_url": "https://pay.example/c/abc", "transaction_id": "tx_1", "attempt": "2",
                      "urgent": "true"}
    assert fcm_fake.token_requests == 1 and fcm_fake.rejected == []

    s.send(push())
    assert fcm_fake.token_requests == 1  # the token is reused until it is due


def test_no_title_or_data_when_the_message_has_none(fcm_fake):
    sender(fcm_fake).send(push(subject=None, data={}))
    (m,) = fcm_fake.messages
    assert m.message == {"token": TOKEN, "notification": {"body": push().body}}


@pytest.mark.parametrize(("kind", "error", "code"), [
    ("UNREGISTERED", PermanentSendError, "UNREGISTERED"),
    ("INVALID_ARGUMENT", PermanentSendError, "INVALID_ARGUMENT"),
    ("SENDER_ID_MISMATCH", PermanentSendError, "SENDER_ID_MISMATCH"),
    ("429", TransientSendError, "QUOTA_EXCEEDED"),
    ("500", TransientSendError, "INTERNAL"),
    ("503", TransientSendError, "UNAVAILABLE"),
])
def test_failures_are_classified_with_fcms_error_code(fcm_fake, kind, error, code):
    fcm_fake.fail_next(1, kind)

    with pytest.raises(error) as caught:
        sender(fcm_fake).send(push())

    assert type(caught.value) is error and caught.value.code == code
    assert TOKEN not in caught.value.reason and TOKEN not in str(caught.value)


def test_an_uninstalled_app_is_unregistered(fcm_fake):
    fcm_fake.unregister(TOKEN)
    with pytest.raises(PermanentSendError) as caught:
        sender(fcm_fake).send(push())
    assert caught.value.code == "UNREGISTERED" and "dQw4…(" in caught.value.reason


def test_rate_limit_and_unavailable_carry_retry_after(fcm_fake):
    fcm_fake.fail_next(1, "429")
    fcm_fake.fail_next(1, "503", retry_after=20)
    s = sender(fcm_fake)
    with pytest.raises(TransientSendError) as first:
        s.send(push())
    with pytest.raises(TransientSendError) as second:
        s.send(push())
    assert first.value.retry_after == fcm_fake.rate_limit_retry_after and second.value.retry_after == 20


def test_a_server_error_is_not_retried_behind_our_back(fcm_fake):
    fcm_fake.fail_next(1, "500")
    with pytest.raises(TransientSendError):
        sender(fcm_fake).send(push())
    assert fcm_fake.requests == 1 and fcm_fake.messages == []


def test_a_revoked_token_is_refreshed_and_the_post_made_once_more(fcm_fake):
    s = sender(fcm_fake)
    s.send(push())
    fcm_fake.revoke_tokens()

    s.send(push())

    assert fcm_fake.token_requests == 2 and fcm_fake.requests == 3 and len(fcm_fake.messages) == 2


def test_a_timeout_is_transient_and_bounded_by_the_timeout(fcm_fake):
    s = sender(fcm_fake, timeout=0.5)
    s.send(push())  # the token is fetched first
    fcm_fake.fail_next(1, "timeout")

    started = time.monotonic()
    with pytest.raises(TransientSendError, match="did not answer within 0.5 s"):
        s.send(push())
    assert time.monotonic() - started < 0.5 + 3.0  # the timeout plus a slow machine's margin; the fake hangs 5 s


def test_a_lost_response_is_transient_though_the_provider_has_the_message(fcm_fake):
    fcm_fake.fail_next(1, "lost_response")
    with pytest.raises(TransientSendError, match="did not answer"):
        sender(fcm_fake, timeout=0.5).send(push())
    assert len(fcm_fake.messages) == 1  # a retry would send it twice: the provider has no idempotency key


def test_a_dropped_connection_or_no_server_is_transient(fcm_fake, closed_port):
    s = sender(fcm_fake)
    s.send(push())
    fcm_fake.fail_next(1, "disconnect")
    with pytest.raises(TransientSendError, match="not reached"):
        s.send(push())
    with pytest.raises(TransientSendError):
        sender(fcm_fake, base_url=f"http://127.0.0.1:{closed_port}").send(push())


def test_credentials_the_token_endpoint_refuses_are_permanent(fcm_fake, tmp_path):
    info = json.loads(fcm_fake.credentials_file.read_text())
    info["client_email"] = "someone-else@remind-test.iam.gserviceaccount.com"
    (tmp_path / "other.json").write_text(json.dumps(info))
    s = FcmSender(fcm_fake.project_id, tmp_path / "other.json", base_url=fcm_fake.base_url)
    with pytest.raises(PermanentSendError, match="credentials"):
        s.send(push())
    assert fcm_fake.requests == 0


def test_an_unreachable_token_endpoint_is_transient(fcm_fake, tmp_path, closed_port):
    info = json.loads(fcm_fake.credentials_file.read_text())
    info["token_uri"] = f"http://127.0.0.1:{closed_port}/token"
    (tmp_path / "down.json").write_text(json.dumps(info))
    with pytest.raises(TransientSendError, match="token"):
        FcmSender(fcm_fake.project_id, tmp_path / "down.json", base_url=fcm_fake.base_url).send(push())


def test_the_base_url_is_used(fcm_fake):
    sender(fcm_fake, base_url=fcm_fake.base_url + "/").send(push())
    assert fcm_fake.requests == 1 and len(fcm_fake.messages) == 1


def test_another_project_is_refused(fcm_fake):
    s = FcmSender("someone-elses-project", fcm_fake.credentials_file, base_url=fcm_fake.base_url)
    with pytest.raises(PermanentSendError) as caught:
        s.send(push())
    assert caught.value.code == "PERMISSION_DENIED"


# The fake itself answers as FCM and Google's token endpoint do.

def post(fake, body, token=None) -> requests.Response:
    token = fake.mint_token() if token is None else token
    return requests.post(f"{fake.base_url}/v1/projects/{fake.project_id}/messages:send", json=body,
                         headers={"Authorization": f"Bearer {token}"}, timeout=5)


@pytest.mark.parametrize("body", [
    {"message": {"token": TOKEN}, "extra": 1},
    {"message": {"token": TOKEN, "priority": "high"}},
    {"message": {"token": TOKEN, "topic": "news"}},
    {"message": {"notification": {"title": "x"}}},
    {"message": {"token": TOKEN, "notification": {"title": "x", "sound": "default"}}},
    {"message": {"token": TOKEN, "data": {"attempt": 2}}},
    {"message": {"token": TOKEN, "data": {"from": "x"}}},
    {"message": {"token": "not a token"}},
    {"token": TOKEN},
])
def test_the_fake_refuses_what_fcm_refuses(fcm_fake, body):
    response = post(fcm_fake, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT" and error["message"]
    assert {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": "INVALID_ARGUMENT"} in error["details"]
    assert fcm_fake.messages == []


def test_the_fake_wants_a_token_it_minted(fcm_fake):
    body = {"message": {"token": TOKEN, "notification": {"title": "t", "body": "b"}}}
    assert post(fcm_fake, body, token="ya29.forged").json()["error"]["status"] == "UNAUTHENTICATED"
    assert post(fcm_fake, body, token=fcm_fake.mint_token(lifetime=-1)).status_code == 401
    assert post(fcm_fake, body).status_code == 200
    assert post(fcm_fake, {**body, "validate_only": True}).status_code == 200 and len(fcm_fake.messages) == 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_token_endpoint_checks_the_jwt_grant(fcm_fake):
    info = json.loads(fcm_fake.credentials_file.read_text())
    now = int(time.time())
    claims = {"iss": info["client_email"], "aud": "https://oauth2.googleapis.com/token", "iat": now,
              "exp": now + 3600, "scope": "https://www.googleapis.com/auth/firebase.messaging"}
    signing_input = f"{_b64(json.dumps({'alg': 'RS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = signing_input + "." + _b64(stranger.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))

    def grant(**form) -> requests.Response:
        return requests.post(info["token_uri"], data=form, timeout=5)

    refused = grant(grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer", assertion=forged)
    assert refused.status_code == 400 and refused.json() == {"error": "invalid_grant",
                                                             "error_description": "Invalid JWT Signature."}
    assert grant(grant_type="client_credentials").json()["error"] == "unsupported_grant_type"


# Many threads, one sender: the worker keeps up to REMIND_SEND_CONCURRENCY sends in flight per process.

def test_concurrent_sends_share_pool_size_keep_alive_connections(fcm_fake, connections, slow, at_once, pool_full):
    s = sender(fcm_fake, pool_size=64)
    opened = connections(fcm_fake)
    slow(fcm_fake, 0.05)

    first = at_once(lambda i: s.send(push(idempotency_key=f"dl_{i}")), 64)
    second = at_once(lambda i: s.send(push(idempotency_key=f"dl_{64 + i}")), 64)

    assert all(isinstance(name, str) for name in first + second), [r for r in first + second
                                                                   if not isinstance(r, str)]
    assert len(fcm_fake.messages) == 128 and fcm_fake.rejected == []
    assert fcm_fake.token_requests == 1  # one thread fetched the token, the 63 others waited for it
    assert opened.opened <= 64 + 1  # and the token endpoint (on the same fake) one more
    assert pool_full() == []


def test_threads_that_waited_for_a_failed_token_fetch_do_not_each_try_again(fcm_fake, tmp_path, slow, at_once):
    info = json.loads(fcm_fake.credentials_file.read_text())
    info["client_email"] = "someone-else@remind-test.iam.gserviceaccount.com"
    (tmp_path / "other.json").write_text(json.dumps(info))
    s = FcmSender(fcm_fake.project_id, tmp_path / "other.json", base_url=fcm_fake.base_url, pool_size=16)
    slow(fcm_fake, 0.2)  # every thread is waiting before the first fetch is refused

    results = at_once(lambda i: s.send(push()), 16)

    assert all(isinstance(r, PermanentSendError) and "credentials" in r.reason for r in results)
    assert fcm_fake.token_requests <= 2 and fcm_fake.requests == 0


@pytest.mark.parametrize(("kind", "throttled"), [("429", True), ("500", False), ("503", False),
                                                 ("INVALID_ARGUMENT", False)])
def test_only_too_many_requests_is_throttled(fcm_fake, kind, throttled):
    fcm_fake.fail_next(1, kind)
    with pytest.raises((TransientSendError, PermanentSendError)) as caught:
        sender(fcm_fake).send(push())
    assert caught.value.throttled is throttled


def test_resource_exhausted_is_throttled_whatever_the_http_status(fcm_fake):
    s = sender(fcm_fake)
    # what a quota error could come back as: the body still says it
    body = json.dumps({"error": {"code": 403, "status": "RESOURCE_EXHAUSTED", "message": "quota"}}).encode()
    error = s._classify(403, body, {"Retry-After": "9"}, TOKEN)
    assert isinstance(error, TransientSendError) and error.throttled and error.retry_after == 9
