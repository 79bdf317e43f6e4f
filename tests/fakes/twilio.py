"""A fake of Twilio's Messages API (REST API 2010-04-01) that checks every request against Twilio's own
OpenAPI document, ``specs/twilio_api_v2010.json`` (from twilio-oai, MIT licence beside it).

openapi-core needs about 9 ms per request on this 1.8 MB document, too slow for the benchmarks, so the
one operation the senders use, ``CreateMessage``, is taken out of the document once: its form schema
(``$ref``s resolved), path parameter schema, security scheme and ``x-twilio.conditional`` groups. Each
request is then decoded as the spec's form encoding says (types from the schema, arrays as repeated
keys) and validated with ``openapi_schema_validator.OAS30Validator`` (jsonschema with OpenAPI 3.0 rules).

What Twilio answers, and the fake too: 401 / 20003 for bad credentials, 21604 without ``To``, 21211 for
a ``To`` that is no phone number, 21603 without ``From`` or ``MessagingServiceSid`` and 21602 without
``Body``, ``MediaUrl`` or ``ContentSid`` (the spec's conditional groups), 21624 for a ``ValidityPeriod``
outside 1..36000, 21617 for a body over 1600 characters, 21610 for a number in ``opted_out``; any other
schema violation is 400 with code 70002. Success is 201 with a Message resource as the spec describes it.

Failure kinds for ``fail_next``: "21211", "21610", "21614" (400), "20429" (429), "500", "503", "timeout",
"lost_response", "disconnect".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from jsonschema import FormatChecker
from openapi_schema_validator import OAS30Validator, oas30_format_checker

from . import HANG, LOST_RESPONSE, FakeRequest, FakeResponse, FakeServer

SPEC_FILE = Path(__file__).parent / "specs" / "twilio_api_v2010.json"
MESSAGES_PATH = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
MAX_BODY = 1600
VALIDITY_RANGE = range(1, 36_001)

_E164 = re.compile(r"\+[1-9]\d{1,14}")
_CHANNEL_ADDRESS = re.compile(r"[a-z][a-z0-9-]*:\S+")  # whatsapp:+1555..., messenger:123...
_SHORT_CODE = re.compile(r"\d{3,8}")
_ALPHANUMERIC_ID = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")


@dataclass(frozen=True)
class TwilioMessage:
    """One accepted Message; ``params`` holds every form field, typed as the spec says."""

    sid: str
    account_sid: str
    to: str
    body: str | None
    from_: str | None
    messaging_service_sid: str | None
    status_callback: str | None
    validity_period: int | None
    params: dict[str, Any]
    received_at: float


def _resolve(node: Any, spec: dict, depth: int = 0) -> Any:
    """``node`` with every local ``$ref`` replaced by what it points to."""
    if depth > 32:
        raise ValueError("$ref chain too deep")
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            return _resolve(target, spec, depth + 1)
        return {key: _resolve(value, spec, depth) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, spec, depth) for item in node]
    return node


def _format_checker() -> FormatChecker:
    checker = FormatChecker(formats=())
    checker.checkers = dict(oas30_format_checker.checkers)

    @checker.checks("phone-number")
    def phone_number(value: object) -> bool:  # Twilio's own format: a number, short code, sender id or channel
        if not isinstance(value, str):
            return True
        return any(p.fullmatch(value) for p in (_E164, _CHANNEL_ADDRESS, _SHORT_CODE, _ALPHANUMERIC_ID))

    @checker.checks("uri")
    def uri(value: object) -> bool:
        if not isinstance(value, str):
            return True
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and "_" not in parts.hostname

    return checker


@dataclass(frozen=True)
class _Operation:
    """``CreateMessage``, as Twilio's OpenAPI document describes it."""

    path: re.Pattern[str]
    media_types: frozenset[str]
    properties: dict[str, Any]
    body: OAS30Validator
    path_params: dict[str, OAS30Validator]
    security: list[dict[str, Any]]
    conditional: list[list[str]]  # the x-twilio.conditional groups, as parameter names
    response_schema: dict[str, Any]


@lru_cache(maxsize=1)
def operation() -> _Operation:
    spec = json.loads(SPEC_FILE.read_text())
    item = spec["paths"][MESSAGES_PATH]
    post = item["post"]
    content = post["requestBody"]["content"]
    (media_type,) = content
    schema = _resolve(content[media_type]["schema"], spec)
    checker = _format_checker()
    params = [p for p in [*item.get("parameters", []), *post.get("parameters", [])] if p["in"] == "path"]
    security = [spec["components"]["securitySchemes"][name]
                for requirement in post.get("security", spec.get("security", [])) for name in requirement]
    for scheme in security:
        if (scheme["type"], scheme.get("scheme")) != ("http", "basic"):
            raise NotImplementedError(f"security scheme {scheme} is not implemented by the fake")
    pattern = re.escape(MESSAGES_PATH).replace(r"\{AccountSid\}", r"(?P<AccountSid>[^/]+)")
    return _Operation(
        path=re.compile(pattern),
        media_types=frozenset(content),
        properties=schema.get("properties", {}),
        body=OAS30Validator(schema, format_checker=checker),
        path_params={p["name"]: OAS30Validator(_resolve(p["schema"], spec), format_checker=checker) for p in params},
        security=security,
        conditional=[[_snake_to_param(name) for name in group]
                     for group in post.get("x-twilio", {}).get("conditional", [])],
        response_schema=_resolve(post["responses"]["201"]["content"]["application/json"]["schema"], spec),
    )


def _cast(raw: list[str], schema: dict[str, Any]) -> Any:
    """A form value as the type its schema names (left a string when it is not one, so validation says so)."""
    kind = schema.get("type")
    if kind == "array":
        return [_cast([value], schema.get("items", {})) for value in raw]
    value = raw[0]
    if kind == "integer" and re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    if kind == "number":
        try:
            return float(value)
        except ValueError:
            return value
    if kind == "boolean" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def decode_form(body: bytes, properties: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, list[str]] = {}
    for key, value in parse_qsl(body.decode("utf-8"), keep_blank_values=True):
        values.setdefault(key, []).append(value)
    return {key: _cast(raw, properties.get(key, {})) for key, raw in values.items()}


def _snake_to_param(name: str) -> str:
    """The spec's ``x-twilio.conditional`` names fields in snake case: ``messaging_service_sid``."""
    return "".join(part.capitalize() for part in name.split("_"))


def twilio_error(status: int, code: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> FakeResponse:
    """Twilio's error body: code, message, more_info, status."""
    payload = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
               "status": status, **extra}
    return FakeResponse.json(status, payload, headers)


def _segments(body: str) -> int:
    gsm = body.isascii()
    single, multi = (160, 153) if gsm else (70, 67)
    return 1 if len(body) <= single else -(-len(body) // multi)


class TwilioFake(FakeServer):
    """Twilio's Messages API for one account (``account_sid`` / ``auth_token``, random unless given)."""

    KINDS: ClassVar[frozenset[str]] = FakeServer.KINDS | {"21211", "21610", "21614", "20429", "500", "503"}
    SERVER_ERROR_KIND: ClassVar[str] = "500"

    def __init__(self, account_sid: str | None = None, auth_token: str | None = None, *,
                 hang_seconds: float = 5.0) -> None:
        super().__init__(hang_seconds=hang_seconds)
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token or secrets.token_hex(16)
        self.messaging_service_sid = "MG" + secrets.token_hex(16)
        self.from_number = "+15005550006"
        self.opted_out: set[str] = set()
        self.operation = operation()

    def opt_out(self, number: str) -> None:
        """Every later message to ``number`` is refused with 21610, as after the customer replied STOP."""
        self.opted_out.add(number)

    # the request

    def _authenticated(self, request: FakeRequest) -> bool:
        """The spec's security: HTTP basic (``operation()`` refuses any other), the account SID and its token."""
        if not self.operation.security:
            return True
        kind, _, credentials = request.header("Authorization").partition(" ")
        if kind.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.account_sid) and secrets.compare_digest(password, self.auth_token)

    def _problem(self, params: dict[str, Any]) -> FakeResponse | None:
        """Twilio's answer to the first thing wrong with these parameters, or None."""
        op = self.operation
        for error in sorted(op.body.iter_errors(params), key=lambda e: list(e.path)):
            if error.validator == "required":
                missing = [name for name in error.validator_value if name not in params]
                if "To" in missing:
                    return twilio_error(400, 21604, "A 'To' phone number is required.")
                return twilio_error(400, 70002, f"Parameter '{missing[0]}' is required.")
            name = str(error.path[0]) if error.path else ""
            if name == "To":
                return twilio_error(400, 21211, f"The 'To' number {params['To']} is not a valid phone number.")
            if name == "ValidityPeriod":
                return twilio_error(400, 21624, "Invalid validity period value.")
            return twilio_error(400, 70002, f"Parameter '{name}' is invalid: {error.message}")
        if not (_E164.fullmatch(params["To"]) or _CHANNEL_ADDRESS.fullmatch(params["To"])):
            return twilio_error(400, 21211, f"The 'To' number {params['To']} is not a valid phone number.")
        for names in op.conditional:
            if not any(params.get(n) not in (None, "", []) for n in names):
                if "From" in names:
                    return twilio_error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required "
                                                    "to send a message.")
                if "Body" in names:
                    return twilio_error(400, 21602, "Message body is required.")
                return twilio_error(400, 70002, f"One of {', '.join(names)} is required.")
        if "ValidityPeriod" in params and params["ValidityPeriod"] not in VALIDITY_RANGE:
            return twilio_error(400, 21624, "Invalid validity period value.")
        if len(params.get("Body") or "") > MAX_BODY:
            return twilio_error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
        return None

    def _handle(self, request: FakeRequest) -> FakeResponse | object:
        match = self.operation.path.fullmatch(request.path)
        if match is None:
            return self._reject(twilio_error(404, 20404, f"The requested resource {request.path} was not found"),
                                "unknown path")
        if request.method != "POST":
            return self._reject(twilio_error(405, 20004, "Method not allowed"), "method")
        self._count_request()
        if not self._authenticated(request):
            refused = twilio_error(401, 20003, "Authenticate", {"WWW-Authenticate": 'Basic realm="Twilio API"'},
                                   detail="Your AccountSid or AuthToken was incorrect.")
            return self._reject(refused, "credentials")
        for name, validator in self.operation.path_params.items():
            value = match.group(name)
            if not validator.is_valid(value) or (name == "AccountSid" and value != self.account_sid):
                return self._reject(twilio_error(404, 20404, f"The requested resource {request.path} was not found"),
                                    f"path parameter {name}")
        media_type = request.header("Content-Type").split(";")[0].strip().lower()
        params: dict[str, Any] = {}  # a body in another media type is not read at all: Twilio then misses 'To'
        if media_type in self.operation.media_types:
            try:
                params = decode_form(request.body, self.operation.properties)
            except UnicodeDecodeError:
                params = {}
        problem = self._problem(params)
        if problem is not None:
            return self._reject(problem, json.loads(problem.body)["message"])
        if params["To"] in self.opted_out:
            return self._reject(twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"), "opted out")
        injected = self._injected({"to": params["To"]})
        if injected is LOST_RESPONSE:
            self._accept(params)
            return HANG
        if injected is not None:
            return injected
        return self._accept(params)

    def _accept(self, params: dict[str, Any]) -> FakeResponse:
        sid = "SM" + secrets.token_hex(16)
        now = format_datetime(datetime.now(UTC))
        body = params.get("Body")
        service = params.get("MessagingServiceSid")
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json"
        resource = {
            "account_sid": self.account_sid, "api_version": "2010-04-01", "body": body,
            "date_created": now, "date_sent": None, "date_updated": now, "direction": "outbound-api",
            "error_code": None, "error_message": None, "from": params.get("From"),
            "messaging_service_sid": service, "num_media": str(len(params.get("MediaUrl") or [])),
            "num_segments": str(_segments(body or "")), "price": None, "price_unit": "USD", "sid": sid,
            # with a Messaging Service and no From, Twilio first answers "accepted" (it picks the sender later)
            "status": "accepted" if service and not params.get("From") else "queued",
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")}, "to": params["To"], "uri": uri,
        }
        self._record(TwilioMessage(
            sid=sid, account_sid=self.account_sid, to=params["To"], body=body, from_=params.get("From"),
            messaging_service_sid=service, status_callback=params.get("StatusCallback"),
            validity_period=params.get("ValidityPeriod"), params=params, received_at=time.time()))
        return FakeResponse.json(201, resource, {"Twilio-Request-Id": "RQ" + secrets.token_hex(16)})

    def _failure(self, kind: str, retry_after: float | None, context: dict[str, Any]) -> FakeResponse:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        to = context["to"]
        if kind == "21211":
            return twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.", headers)
        if kind == "21610":
            return twilio_error(400, 21610, "Attempt to send to unsubscribed recipient", headers)
        if kind == "21614":
            return twilio_error(400, 21614, f"'To' number {to} is not a valid mobile number", headers)
        if kind == "20429":
            return twilio_error(429, 20429, "Too Many Requests", headers)
        if kind == "503":
            return twilio_error(503, 20503, "Service Unavailable", headers)
        return twilio_error(500, 20500, "Internal Server Error", headers)
