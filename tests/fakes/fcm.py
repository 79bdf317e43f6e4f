"""A fake of Firebase Cloud Messaging's HTTP v1 API and of Google's OAuth 2.0 token endpoint.

``write_credentials(path)`` writes a service-account file with a freshly generated RSA key whose
``token_uri`` is this fake's ``/token``. The token endpoint takes only the JWT-bearer grant
(``urn:ietf:params:oauth:grant-type:jwt-bearer``) with an RS256 assertion signed by that key (issuer =
the account's email, a Google token audience, an FCM scope, at most an hour long) and mints a Bearer
token; ``POST /v1/projects/{project_id}/messages:send`` accepts only tokens it minted.

The send body is checked by hand against FCM's v1 reference: ``message`` (and ``validate_only``) at the
top; known message fields only; exactly one of ``token`` / ``topic`` / ``condition``; ``notification``
with string ``title`` / ``body`` / ``image``; ``data`` with string values and no reserved keys ("from",
"message_type", "google...", "gcm..."). Anything else is 400 INVALID_ARGUMENT in Google's error shape,
``{"error": {"code", "message", "status", "details": [FcmError {errorCode}, BadRequest {fieldViolations}]}}``.
Tokens passed to ``unregister`` get 404 UNREGISTERED. Success is 200 ``{"name": "projects/.../messages/..."}``.

Failure kinds for ``fail_next``: "UNREGISTERED" (404), "INVALID_ARGUMENT" (400), "SENDER_ID_MISMATCH"
(403), "429" (RESOURCE_EXHAUSTED / QUOTA_EXCEEDED, with ``Retry-After``), "500", "503", "timeout",
"lost_response", "disconnect".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from . import HANG, LOST_RESPONSE, FakeRequest, FakeResponse, FakeServer

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # what google-auth puts in "aud"
FCM_SCOPES = {"https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform"}
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"

SEND_PATH = re.compile(r"/v1/projects/(?P<project>[^/]+)/messages:send")
MESSAGE_FIELDS = {"name", "data", "notification", "android", "webpush", "apns", "fcm_options",
                  "token", "topic", "condition"}
NOTIFICATION_FIELDS = {"title", "body", "image"}
TARGETS = ("token", "topic", "condition")
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_:\-.]{1,4096}")
TOPIC_SHAPE = re.compile(r"[a-zA-Z0-9\-_.~%]{1,900}")


@dataclass(frozen=True)
class FcmMessage:
    """One accepted message; ``message`` is the request's whole ``message`` object."""

    name: str
    token: str | None
    topic: str | None
    condition: str | None
    title: str | None
    body: str | None
    data: dict[str, str]
    message: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class _Account:
    key_id: str
    public_key: rsa.RSAPublicKey


def google_error(status: int, status_name: str, message: str, *, error_code: str | None = None,
                 field: str | None = None, headers: dict[str, str] | None = None) -> FakeResponse:
    """Google's API error body, with FCM's FcmError detail and a BadRequest detail when a field is named."""
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": FCM_ERROR, "errorCode": error_code})
    if field is not None:
        details.append({"@type": BAD_REQUEST, "fieldViolations": [{"field": field, "description": message}]})
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = details
    return FakeResponse.json(status, {"error": error}, headers)


def invalid(message: str, field: str) -> FakeResponse:
    return google_error(400, "INVALID_ARGUMENT", message, error_code="INVALID_ARGUMENT", field=field)


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _unknown(name: str, where: str) -> FakeResponse:
    return invalid(f'Invalid JSON payload received. Unknown name "{name}" at \'{where}\': Cannot find field.', where)


def check_send_request(payload: Any) -> FakeResponse | None:
    """FCM's 400 for the first thing wrong with a v1 send request body, or None."""
    if not isinstance(payload, dict):
        return invalid("Invalid JSON payload received. Expected an object.", "")
    for key in payload:
        if key not in ("message", "validate_only"):
            return _unknown(key, "")
    if not isinstance(payload.get("validate_only", False), bool):
        return invalid("Invalid value at 'validate_only' (TYPE_BOOL)", "validate_only")
    message = payload.get("message")
    if not isinstance(message, dict):
        return invalid("Request contains an invalid argument.", "message")
    for key in message:
        if key not in MESSAGE_FIELDS:
            return _unknown(key, "message")
    targets = [t for t in TARGETS if t in message]
    if not targets:
        return invalid("Recipient of the message is not set.", "message")
    if len(targets) > 1:
        return invalid(f"Invalid JSON payload received. Oneof field 'target' is already set. "
                       f"Cannot set '{targets[1]}'", f"message.{targets[1]}")
    target = message[targets[0]]
    if not isinstance(target, str) or not target:
        return invalid(f"Invalid value at 'message.{targets[0]}' (TYPE_STRING)", f"message.{targets[0]}")
    if targets[0] == "token" and not TOKEN_SHAPE.fullmatch(target):
        return invalid("The registration token is not a valid FCM registration token", "message.token")
    if targets[0] == "topic" and not TOPIC_SHAPE.fullmatch(target.removeprefix("/topics/")):
        return invalid("Invalid topic name", "message.topic")
    notification = message.get("notification", {})
    if not isinstance(notification, dict):
        return invalid("Invalid value at 'message.notification' (type.googleapis.com/"
                       "google.firebase.fcm.v1.Notification)", "message.notification")
    for key, value in notification.items():
        if key not in NOTIFICATION_FIELDS:
            return _unknown(key, "message.notification")
        if not isinstance(value, str):
            return invalid(f"Invalid value at 'message.notification.{key}' (TYPE_STRING), {json.dumps(value)}",
                           f"message.notification.{key}")
    data = message.get("data", {})
    if not isinstance(data, dict):
        return invalid("Invalid value at 'message.data' (map)", "message.data")
    for i, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return invalid(f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {json.dumps(value)}",
                           f"message.data[{i}].value")
        if key in ("from", "message_type") or key.startswith(("google", "gcm")):
            return invalid(f"Invalid data payload key: {key}", f"message.data[{i}].key")
    for key in ("android", "webpush", "apns", "fcm_options"):
        if key in message and not isinstance(message[key], dict):
            return invalid(f"Invalid value at 'message.{key}'", f"message.{key}")
    return None


class FcmFake(FakeServer):
    """FCM HTTP v1 for one project (``project_id``), with its own OAuth token endpoint (``token_uri``)."""

    KINDS: ClassVar[frozenset[str]] = FakeServer.KINDS | {"UNREGISTERED", "INVALID_ARGUMENT", "SENDER_ID_MISMATCH",
                                                          "429", "500", "503"}
    SERVER_ERROR_KIND: ClassVar[str] = "503"

    def __init__(self, project_id: str = "remind-test", *, hang_seconds: float = 5.0,
                 token_lifetime: int = 3600, rate_limit_retry_after: float = 2.0) -> None:
        super().__init__(hang_seconds=hang_seconds)
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        self.rate_limit_retry_after = rate_limit_retry_after
        self.credentials_file: Path | None = None
        self.token_requests = 0
        self.unregistered: set[str] = set()
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, float] = {}

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.token_requests = 0

    # credentials and tokens

    def write_credentials(self, path: Path, *, client_email: str | None = None) -> Path:
        """Write a service-account JSON file with a new RSA key; its token_uri is this fake's."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        email = client_email or f"remind-push@{self.project_id}.iam.gserviceaccount.com"
        key_id = secrets.token_hex(20)
        self._accounts[email] = _Account(key_id, key.public_key())
        info = {
            "type": "service_account", "project_id": self.project_id, "private_key_id": key_id,
            "private_key": pem, "client_email": email, "client_id": str(secrets.randbelow(10**21)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{quote(email)}",
            "universe_domain": "googleapis.com",
        }
        path = Path(path)
        path.write_text(json.dumps(info, indent=2))
        os.chmod(path, 0o600)
        self.credentials_file = path
        return path

    def mint_token(self, lifetime: float | None = None) -> str:
        """An access token the send endpoint accepts (for tests that post by hand)."""
        token = "ya29.c." + secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[token] = time.time() + (self.token_lifetime if lifetime is None else lifetime)
        return token

    def revoke_tokens(self) -> None:
        """Forget every minted token: the next send with one is answered 401 UNAUTHENTICATED."""
        with self._lock:
            self._tokens.clear()

    def unregister(self, token: str) -> None:
        """Every later message to ``token`` is answered 404 UNREGISTERED (the app was uninstalled)."""
        self.unregistered.add(token)

    def _grant_error(self, error: str, description: str) -> FakeResponse:
        return self._reject(FakeResponse.json(400, {"error": error, "error_description": description}), description)

    def _token(self, request: FakeRequest) -> FakeResponse:
        with self._lock:
            self.token_requests += 1
        if request.method != "POST":
            return FakeResponse.json(405, {"error": "invalid_request", "error_description": "Method not allowed"})
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        if form.get("grant_type") != JWT_BEARER:
            return self._grant_error("unsupported_grant_type", "Invalid grant_type: " + form.get("grant_type", ""))
        try:
            head, claims_part, signature = form.get("assertion", "").split(".")
            header, claims = json.loads(_b64url(head)), json.loads(_b64url(claims_part))
            signature_bytes = _b64url(signature)
        except (ValueError, binascii.Error):
            return self._grant_error("invalid_grant", "Invalid JWT: malformed assertion.")
        account = self._accounts.get(claims.get("iss", ""))
        if account is None:
            return self._grant_error("invalid_grant", "Invalid grant: account not found")
        if header.get("alg") != "RS256" or header.get("kid", account.key_id) != account.key_id:
            return self._grant_error("invalid_grant", "Invalid JWT Signature.")
        try:
            account.public_key.verify(signature_bytes, f"{head}.{claims_part}".encode(), padding.PKCS1v15(),
                                      hashes.SHA256())
        except InvalidSignature:
            return self._grant_error("invalid_grant", "Invalid JWT Signature.")
        now = time.time()
        iat, exp = claims.get("iat", 0), claims.get("exp", 0)
        if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, self.token_uri) or not (
                iat - 300 <= now < exp and exp - iat <= 3600):
            return self._grant_error("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) "
                                                      "and in a reasonable timeframe. Check your iat and exp values "
                                                      "in the JWT claim.")
        if not FCM_SCOPES & set(str(claims.get("scope", "")).split()):
            return self._grant_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = self.mint_token()
        return FakeResponse.json(200, {"access_token": token, "expires_in": self.token_lifetime - 1,
                                       "token_type": "Bearer"})

    def _authorized(self, request: FakeRequest) -> bool:
        kind, _, token = request.header("Authorization").partition(" ")
        with self._lock:
            expiry = self._tokens.get(token.strip())
        return kind.lower() == "bearer" and expiry is not None and expiry > time.time()

    # the send endpoint

    def _handle(self, request: FakeRequest) -> FakeResponse | object:
        if request.path == "/token":
            return self._token(request)
        match = SEND_PATH.fullmatch(request.path)
        if match is None:
            return self._reject(google_error(404, "NOT_FOUND", f"The requested URL {request.path} was not found."),
                                "unknown path")
        if request.method != "POST":
            return self._reject(google_error(405, "METHOD_NOT_ALLOWED", "Method not allowed."), "method")
        self._count_request()
        if not self._authorized(request):
            return self._reject(google_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'}), "bearer token")
        if match.group("project") != self.project_id:
            return self._reject(google_error(
                403, "PERMISSION_DENIED", f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{match.group('project')}' (or it may not exist)."),
                "project")
        if request.header("Content-Type").split(";")[0].strip().lower() != "application/json":
            return self._reject(invalid("Invalid JSON payload received. Unexpected token.", ""), "content type")
        try:
            payload = json.loads(request.body)
        except ValueError:
            return self._reject(invalid("Invalid JSON payload received. Unexpected token.", ""), "json")
        problem = check_send_request(payload)
        if problem is not None:
            return self._reject(problem, json.loads(problem.body)["error"]["message"])
        message = payload["message"]
        if payload.get("validate_only"):
            return FakeResponse.json(200, {"name": f"projects/{self.project_id}/messages/fake_message_id"})
        if message.get("token") in self.unregistered:
            return self._reject(self._failure("UNREGISTERED", None, {}), "unregistered token")
        injected = self._injected({})
        if injected is LOST_RESPONSE:
            self._accept(message)
            return HANG
        if injected is not None:
            return injected
        return self._accept(message)

    def _accept(self, message: dict[str, Any]) -> FakeResponse:
        name = f"projects/{self.project_id}/messages/0:{time.time_ns() // 1000}%{secrets.token_hex(8)}"
        notification = message.get("notification", {})
        self._record(FcmMessage(
            name=name, token=message.get("token"), topic=message.get("topic"), condition=message.get("condition"),
            title=notification.get("title"), body=notification.get("body"), data=dict(message.get("data", {})),
            message=message, received_at=time.time()))
        return FakeResponse.json(200, {"name": name})

    def _failure(self, kind: str, retry_after: float | None, context: dict[str, Any]) -> FakeResponse:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        if kind == "UNREGISTERED":
            return google_error(404, "NOT_FOUND", "Requested entity was not found.", error_code="UNREGISTERED")
        if kind == "INVALID_ARGUMENT":
            return invalid("The registration token is not a valid FCM registration token", "message.token")
        if kind == "SENDER_ID_MISMATCH":
            return google_error(403, "PERMISSION_DENIED", "SenderId mismatch", error_code="SENDER_ID_MISMATCH")
        if kind == "429":
            wait = self.rate_limit_retry_after if retry_after is None else retry_after
            return google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests' and "
                                "limit 'Send requests per minute' of service 'fcm.googleapis.com'.",
                                error_code="QUOTA_EXCEEDED", headers={"Retry-After": f"{wait:g}"})
        if kind == "500":
            return google_error(500, "INTERNAL", "Internal error encountered.", error_code="INTERNAL",
                                headers=headers)
        return google_error(503, "UNAVAILABLE", "The service is currently unavailable.", error_code="UNAVAILABLE",
                            headers=headers)
