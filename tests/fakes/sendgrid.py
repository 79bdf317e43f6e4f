"""A fake of Twilio SendGrid's v3 Mail Send API that checks every request against SendGrid's own OpenAPI
document, ``specs/tsg_mail_v3.json`` (from sendgrid-oai, MIT licence beside it): path, method, bearer security,
the ``Content-Encoding`` header and the JSON body.

openapi-core took 4-5 ms of CPU per request here (it builds its validators from the document again for
every request), as much as the worker it answers in the benchmarks, so the one operation the senders use,
``SendMail``, is taken out of the document once per process: its JSON body schema (``$ref``s resolved), its
header parameters and its security scheme. Each body is then validated with
``openapi_schema_validator.OAS31Validator`` and ``oas30_format_checker``, the validator and format checker
openapi-core uses for an OpenAPI 3.1 document, so the same bodies are refused with the same fields; path,
method, bearer token and media type are checked by hand, and answered as openapi-core's errors were. Only
``POST /v3/mail/send`` is served: any other path is 404 (the document's batch endpoints too), another method 405.

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

from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS31Validator, oas30_format_checker

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


def _lookup(ref: str, spec: dict) -> Any:
    target: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return target


def _object(node: dict, spec: dict) -> dict:
    """An OpenAPI object that may be a Reference Object (``requestBody``, a parameter)."""
    while "$ref" in node:
        node = _lookup(node["$ref"], spec)
    return node


def _resolve(node: Any, spec: dict, depth: int = 0) -> Any:
    """A schema with every local ``$ref`` replaced by what it points to. OpenAPI 3.1 (JSON Schema 2020-12)
    applies the keywords beside a ``$ref`` too, so such a ``$ref`` becomes an ``allOf`` in its place."""
    if depth > 32:
        raise ValueError("$ref chain too deep")
    if isinstance(node, dict):
        if "$ref" not in node:
            return {key: _resolve(value, spec, depth) for key, value in node.items()}
        target = _resolve(_lookup(node["$ref"], spec), spec, depth + 1)
        if len(node) == 1:
            return target
        if "allOf" in node:
            raise NotImplementedError("a $ref beside an allOf is not implemented by the fake")
        return {("allOf" if key == "$ref" else key): [target] if key == "$ref" else _resolve(value, spec, depth)
                for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, spec, depth) for item in node]
    return node


@dataclass(frozen=True)
class _Operation:
    """``SendMail`` (``POST /v3/mail/send``), as SendGrid's OpenAPI document describes it."""

    path: str
    method: str
    media_types: frozenset[str]
    body: OAS31Validator
    headers: tuple[tuple[str, bool, OAS31Validator], ...]  # (name, required, schema) of each header parameter
    bearer: bool  # the operation wants an HTTP bearer token


@lru_cache(maxsize=1)
def operation() -> _Operation:
    spec = json.loads(SPEC_FILE.read_text())
    if not spec["openapi"].startswith("3.1.") or "jsonSchemaDialect" in spec:
        raise NotImplementedError("the fake validates OpenAPI 3.1 documents in the default dialect")
    item = spec["paths"][SEND_PATH]
    post = item["post"]
    content = _object(post["requestBody"], spec)["content"]
    if set(content) != {"application/json"}:
        raise NotImplementedError(f"media types {sorted(content)} are not implemented by the fake")
    schema = _resolve(content["application/json"]["schema"], spec)
    parameters: dict[tuple[str, str], dict] = {}
    for parameter in [*item.get("parameters", []), *post.get("parameters", [])]:  # the operation's win
        parameter = _object(parameter, spec)
        parameters[parameter["name"].lower(), parameter["in"]] = parameter
    headers = []
    for (_, where), parameter in parameters.items():
        param_schema = _resolve(parameter["schema"], spec)
        if where != "header" or "content" in parameter or param_schema.get("type") != "string":
            raise NotImplementedError(f"parameter {parameter['name']} is not implemented by the fake")
        headers.append((parameter["name"], parameter.get("required", False),
                        OAS31Validator(param_schema, format_checker=oas30_format_checker)))
    schemes = [spec["components"]["securitySchemes"][name]
               for requirement in post.get("security", spec.get("security", [])) for name in requirement]
    for scheme in schemes:
        if (scheme["type"], scheme.get("scheme", "").lower()) != ("http", "bearer"):
            raise NotImplementedError(f"security scheme {scheme} is not implemented by the fake")
    return _Operation(
        path=SEND_PATH, method="POST", media_types=frozenset(content),
        body=OAS31Validator(schema, format_checker=oas30_format_checker),
        headers=tuple(headers), bearer=bool(schemes))


def sendgrid_error(status: int, *errors: tuple[str, str | None], headers: dict[str, str] | None = None) -> FakeResponse:
    """SendGrid's error body; each error is (message, field)."""
    body = {"errors": [{"message": message, "field": field,
                        "help": HELP + field.split(".")[0] if field else None} for message, field in errors]}
    return FakeResponse.json(status, body, headers)


def _field(path: Any) -> str:
    return ".".join(str(part) for part in path)


def _schema_problem(error: ValidationError) -> tuple[str, str | None]:
    """A schema violation as SendGrid names it: the path to the field, and for a missing one, its name."""
    field = _field(error.absolute_path)
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in (error.instance or {})]
        field = ".".join(p for p in (field, missing[0] if missing else "") if p)
    return error.message, field or None


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
        self.operation = operation()

    # the request

    def _bearer(self, request: FakeRequest) -> bool:
        """The spec's security, as openapi-core checks it: an ``Authorization: Bearer <credentials>`` header."""
        scheme, space, _ = request.header("Authorization").partition(" ")
        return not self.operation.bearer or bool(space) and scheme.lower() == "bearer"

    def _header_problems(self, request: FakeRequest) -> list[tuple[str, str | None]]:
        problems: list[tuple[str, str | None]] = []
        for name, required, schema in self.operation.headers:
            if name not in request.headers:
                if required:
                    problems.append((f"Missing required header parameter: {name}", None))
            elif not schema.is_valid(request.header(name)):
                problems.append((f"Invalid header parameter: {name}", None))
        return problems

    def _body(self, request: FakeRequest, body: bytes) -> tuple[Any, list[tuple[str, str | None]]]:
        """The JSON body (None when there is none to read) and what the schema finds wrong with it."""
        if not body:
            return None, []
        media_type = (request.header("Content-Type") or "application/octet-stream").split(";")[0].strip().lower()
        if media_type not in self.operation.media_types:
            return None, [("Content-Type should be application/json.", None)]
        try:
            mail = json.loads(body)
        except (ValueError, RecursionError):
            return None, [("Bad Request", None)]
        return mail, [_schema_problem(error) for error in self.operation.body.iter_errors(mail)]

    def _handle(self, request: FakeRequest) -> FakeResponse | object:
        if request.path == self.operation.path:
            self._count_request()
        if len(request.body) > MAX_REQUEST_BYTES:
            return self._reject(sendgrid_error(413, ("content too large", None)), "too large")
        body = request.body
        if request.header("Content-Encoding").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                return self._reject(sendgrid_error(400, ("Bad Request", None)), "gzip")
        if request.path != self.operation.path:
            return self._reject(sendgrid_error(404, ("resource not found", None)), "unknown path")
        if request.method != self.operation.method:
            return self._reject(sendgrid_error(405, ("method not allowed", None)), "method")
        if not self._bearer(request):
            return self._reject(sendgrid_error(401, ("authorization required", None)), "no bearer token")
        kind, _, key = request.header("Authorization").partition(" ")
        if kind.lower() != "bearer" or not secrets.compare_digest(key.strip(), self.api_key):
            return self._reject(sendgrid_error(
                401, ("The provided authorization grant is invalid, expired, or revoked", None)), "api key")
        problems = self._header_problems(request)
        mail, body_problems = self._body(request, body)
        problems += body_problems
        if not problems and not body:
            problems.append(("Bad Request", None))
        if not problems:
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
