"""Access: three token scopes (platform, ops, metrics), each a rotation list, never read from a URL; the
/ops sign-in form and its signed session cookie, which expires on the service's clock and dies with its token."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient
from support import Clock, make_settings, transaction

from worker.service import Remind
from worker.settings import Settings
from worker.web.app import create_app
from worker.web.security import OPS_COOKIE

TOKENS = {"api_tokens": "plat-old, plat-new", "ops_tokens": "ops-old,ops-new", "metrics_tokens": "prom-1"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def app_for(tmp_path, clock: Clock | None = None, **overrides) -> tuple[Remind, TestClient]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'access.db'}", **{**TOKENS, **overrides})
    remind = Remind.from_settings(settings, clock=clock or Clock())
    return remind, TestClient(create_app(remind), base_url="https://testserver", follow_redirects=False)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(tmp_path, clock):
    _, c = app_for(tmp_path, clock)
    with c:
        yield c


def register(client: TestClient, token: str, tx_id: str = "tx_a"):
    return client.post("/v1/transactions", content=json.dumps(transaction(tx_id)),
                       headers={**bearer(token), "content-type": "application/json"})


def login(client: TestClient, token: str):
    return client.post("/ops/login", data={"token": token})


# -- scopes ------------------------------------------------------------------------------------------------

def test_each_scope_is_accepted_only_where_it_belongs(client):
    assert register(client, "plat-new").status_code == 201
    assert client.get("/v1/transactions/tx_a", headers=bearer("plat-new")).status_code == 200
    assert client.get("/v1/stats", headers=bearer("ops-new")).status_code == 200
    assert client.get("/ops", headers=bearer("ops-new")).status_code == 200
    assert client.get("/metrics", headers=bearer("prom-1")).status_code == 200

    # a valid token of another scope: 403, and nothing written
    refused = register(client, "ops-new", "tx_ops")
    assert refused.status_code == 403 and "REMIND_API_TOKEN" in refused.json()["detail"]
    assert client.get("/v1/transactions/tx_ops", headers=bearer("plat-new")).status_code == 404
    cancel = client.post("/v1/transactions/tx_a/cancel", json={"reason": "x"}, headers=bearer("prom-1"))
    assert cancel.status_code == 403
    assert client.get("/v1/transactions/tx_a", headers=bearer("plat-new")).json()["status"] == "pending"
    assert client.delete("/v1/customers/c_1/personal-data", headers=bearer("ops-new")).status_code == 403
    stats = client.get("/v1/stats", headers=bearer("plat-new"))
    assert stats.status_code == 403 and "REMIND_OPS_TOKEN" in stats.json()["detail"]
    assert client.get("/v1/stats", headers=bearer("prom-1")).status_code == 403
    assert client.get("/metrics", headers=bearer("plat-new")).status_code == 403
    assert client.get("/metrics", headers=bearer("ops-new")).status_code == 403
    # the platform's token never opens the page, nor signs in to it
    assert client.get("/ops", headers=bearer("plat-new")).headers["location"] == "/ops/login"
    assert login(client, "plat-new").status_code == 401 and OPS_COOKIE not in client.cookies
    # unknown tokens: 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer("nope")).status_code == 401
    assert client.get("/v1/stats", headers=bearer("nope")).status_code == 401


def test_every_token_of_a_rotation_list_works(client):
    for token in ("plat-old", "plat-new"):
        assert client.get("/v1/transactions/none", headers=bearer(token)).status_code == 404
    for token in ("ops-old", "ops-new"):
        assert client.get("/v1/stats", headers=bearer(token)).status_code == 200
        client.cookies.clear()
        assert login(client, token).status_code == 303 and client.get("/ops").status_code == 200


@pytest.mark.parametrize("path", ["/ops?token=ops-new", "/ops?token=plat-new", "/v1/stats?token=ops-new",
                                  "/v1/transactions/none?token=plat-new", "/metrics?token=prom-1",
                                  "/ops?access_token=ops-new", "/v1/stats?access_token=ops-new"])
def test_no_token_is_read_from_a_url(client, path):
    response = client.get(path)
    assert response.status_code in (401, 303)
    if response.status_code == 303:
        assert response.headers["location"] == "/ops/login"


def test_a_token_shared_between_scopes_is_refused_at_start(tmp_path):
    with pytest.raises(ValidationError) as raised:
        make_settings(tmp_path, "sqlite://", api_tokens="same-token", ops_tokens="other, same-token")
    assert "REMIND_API_TOKEN" in str(raised.value) and "REMIND_OPS_TOKEN" in str(raised.value)


def test_metrics_without_a_token_set_is_open_in_development_and_refused_in_production(tmp_path):
    _, dev = app_for(tmp_path, metrics_tokens="")
    assert dev.get("/metrics").status_code == 200
    _, prod = app_for(tmp_path, metrics_tokens="", env="production")
    refused = prod.get("/metrics")
    assert refused.status_code == 401 and "REMIND_METRICS_TOKEN" in refused.json()["detail"]
    assert prod.get("/metrics", headers=bearer("ops-new")).status_code == 401


# -- the /ops sign-in ----------------------------------------------------------------------------------------

def test_ops_signs_in_with_a_form_and_a_strict_cookie(client):
    first = client.get("/ops")
    assert first.status_code == 303 and first.headers["location"] == "/ops/login"
    form = client.get("/ops/login")
    assert form.status_code == 200 and '<form method="post" action="/ops/login">' in form.text
    assert 'type="password"' in form.text and "default-src 'none'" in form.headers["content-security-policy"]

    wrong = login(client, "ops-nope")
    assert wrong.status_code == 401 and "not a valid ops token" in wrong.text and "set-cookie" not in wrong.headers

    ok = login(client, "ops-new")
    assert ok.status_code == 303 and ok.headers["location"] == "/ops"
    cookie = ok.headers["set-cookie"]
    flags = [f.strip().lower() for f in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "secure" in flags  # public URL is https
    assert "path=/ops" in flags and f"max-age={12 * 3600}" in flags
    assert "ops-new" not in cookie  # the token itself is never in the cookie
    page = client.get("/ops")
    assert page.status_code == 200 and "Confirmation funnel" in page.text and "Sign out" in page.text

    out = client.post("/ops/logout")
    assert out.status_code == 303 and out.headers["location"] == "/ops/login"
    assert OPS_COOKIE not in client.cookies
    assert client.get("/ops").status_code == 303


def test_the_cookie_is_not_secure_on_a_plain_http_public_url(tmp_path):
    _, client = app_for(tmp_path, public_url="http://127.0.0.1:8000")
    flags = [f.strip().lower() for f in login(client, "ops-new").headers["set-cookie"].split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags


def test_a_tampered_or_foreign_cookie_is_refused(client, tmp_path):
    value = login(client, "ops-new").cookies[OPS_COOKIE]
    payload, _, signature = value.rpartition(".")
    for forged in (payload + "." + signature[::-1], "x" + value, "", value.split(".")[0]):
        client.cookies.clear()
        client.cookies.set(OPS_COOKIE, forged, path="/ops")
        assert client.get("/ops").status_code == 303, forged
    # signed with another REMIND_SECRET_KEY
    (tmp_path / "other").mkdir()
    _, other = app_for(tmp_path / "other", secret_key="another-secret-key-entirely")
    foreign = login(other, "ops-new").cookies[OPS_COOKIE]
    client.cookies.clear()
    client.cookies.set(OPS_COOKIE, foreign, path="/ops")
    assert client.get("/ops").status_code == 303


def test_the_cookie_expires_after_12_hours_on_the_service_clock(client, clock):
    assert login(client, "ops-new").status_code == 303
    clock.advance(hours=11, minutes=59)
    assert client.get("/ops").status_code == 200
    clock.advance(minutes=1)
    assert client.get("/ops").status_code == 303


def test_removing_a_token_from_the_list_ends_its_sessions(tmp_path, clock):
    remind, client = app_for(tmp_path, clock)
    login(client, "ops-old")
    old_cookie = client.cookies[OPS_COOKIE]
    assert client.get("/ops").status_code == 200
    # the rotation is finished: ops-old is removed (the same database and key, a new process)
    rotated = Remind(remind.settings.model_copy(update={"ops_tokens": "ops-new"}), remind.store, remind.registry,
                     remind.templates, remind.senders)
    after = TestClient(create_app(rotated), base_url="https://testserver", follow_redirects=False)
    after.cookies.set(OPS_COOKIE, old_cookie, path="/ops")
    assert after.get("/ops").status_code == 303
    assert after.get("/v1/stats", headers=bearer("ops-old")).status_code == 401
    login(after, "ops-new")
    assert after.get("/ops").status_code == 200


def test_ops_is_closed_when_no_ops_token_is_set(tmp_path):
    _, client = app_for(tmp_path, ops_tokens="")
    assert client.get("/ops").status_code == 303
    closed = client.get("/ops/login")
    assert closed.status_code == 401 and "REMIND_OPS_TOKEN" in closed.text
    assert login(client, "").status_code == 401 and "set-cookie" not in login(client, "").headers
    disabled = client.get("/v1/stats", headers=bearer("plat-new"))
    assert disabled.status_code == 401 and "set REMIND_OPS_TOKEN" in disabled.json()["detail"]


def test_settings_read_the_three_scopes_from_the_environment(monkeypatch):
    monkeypatch.setenv("REMIND_API_TOKEN", "a1, a2")
    monkeypatch.setenv("REMIND_OPS_TOKEN", "o1")
    monkeypatch.setenv("REMIND_METRICS_TOKEN", "m1,m2,")
    assert Settings(_env_file=None).token_lists == {"platform": ["a1", "a2"], "ops": ["o1"], "metrics": ["m1", "m2"]}



def test_failed_sign_ins_are_limited_per_client_address(tmp_path, clock):
    """Ten wrong tokens from one address in five minutes; then 429 with Retry-After, and while it lasts not even
    the right token is looked at, so guessing goes no faster however many tries are sent."""
    remind, client = app_for(tmp_path, clock)
    other = TestClient(client.app, base_url="https://testserver", follow_redirects=False,
                       client=("203.0.113.9", 50000))
    with client, other:
        for _ in range(9):
            assert login(client, "ops-guess").status_code == 401
        clock.advance(minutes=2)
        assert login(client, "ops-guess").status_code == 401  # the tenth
        blocked = login(client, "ops-new")
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) == 180
        assert "Too many failed sign-ins" in blocked.text and "3 minutes" in blocked.text
        assert OPS_COOKIE not in blocked.cookies and "set-cookie" not in blocked.headers
        assert login(other, "ops-new").status_code == 303  # another address signs in as usual
        assert client.get("/ops", headers=bearer("ops-new")).status_code == 200  # a bearer header is not limited

        clock.advance(minutes=3, seconds=1)  # the first nine failures left the window
        assert login(client, "ops-new").status_code == 303
        assert client.get("/ops").status_code == 200
        for _ in range(10):
            assert login(client, "ops-guess").status_code == 401  # a success starts the count afresh
        assert login(client, "ops-guess").status_code == 429
