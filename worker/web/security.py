"""Bearer tokens compared in constant time, request bodies capped, security headers on every answer."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import HTTPException, Request
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; "
            "base-uri 'none'")


def check_bearer(request: Request, tokens: list[str]) -> None:
    """401 unless the Authorization header carries one of ``tokens``; every candidate is compared."""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not tokens:
        raise HTTPException(401, "the API is disabled: set REMIND_API_TOKEN", {"www-authenticate": "Bearer"})
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.strip().encode(), token.encode())
    if scheme.lower() != "bearer" or not ok:
        raise HTTPException(401, "a valid bearer token is required", {"www-authenticate": "Bearer"})


#: Routes that must take more than the default limit. SendGrid posts event batches of up to 768 KB and,
#: when one is refused, retries and then drops it: every unsubscribe, spam report and bounce in it lost.
ROUTE_LIMITS: dict[str, int] = {"/webhooks/sendgrid/events": 4 * 1024 * 1024}


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
