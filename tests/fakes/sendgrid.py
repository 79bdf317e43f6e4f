"""A fake of Twilio SendGrid's v3 Mail Send API that validates every request with openapi-core against
SendGrid's own OpenAPI document, ``specs/tsg_mail_v3.json`` (from sendgrid-oai, MIT licence beside it):
path, method, bearer security, the ``Content-Encoding`` header and the JSON body.

On top of the schema, the rules SendGrid documents for Mail Send and answers 400 to: a subject (top level,
or in every personalization) and at least one content block unless a ``template_id`` is given,
``text/plain`` first, at least one ``to`` in every personalization, string ``custom_args`` values.
Errors have SendGrid's shape, ``{"errors": [{"message", "field", "help"}]}``; success is 202 with an
empty body and an ``X-Message-Id`` header.

Note: the document types the top-level ``custom_args`` as a string, so an object there is refused;
personalization-level ``custom_args`` are objects.

Failure kinds for ``fail_next``: "400", "401", "403", "413", "429" (with ``Retry-After`` and SendGrid's
``X-RateLimit-*`` headers), "500", "503", "timeout", "lost_response", "disconnect".
"""

from __future__ import annotations

import gzip
import json
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_core.validation.request.exceptions import (
    MissingRequestBodyError,
    RequestBodyValidationError,
    SecurityValidationError,
)
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from werkzeug.datastructures import Headers, ImmutableMultiDict

from . import HANG, LOST_RESPONSE, FakeRequest, FakeResponse, FakeServer

SPEC_FILE = Path(__file__).parent / "specs" / "tsg_mail_v3.json"
SEND_PATH = "/v3/mail/send"
MAX_REQUEST_BYTES = 30 * 1024 * 1024
HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."


@dataclass(frozen=True)
class SendGridMessage:
    """One accepted Mail Send request; ``mail`` is the whole JSON body."""

    message_id: str
    from_email: str
    from_name: str | None
    to: list[str]
    subject: str | None
    text: str | None
    html: str | None
    custom_args: dict[str, Any]
    mail: dict[str, Any]
    received_at: float


@lru_cache(maxsize=1)
def openapi() -> tuple[OpenAPI, str]:
    """The validator for SendGrid's document, and the server URL it names (requests are checked as if sent
    there)."""
    spec = json.loads(SPEC_FILE.read_text())
    return OpenAPI.from_dict(spec), spec["servers"][0]["url"]


class _OpenAPIRequest:
    """A fake's request as openapi-core reads one."""

    def __init__(self, host_url: str, request: FakeRequest, body: bytes) -> None:
        self.host_url = host_url
        self.path = request.path
        self.method = request.method.lower()
        self.body = body or None
        self.content_type = (request.header("Content-Type") or "application/octet-stream").lower()
        self.parameters = RequestParameters(query=ImmutableMultiDict(parse_qsl(request.query)),
                                            header=Headers(list(request.headers.items())),
                                            cookie=ImmutableMultiDict())


def sendgrid_error(status: int, *errors: tuple[str, str | None], headers: dict[str, str] | None = None) -> FakeResponse:
    """SendGrid's error body; each error is (message, field)."""
    body = {"errors": [{"message": message, "field": field,
                        "help": HELP + field.split(".")[0] if field else None} for message, field in errors]}
    return FakeResponse.json(status, body, headers)


def _field(path: Any) -> str:
    return ".".join(str(part) for part in path)


def _schema_errors(exc: Exception) -> list[tuple[str, str | None]]:
    cause = exc.__cause__
    if isinstance(cause, InvalidSchemaValue):
        found = []
        for error in cause.schema_errors:
            field = _field(error.absolute_path)
            if error.validator == "required":
                missing = [name for name in error.validator_value if name not in (error.instance or {})]
                field = ".".join(p for p in (field, missing[0] if missing else "") if p)
            found.append((error.message, field or None))
        return found or [("Bad Request", None)]
    if isinstance(cause, MediaTypeNotFound):
        return [("Content-Type should be application/json.", None)]
    return [("Bad Request", None)]


def _documented_rules(mail: dict[str, Any]) -> list[tuple[str, str | None]]:
    """What Mail Send refuses beyond the schema (SendGrid's Mail Send errors page)."""
    problems: list[tuple[str, str | None]] = []
    personalizations = mail.get("personalizations") or []
    if not personalizations:
        problems.append(("The personalizations field is required and must have at least one personalization.",
                         "personalizations"))
    if not mail.get("template_id"):
        if not mail.get("subject") and not (personalizations and all(p.get("subject") for p in personalizations)):
            problems.append(("The subject is required. You can get around this requirement if you use a template "
                             "with a subject defined or if every personalization has a subject defined.", "subject"))
        if not mail.get("content"):
            problems.append(("Unless a valid template_id is provided, the content parameter is required. There must "
                             "be at least one defined content block.", "content"))
    types = [block.get("type") for block in mail.get("content") or []]
    if "text/plain" in types and types[0] != "text/plain":
        problems.append(("If present, text/plain must be first, followed by text/html, followed by any other "
                         "content.", "content"))
    for i, p in enumerate(personalizations):
        if not p.get("to"):
            problems.append(("The to array is required for all personalization objects, and must have at least "
                             "one email object with a valid email address.", f"personalizations.{i}.to"))
        for key, value in (p.get("custom_args") or {}).items():
            if not isinstance(value, str):
                problems.append((f"Invalid type. Expected: string, given: {type(value).__name__}.",
                                 f"personalizations.{i}.custom_args.{key}"))
    return problems


class SendGridFake(FakeServer):
    """SendGrid's Mail Send for one API key (``api_key``, random unless given)."""

    KINDS: ClassVar[frozenset[str]] = FakeServer.KINDS | {"400", "401", "403", "413", "429", "500", "503"}
    SERVER_ERROR_KIND: ClassVar[str] = "500"

    def __init__(self, api_key: str | None = None, *, hang_seconds: float = 5.0,
                 rate_limit_retry_after: float = 2.0) -> None:
        super().__init__(hang_seconds=hang_seconds)
        self.api_key = api_key or "SG." + secrets.token_urlsafe(16) + "." + secrets.token_urlsafe(32)
        self.rate_limit_retry_after = rate_limit_retry_after
        self.openapi, self.host_url = openapi()

    def _handle(self, request: FakeRequest) -> FakeResponse | object:
        if request.path == SEND_PATH:
            self._count_request()
        if len(request.body) > MAX_REQUEST_BYTES:
            return self._reject(sendgrid_error(413, ("content too large", None)), "too large")
        body = request.body
        if request.header("Content-Encoding").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                return self._reject(sendgrid_error(400, ("Bad Request", None)), "gzip")
        try:
            errors = list(self.openapi.iter_request_errors(_OpenAPIRequest(self.host_url, request, body)))
        except (PathNotFound, OperationNotFound) as exc:  # openapi-core yields these; raising is handled too
            errors = [exc]
        if any(isinstance(e, PathNotFound) for e in errors):
            return self._reject(sendgrid_error(404, ("resource not found", None)), "unknown path")
        if any(isinstance(e, OperationNotFound) for e in errors):
            return self._reject(sendgrid_error(405, ("method not allowed", None)), "method")
        if any(isinstance(e, SecurityValidationError) for e in errors):
            return self._reject(sendgrid_error(401, ("authorization required", None)), "no bearer token")
        kind, _, key = request.header("Authorization").partition(" ")
        if kind.lower() != "bearer" or not secrets.compare_digest(key.strip(), self.api_key):
            return self._reject(sendgrid_error(
                401, ("The provided authorization grant is invalid, expired, or revoked", None)), "api key")
        problems: list[tuple[str, str | None]] = []
        for error in errors:
            if isinstance(error, MissingRequestBodyError):
                problems.append(("Bad Request", None))
            elif isinstance(error, RequestBodyValidationError):
                problems.extend(_schema_errors(error))
            else:
                problems.append((str(error), None))
        if not problems and not body:
            problems.append(("Bad Request", None))
        if not problems:
            mail = json.loads(body)
            problems = _documented_rules(mail)
        if problems:
            return self._reject(sendgrid_error(400, *problems), "; ".join(f"{f}: {m}" for m, f in problems))
        injected = self._injected({})
        if injected is LOST_RESPONSE:
            self._accept(mail)
            return HANG
        if injected is not None:
            return injected
        return self._accept(mail)

    def _accept(self, mail: dict[str, Any]) -> FakeResponse:
        message_id = secrets.token_urlsafe(16)
        contents = {block["type"]: block["value"] for block in mail.get("content") or []}
        personalizations = mail["personalizations"]
        custom_args = dict(mail["custom_args"]) if isinstance(mail.get("custom_args"), dict) else {}
        custom_args.update(personalizations[0].get("custom_args") or {})
        self._record(SendGridMessage(
            message_id=message_id, from_email=mail["from"]["email"], from_name=mail["from"].get("name"),
            to=[to["email"] for p in personalizations for to in p.get("to", [])],
            subject=personalizations[0].get("subject") or mail.get("subject"),
            text=contents.get("text/plain"), html=contents.get("text/html"), custom_args=custom_args,
            mail=mail, received_at=time.time()))
        return FakeResponse(202, b"", {"X-Message-Id": message_id})

    def _failure(self, kind: str, retry_after: float | None, context: dict[str, Any]) -> FakeResponse:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        if kind == "400":
            return sendgrid_error(400, ("Does not contain a valid address.", "personalizations.0.to.0.email"),
                                  headers=headers)
        if kind == "401":
            return sendgrid_error(401, ("The provided authorization grant is invalid, expired, or revoked", None))
        if kind == "403":
            return sendgrid_error(403, ("The from address does not match a verified Sender Identity. Mail cannot "
                                        "be sent until this error is resolved.", "from"))
        if kind == "413":
            return sendgrid_error(413, ("content too large", None))
        if kind == "429":
            wait = self.rate_limit_retry_after if retry_after is None else retry_after
            return sendgrid_error(429, ("too many requests", None), headers={
                "Retry-After": f"{wait:g}", "X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(time.time() + wait))})
        if kind == "503":
            return sendgrid_error(503, ("service unavailable", None), headers=headers)
        return sendgrid_error(500, ("internal error", None), headers=headers)
