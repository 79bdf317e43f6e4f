"""Scoped bearer tokens compared in constant time, the /ops session cookie, request bodies capped,
security headers on every answer."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from fastapi import HTTPException, Request
from itsdangerous import BadData, URLSafeSerializer
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import TOKEN_VARIABLES, Settings

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; "
            "base-uri 'none'")


def matches(given: str, tokens: list[str]) -> bool:
    """Whether ``given`` is one of ``tokens``; every candidate is compared, each in constant time."""
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    return ok


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None. Never read from the URL: a query string
    ends up in access logs, proxies and browser history."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def check_scope(request: Request, scope: str, token_lists: dict[str, list[str]]) -> None:
    """401 unless the bearer token belongs to ``scope``; 403 when it is a valid token of another scope
    (the caller is known but not allowed here), so a leaked platform token never opens ops."""
    variable = TOKEN_VARIABLES[scope]
    tokens = token_lists[scope]
    given = bearer(request)
    if not tokens:
        raise HTTPException(401, f"this route is disabled: set {variable}", {"www-authenticate": "Bearer"})
    if given is not None and matches(given, tokens):
        return
    if given is not None and any(matches(given, other) for name, other in token_lists.items() if name != scope):
        raise HTTPException(403, f"this token is not allowed here: it needs a token from {variable}")
    raise HTTPException(401, f"a valid bearer token from {variable} is required", {"www-authenticate": "Bearer"})


# -- the /ops session cookie --------------------------------------------------------------------------

OPS_COOKIE = "remind_ops"
OPS_SESSION = timedelta(hours=12)
_OPS_SALT = "remind.ops-session"


def _token_id(secret: str, token: str) -> str:
    """What the cookie carries instead of the token: removing the token from REMIND_OPS_TOKEN ends its sessions.
    Keyed, so a stolen cookie gives nothing to guess the token against offline."""
    return hmac.new(secret.encode(), b"remind.ops-token:" + token.encode(), hashlib.sha256).hexdigest()[:32]


def issue_session(secret: str, token: str, now: datetime) -> str:
    """A cookie value signed with REMIND_SECRET_KEY (its own salt): the token's id and when it expires."""
    if not secret:  # an empty key is one everyone knows
        raise ValueError("no signing key (REMIND_SECRET_KEY)")
    return URLSafeSerializer(secret, salt=_OPS_SALT).dumps(
        {"t": _token_id(secret, token), "exp": int((now + OPS_SESSION).timestamp())})


def session_valid(secret: str, cookie: str | None, tokens: list[str], now: datetime) -> bool:
    """The cookie is ours, unaltered, unexpired on the service's clock, and its token still valid."""
    if not cookie or not tokens or not secret:
        return False
    try:
        data = URLSafeSerializer(secret, salt=_OPS_SALT).loads(cookie)
    except BadData:  # a bad signature, or not even the shape of one
        return False
    if not isinstance(data, dict) or not isinstance(data.get("t"), str) or not isinstance(data.get("exp"), int):
        return False
    if now.timestamp() >= data["exp"]:
        return False
    return matches(data["t"], [_token_id(secret, t) for t in tokens])


#: Routes that must take more than the default limit. SendGrid posts event batches of up to 768 KB and,
#: when one is refused, retries and then drops it: every unsubscribe, spam report and bounce in it lost.
ROUTE_LIMITS: dict[str, int] = {"/webhooks/sendgrid/events": 4 * 1024 * 1024}


class FailureLimit:
    """At most ``limit`` failures per client in any ``window`` (the /ops sign-in: 10 per 5 minutes), on the
    service's clock. A client over it is refused before its attempt is even looked at, so guessing goes no
    faster however many tries are sent, until its oldest failure leaves the window. In memory, per process;
    at most ``clients`` clients are remembered (the least recently failing ones are forgotten first)."""

    def __init__(self, clock: Callable[[], datetime], *, limit: int = 10, window: timedelta = timedelta(minutes=5),
                 clients: int = 10_000) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.clients = clients
        self._failures: OrderedDict[str, deque[datetime]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: datetime) -> deque[datetime] | None:
        failures = self._failures.get(client)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if failures is not None and not failures:
            del self._failures[client]
            return None
        return failures

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        now = self.clock()
        with self._lock:
            failures = self._recent(client, now)
            if failures is None or len(failures) < self.limit:
                return None
            return max(1, math.ceil((failures[0] + self.window - now).total_seconds()))

    def failed(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            failures = self._recent(client, now)
            if failures is None:
                failures = self._failures[client] = deque(maxlen=self.limit)
            failures.append(now)
            self._failures.move_to_end(client)
            while len(self._failures) > self.clients:
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


class BodyLimit:
    """Refuse bodies over the route's limit with 413, whether or not Content-Length tells the truth:
    the body is counted as it streams in, and reading stops at the first chunk past the limit."""

    def __init__(self, app: ASGIApp, limit: int, routes: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        #: path -> limit; a route's limit is never below the default.
        self.routes = {path: max(limit, most) for path, most in (ROUTE_LIMITS if routes is None else routes).items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.routes.get(scope.get("path", ""), self.limit)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = JSONResponse({"error": "too_large", "detail": f"request bodies here are limited to {limit} bytes"},
                               status_code=413)
        try:
            if declared is not None and int(declared) > limit:
                return await too_big(scope, receive, send)
        except ValueError:
            return await JSONResponse({"error": "bad_request", "detail": "invalid Content-Length"},
                                      status_code=400)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


class SecurityHeaders:
    """Security headers on every answer, and a strict CSP on HTML pages. Plain ASGI (not Starlette's
    BaseHTTPMiddleware, which runs each request in an extra task with in-memory streams: a third of
    the web process's CPU per registration)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])  # ASGI lets an app leave them out
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    if key not in headers:
                        headers[key] = value
                if headers.get("content-type", "").startswith("text/html") and "content-security-policy" not in headers:
                    headers["content-security-policy"] = PAGE_CSP
            await send(message)

        await self.app(scope, receive, with_headers)


def ops_signed_in(request: Request, settings: Settings, now: datetime) -> bool:
    """An ops bearer header (a proxy may add it) or a valid /ops session cookie."""
    tokens = settings.token_lists["ops"]
    given = bearer(request)
    if given is not None and tokens and matches(given, tokens):
        return True
    return session_valid(settings.secret_key, request.cookies.get(OPS_COOKIE), tokens, now)
