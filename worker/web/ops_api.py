"""The risk-review queue and the events feed under /v1: thin handlers over worker.service.

Reviews take an ops token (``REMIND_OPS_TOKEN``). The events feed and resend take an ops token or the
platform's own (``REMIND_API_TOKEN``): the platform catches up by itself after it was down.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import AlreadySettled, ConfigError, InvalidInput, NotFound
from ..ladder import parse_duration
from ..service import Remind
from .api import FORBIDDEN, TxId, error
from .schemas import ERRORS, ErrorBody
from .security import bearer, check_scope, matches


class ReviewAction(BaseModel):
    """An ops decision: who made it, and why."""

    model_config = ConfigDict(extra="forbid")
    actor: str = Field(min_length=1, max_length=128, description="The operator's name, kept in the audit trail")
    note: str | None = Field(None, max_length=1000, description="Free text for the audit trail")


class DeclineAction(ReviewAction):
    reason: str = Field("risk_declined", min_length=1, max_length=500,
                        description="risk_declined, compliance, customer_request, or a code of the platform's")


class ResendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] | None = Field(None, max_length=1000, description="Event ids (evt_...), or none with failed")
    failed: bool = Field(False, description="Resend every event given up after its retry window")


def router(remind: Remind) -> APIRouter:
    def ops_only(request: Request) -> None:
        check_scope(request, "ops", remind.settings.token_lists)

    def ops_or_platform(request: Request) -> None:
        given = bearer(request)
        if given is not None and matches(given, remind.settings.token_lists["platform"]):
            return
        check_scope(request, "ops", remind.settings.token_lists)

    common = {400: ERRORS[400], 401: ERRORS[401], 403: FORBIDDEN, 413: ERRORS[413], 422: ERRORS[422]}
    reviews = APIRouter(prefix="/v1/reviews", dependencies=[Depends(ops_only)], responses=common, tags=["reviews"])
    events = APIRouter(prefix="/v1/events", dependencies=[Depends(ops_or_platform)], responses=common,
                       tags=["events"])

    @reviews.get("", summary="Escalated transactions, oldest first, with what was sent and done")
    async def review_list(limit: Annotated[int, Query(ge=1, le=500)] = 100):
        return JSONResponse({"reviews": await run_in_threadpool(lambda: remind.reviews(limit=limit))})

    async def act(tx_id: str, action: str, body: ReviewAction, reason: str | None = None) -> JSONResponse:
        try:
            view = await run_in_threadpool(lambda: remind.review(tx_id, action, actor=body.actor, note=body.note,
                                                                 reason=reason))
        except NotFound as exc:
            return error(404, "not_found", str(exc))
        except AlreadySettled as exc:
            return error(409, "not_under_review", f"{exc}; only an escalated transaction can be reviewed",
                         status=exc.status)
        except InvalidInput as exc:
            return error(422, "invalid", "some fields are invalid", problems=exc.problems)
        return JSONResponse(view)

    settled = {404: ERRORS[404], 409: {"model": ErrorBody, "description": "Not under review"}}

    @reviews.post("/{tx_id}/contact", responses=settled, summary="Ask the customer to verify the transfer")
    async def contact(tx_id: TxId, body: ReviewAction):
        return await act(tx_id, "contact", body)

    @reviews.post("/{tx_id}/approve", responses=settled, summary="Confirm after review, and tell the customer")
    async def approve(tx_id: TxId, body: ReviewAction):
        return await act(tx_id, "approve", body)

    @reviews.post("/{tx_id}/decline", responses=settled, summary="Cancel after review, and tell the customer why")
    async def decline(tx_id: TxId, body: DeclineAction):
        return await act(tx_id, "decline", body, reason=body.reason)

    @events.get("", summary="The events, oldest first after an event id, each with its delivery status")
    async def event_list(after: Annotated[str | None, Query(max_length=40, description="An event id")] = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                         status: Annotated[Literal["failed"] | None, Query()] = None,
                         since: Annotated[str | None, Query(max_length=20, description="Such as 1d or 6h")] = None):
        try:
            start = since_time(remind, since)
            found = await run_in_threadpool(lambda: remind.events(after=after, limit=limit,
                                                                  failed_only=status == "failed", since=start))
        except InvalidInput as exc:
            return error(422, "invalid", "some fields are invalid", problems=exc.problems)
        return JSONResponse({"events": found, "next_after": found[-1]["id"] if found else after})

    unsent = {404: ERRORS[404], 409: {"model": ErrorBody, "description": "No REMIND_PLATFORM_WEBHOOK_URL is set"}}

    @events.post("/{event_id}/resend", responses=unsent, summary="Send one event again")
    async def resend_one(event_id: Annotated[str, Path(max_length=40)]):
        return await resend(remind, [event_id], failed=False)

    @events.post("/resend", responses=unsent, summary="Send events again: by id, or every failed one")
    async def resend_many(body: ResendRequest):
        if not body.ids and not body.failed:
            return error(422, "invalid", "name the events", problems={"ids": "give ids, or failed: true"})
        return await resend(remind, body.ids, failed=body.failed)

    experiments = APIRouter(prefix="/v1/experiments", dependencies=[Depends(ops_only)], responses=common,
                            tags=["stats"])

    @experiments.get("", summary="Variants against their control: always-valid intervals and verdicts")
    async def compare(since: Annotated[str | None, Query(min_length=1, max_length=64, description=(
                          "A fixed start keeps the verdict valid under daily looks: an ISO date, or 30d"))] = None,
                      schedule: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
                      mde: Annotated[float, Query(gt=0, lt=1)] = 0.05,
                      alpha: Annotated[float, Query(gt=0, lt=0.5)] = 0.05):
        from ..experiments import report  # scipy loads with the first comparison, not with the web process

        try:
            return JSONResponse(await run_in_threadpool(lambda: report(
                remind.store, since=since, schedule=schedule, schedules=remind.registry, mde=mde, alpha=alpha)))
        except ValueError as exc:
            return error(422, "invalid", "some fields are invalid", problems={"since": str(exc)})

    api = APIRouter()
    api.include_router(experiments)
    api.include_router(reviews)
    api.include_router(events)
    return api


def since_time(remind: Remind, since: str | None) -> datetime | None:
    """``1d`` ago, on the service's clock."""
    if not since:
        return None
    try:
        return remind.store.clock() - parse_duration(since)
    except (ValueError, TypeError) as exc:
        raise InvalidInput({"since": f"a duration such as 1d, 6h or 30m ({exc})"}) from None


async def resend(remind: Remind, ids: list[str] | None, *, failed: bool) -> JSONResponse:
    try:
        sent: list[Any] = await run_in_threadpool(lambda: remind.resend_events(ids, failed=failed))
    except NotFound as exc:
        return error(404, "not_found", str(exc))
    except InvalidInput as exc:
        return error(422, "invalid", "some fields are invalid", problems=exc.problems)
    except ConfigError as exc:
        return error(409, "not_configured", exc.problems[0])
    return JSONResponse({"resent": sent})

