"""Schemathesis against the app's own OpenAPI document: no 5xx, no response that breaks the schema."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient
from support import Clock, make_settings, reset_database, transaction
from test_ingest import payloads

from worker.service import Remind
from worker.web.app import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _app():
    tmp = Path(tempfile.mkdtemp(prefix="remind-fuzz-"))
    settings_ = make_settings(tmp, f"sqlite:///{tmp / 'fuzz.db'}", api_tokens="fuzz-token")
    return create_app(Remind.from_settings(settings_, clock=Clock()))


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_5xx_and_keeps_its_schema(case):
    case.call_and_validate(headers={"Authorization": "Bearer fuzz-token"}, checks=CHECKS)


# -- the ingest path over HTTP, on both stores: invalid text is a 422 and leaves no row ----------------

OK_STATUSES = {200, 201, 400, 409, 413, 422}
AUTH = {"Authorization": "Bearer fuzz-token", "content-type": "application/json"}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request):
    """A client over the app on SQLite and on PostgreSQL (which refuses NUL and lone surrogates outright)."""
    tmp = Path(tempfile.mkdtemp(prefix="remind-fuzz-"))
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'fuzz.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        reset_database(url)
    remind = Remind.from_settings(make_settings(tmp, url, api_tokens="fuzz-token"), clock=Clock())
    with TestClient(create_app(remind), raise_server_exceptions=False) as client:
        yield remind, client
    remind.store.engine.dispose()


def rows(remind: Remind) -> int:
    return sum(n for k, n in remind.store.counts().items() if k.startswith("transactions_"))


def test_a_lone_surrogate_in_metadata_is_422_naming_the_field_and_stores_nothing(api):
    remind, client = api
    body = json.dumps(transaction("tx_surrogate")).replace('"app"', '"\\ud800"')
    response = client.post("/v1/transactions", content=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "lone surrogate" in response.json()["problems"]["metadata.channel"]
    assert client.get("/v1/transactions/tx_surrogate", headers=AUTH).status_code == 404


def test_an_email_with_a_trailing_newline_is_422_naming_customer_email(api):
    _remind, client = api
    body = json.dumps(transaction("tx_newline", customer={"email": "a@b.co\n"}))
    response = client.post("/v1/transactions", content=body, headers=AUTH)
    assert response.status_code == 422 and "customer.email" in response.json()["problems"]
    assert client.get("/v1/transactions/tx_newline", headers=AUTH).status_code == 404


def test_a_nul_in_a_cancel_reason_is_422_and_the_transaction_stays_pending(api):
    _remind, client = api
    assert client.post("/v1/transactions", json=transaction("tx_nul_reason"), headers=AUTH).status_code == 201
    response = client.post("/v1/transactions/tx_nul_reason/cancel", json={"reason": "asked\x00"}, headers=AUTH)
    assert response.status_code == 422 and "reason" in response.json()["problems"]
    assert client.get("/v1/transactions/tx_nul_reason", headers=AUTH).json()["status"] == "pending"


@given(payload=payloads(), raw_utf8=st.booleans())
@example(payload=transaction("tx_fuzz", metadata={"note": "\ud800"}), raw_utf8=False)
@example(payload=transaction("tx_fuzz", customer={"id": "c\x00"}), raw_utf8=False)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_registrations_never_5xx_and_a_refusal_leaves_no_row(api, payload, raw_utf8):
    remind, client = api
    if payload["id"] == "tx_fuzz":  # one database for every example: a fresh id for each
        payload = {**payload, "id": f"fz_{uuid.uuid4().hex[:12]}"}
    # As a client library would send it (surrogates as \ud800 escapes), or raw (then not even UTF-8).
    text = json.dumps(payload, default=str, ensure_ascii=not raw_utf8)
    body = text.encode("utf-8", "surrogatepass")
    before = rows(remind)
    response = client.post("/v1/transactions", content=body, headers=AUTH)
    assert response.status_code in OK_STATUSES, response.text
    if response.status_code >= 300:
        assert rows(remind) == before, "a refused body left a row"
        return
    shown = client.get(f"/v1/transactions/{payload['id']}", headers=AUTH)
    assert shown.status_code == 200 and shown.json()["id"] == json.loads(text)["id"]
