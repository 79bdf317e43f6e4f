"""Schemathesis against the app's own OpenAPI document: no 5xx, no response that breaks the schema."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support import Clock, make_settings

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
