"""The ASGI app: the platform API (/v1), confirmation pages (/c), health and metrics."""

from __future__ import annotations

import logging

import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Unavailable
from ..service import Remind
from . import api, export_api, health, ops, ops_api, pages, provider_hooks, review_page, whatif_page
from .security import BodyLimit, SecurityHeaders

log = logging.getLogger("remind.web")

#: Seconds a client should wait after a 503 while the database or Redis is unreachable.
RETRY_AFTER = 30
_OUTAGES = (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError, redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError)


def create_app(remind: Remind) -> FastAPI:
    app = FastAPI(title="reminder-worker", version="1", description=(
        "Register pending transactions, read their reminder timeline, confirm or cancel them. "
        "Authenticate with `Authorization: Bearer <REMIND_API_TOKEN>` (stats: `REMIND_OPS_TOKEN`)."))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        problems = {".".join(str(p) for p in e["loc"] if p != "body") or "(body)": e["msg"] for e in exc.errors()}
        return JSONResponse({"error": "invalid", "detail": "some fields are invalid", "problems": problems},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def outage(request: Request, exc: Exception):
        """The database or Redis is down: 503 and Retry-After, never a 500; the client repeats the call
        (every write here is idempotent) and the customer's page says to try again in a minute."""
        unavailable = Unavailable.of(exc)
        if unavailable is None:  # a constraint or a bug, not an outage
            log.error("unhandled error", exc_info=exc)
            return JSONResponse({"error": "internal", "detail": "internal error"}, status_code=500)
        log.warning("%s %s: %s", request.method, request.url.path, unavailable)
        headers = {"Retry-After": str(RETRY_AFTER)}
        if request.url.path.startswith("/c/"):
            return pages.outage_page(request, headers)
        return JSONResponse({"error": "unavailable", "detail": str(unavailable)}, status_code=503, headers=headers)

    for kind in _OUTAGES:
        app.add_exception_handler(kind, outage)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": "internal", "detail": "internal error"}, status_code=500)

    app.include_router(api.router(remind))
    app.include_router(ops_api.router(remind))
    app.include_router(review_page.router(remind))
    app.include_router(whatif_page.router(remind))
    app.include_router(pages.router(remind))
    app.include_router(health.router(remind))
    app.include_router(provider_hooks.router(remind))
    app.include_router(export_api.router(remind))  # before ops: it serves /v1/stats?format=csv
    app.include_router(ops.router(remind))
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(api.TRANSACTION_DEFS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, limit=remind.settings.max_body_bytes)
    return app
