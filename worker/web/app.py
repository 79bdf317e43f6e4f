"""The ASGI app: the platform API (/v1), confirmation pages (/c), health and metrics."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..service import Remind
from . import api, health, ops, pages, provider_hooks
from .security import BodyLimit, SecurityHeaders

log = logging.getLogger("remind.web")


def create_app(remind: Remind) -> FastAPI:
    app = FastAPI(title="reminder-worker", version="1", description=(
        "Register pending transactions, read their reminder timeline, confirm or cancel them. "
        "Authenticate with `Authorization: Bearer <REMIND_API_TOKEN>`."))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        problems = {".".join(str(p) for p in e["loc"] if p != "body") or "(body)": e["msg"] for e in exc.errors()}
        return JSONResponse({"error": "invalid", "detail": "some fields are invalid", "problems": problems},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": "internal", "detail": "internal error"}, status_code=500)

    app.include_router(api.router(remind))
    app.include_router(pages.router(remind))
    app.include_router(health.router(remind))
    app.include_router(provider_hooks.router(remind))
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
