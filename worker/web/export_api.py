"""``GET /v1/stats.csv`` (and ``GET /v1/stats?format=csv``): the stats export with costs, as CSV.

One row per (schedule, step, variant, customer segment); the columns and their definitions are in
docs/stats.md, "Export". Ops scope (``REMIND_OPS_TOKEN``), as ``/v1/stats``. ``?format=csv`` on
``/v1/stats`` is served here by a route that matches only that query, registered before the funnel's
own ``/v1/stats`` (worker/web/ops.py), which answers every other request to that path.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from ..export import export, to_csv
from ..service import Remind
from .api import FORBIDDEN
from .schemas import ERRORS, NO_CONTROL, ScheduleName
from .security import check_scope

Since = Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_CONTROL, description=(
    "Only transactions created at or after this: an ISO date/time (UTC unless it names a zone), "
    "or a duration back from now such as 7d, 12h, 1d12h"))]


class CsvResponse(Response):
    media_type = "text/csv"


class _WhenFormatCsv(APIRoute):
    """A route that matches its path only with ``?format=csv``, so the path's other route serves the rest."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match == Match.NONE:
            return match, child
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return (match, child) if query.get("format") == ["csv"] else (Match.NONE, {})


def router(remind: Remind) -> APIRouter:
    def ops_only(request: Request) -> None:
        check_scope(request, "ops", remind.settings.token_lists)

    def csv_answer(since: str | None, schedule: str | None) -> Any:
        try:
            data = export(remind.store, remind.pricing, since=since, schedule=schedule)
        except ValueError as exc:
            return JSONResponse({"error": "invalid", "detail": "some fields are invalid",
                                 "problems": {"since": str(exc)}}, status_code=422)
        return CsvResponse(to_csv(data), headers={
            "content-disposition": 'attachment; filename="remind-stats.csv"'})

    responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "One row per schedule, step, variant and segment (columns: docs/stats.md)",
              "content": {"text/csv": {"schema": {"type": "string"}}}},
        401: ERRORS[401], 403: FORBIDDEN, 422: ERRORS[422]}
    auth = [Depends(ops_only)]
    plain = APIRouter(tags=["ops"])
    by_query = APIRouter(tags=["ops"], route_class=_WhenFormatCsv)

    @plain.get("/v1/stats.csv", response_class=Response, responses=responses, dependencies=auth,
               summary="The stats export with costs, as CSV")
    async def stats_csv(since: Since = None, schedule: ScheduleName = None):
        return await run_in_threadpool(csv_answer, since, schedule)

    @by_query.get("/v1/stats", response_class=CsvResponse, dependencies=auth, include_in_schema=False)
    async def stats_format_csv(since: Since = None, schedule: ScheduleName = None):
        return await run_in_threadpool(csv_answer, since, schedule)

    plain.include_router(by_query)
    return plain
