"""Ops views of the confirmation funnel: ``GET /v1/stats`` (JSON) and ``GET /ops`` (an HTML page).

Both show the transactions created in the last 7 days unless ``since`` widens (or narrows) the window; the
figures are aggregated by the database (worker.store.funnel_figures), so a request's memory in this process
does not grow with the tables.

The page is drawn on the server as inline SVG with inline styles and no script, so it passes the
pages' strict CSP and needs nothing but a browser. Both need an ops token (REMIND_OPS_TOKEN), never
the platform's: ``/v1/stats`` as a bearer header, ``/ops`` as the header or a session cookie set by
signing in with the form at ``/ops/login`` (a token is never read from the URL, where it would end
up in access logs and browser history).
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field

from ..ladder import Schedule, format_duration
from ..service import Remind
from ..stats import human, pct, report
from .schemas import ERRORS, NO_CONTROL, ErrorBody, ScheduleName
from .security import (
    OPS_COOKIE,
    OPS_SESSION,
    FailureLimit,
    bearer,
    check_scope,
    issue_session,
    matches,
    session_valid,
)

Since = Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_CONTROL, description=(
    "Only transactions created at or after this: an ISO date/time (UTC unless it names a zone), "
    "or a duration back from now such as 7d, 12h, 30d. Default: the last 7 days; widen it for more"))]


class Rate(BaseModel):
    value: float | None = Field(description="confirmed / reached; null when nothing was reached")
    low: float | None = Field(description="95% Wilson score interval, lower bound")
    high: float | None = Field(description="95% Wilson score interval, upper bound")


class Bucket(BaseModel):
    bucket: str
    from_seconds: int
    to_seconds: int | None
    count: int


class StepStats(BaseModel):
    step: str
    variant: str
    reached: int = Field(description="transactions with a reminder of this step and variant sent")
    confirmed_after: int = Field(description="confirmations attributed to this step (the last one sent before)")
    confirmation_rate: Rate
    median_time_to_confirm_seconds: float | None = Field(description="from this step's first send")
    cancelled: int = Field(description="cancelled with this step as the last one sent")
    escalated: int = Field(description="escalated with this step as the last one sent")
    messages: dict[str, int] = Field(description="messages sent, by channel")
    sms_messages: int
    sms_segments: int | None = Field(description="null unless the store records segments per delivery")


class ScheduleStats(BaseModel):
    schedule: str
    transactions: int
    pending: int
    confirmed: int = Field(description="confirmed by the customer (link, or the platform's API)")
    approved: int = Field(0, description="confirmed by ops after a risk review: apart from the customers'")
    cancelled: int
    escalated: int
    confirmed_before_first_step: int
    confirmation_rate: Rate
    median_time_to_confirm_seconds: float | None = Field(description="from created_at")
    time_to_confirm_histogram: list[Bucket]
    steps: list[StepStats]


class StepCost(BaseModel):
    step: str
    variant: str
    reached: int
    customer_confirmations: int = Field(description="customer confirmations attributed to this step and variant")
    cost: str | None = Field(description="its reminders, a decimal string in `currency`; null without prices")
    cost_per_transaction: str | None = Field(description="cost / reached")
    cost_per_customer_confirmation: str | None = Field(description="cost / customer_confirmations")


class ScheduleCost(BaseModel):
    schedule: str
    transactions: int
    customer_confirmations: int = Field(description="confirmed by the customer's link (settled_source = customer)")
    cost: str | None = Field(description="every message to these customers: reminders and notices")
    cost_per_transaction: str | None
    cost_per_customer_confirmation: str | None
    steps: list[StepCost]


class Costs(BaseModel):
    currency: str | None = Field(description="the price table's; null without one (every cost null)")
    schedules: list[ScheduleCost]


class StatsView(BaseModel):
    """The confirmation funnel, its costs and the variant comparison; definitions in docs/stats.md."""

    generated_at: str
    since: str | None = Field(description="the window's start: the given since, else 7 days before generated_at")
    schedule: str | None
    schedules: list[ScheduleStats]
    currency: str | None = Field(None, description="of every cost (pricing.yaml); null without a price table")
    costs: Costs | None = Field(None, description="cost per transaction and per customer confirmation, by "
                                                  "schedule, step and variant")
    experiments: dict[str, Any] | None = Field(None, description=(
        "the variant comparison of the same window: the JSON of GET /v1/experiments?since=<since>"))


#: Failed /ops sign-ins allowed per client address in any LOGIN_WINDOW; more get 429 with Retry-After.
LOGIN_FAILURES, LOGIN_WINDOW = 10, timedelta(minutes=5)


def human_wait(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{seconds} seconds" if seconds < 60 else f"{minutes} minute{'s' if minutes > 1 else ''}"


def router(remind: Remind) -> APIRouter:
    ops = APIRouter(tags=["ops"])
    settings = remind.settings
    #: Failed sign-ins per client address (behind a proxy: the address it forwards, as uvicorn trusts it).
    sign_in_failures = FailureLimit(remind.store.clock, limit=LOGIN_FAILURES, window=LOGIN_WINDOW)

    def auth(request: Request) -> None:
        check_scope(request, "ops", settings.token_lists)

    def signed_in(request: Request) -> bool:
        """An ops bearer header (a proxy may add it) or a valid session cookie."""
        tokens = settings.token_lists["ops"]
        given = bearer(request)
        if given is not None and tokens and matches(given, tokens):
            return True
        return session_valid(settings.secret_key, request.cookies.get(OPS_COOKIE), tokens, remind.store.clock())

    def figures(since: str | None, schedule: str | None) -> dict[str, Any]:
        return report(remind.store, remind.pricing, schedules=list(remind.registry), since=since, schedule=schedule)

    def login_page(error: str | None, status: int) -> HTMLResponse:
        return HTMLResponse(_LOGIN.render(error=error), status_code=status)

    @ops.get("/v1/stats", response_model=StatsView, dependencies=[Depends(auth)],
             summary="The confirmation funnel per schedule, step and variant",
             responses={400: ERRORS[400], 401: ERRORS[401], 403: FORBIDDEN, 422: ERRORS[422]})
    async def stats(since: Since = None, schedule: ScheduleName = None):
        try:
            return await run_in_threadpool(figures, since, schedule)
        except ValueError as exc:
            return JSONResponse({"error": "invalid", "detail": "some fields are invalid",
                                 "problems": {"since": str(exc)}}, status_code=422)

    @ops.get("/ops", include_in_schema=False, response_class=HTMLResponse)
    async def page(request: Request, since: Since = None, schedule: ScheduleName = None):
        if not signed_in(request):
            return RedirectResponse("/ops/login", status_code=303)
        try:
            data = await run_in_threadpool(figures, since, schedule)
            error = None
        except ValueError as exc:
            data, error = {"generated_at": "", "since": None, "schedule": schedule, "schedules": []}, str(exc)
        html = render_page(data, list(remind.registry), since=since, error=error)
        return HTMLResponse(html, status_code=422 if error else 200)

    @ops.get("/ops/login", include_in_schema=False, response_class=HTMLResponse)
    async def login_form():
        if not settings.token_lists["ops"]:
            return login_page("Ops is disabled: set REMIND_OPS_TOKEN.", 401)
        return login_page(None, 200)

    @ops.post("/ops/login", include_in_schema=False, response_class=HTMLResponse)
    async def login(request: Request, token: Annotated[str, Form(max_length=512)] = ""):
        tokens = settings.token_lists["ops"]
        if not tokens:
            return login_page("Ops is disabled: set REMIND_OPS_TOKEN.", 401)
        client = request.client.host if request.client else "-"
        wait = sign_in_failures.retry_after(client)
        if wait is not None:  # refused before the token is looked at: no guess is checked while blocked
            page = login_page(f"Too many failed sign-ins from your address: try again in {human_wait(wait)}.", 429)
            page.headers["Retry-After"] = str(wait)
            return page
        if not matches(token.strip(), tokens):
            sign_in_failures.failed(client)
            return login_page("That is not a valid ops token (REMIND_OPS_TOKEN).", 401)
        sign_in_failures.succeeded(client)
        response = RedirectResponse("/ops", status_code=303)
        response.set_cookie(OPS_COOKIE, issue_session(settings.secret_key, token.strip(), remind.store.clock()),
                            max_age=int(OPS_SESSION.total_seconds()), path="/ops", httponly=True,
                            samesite="strict", secure=settings.public_base.startswith("https://"))
        return response

    @ops.post("/ops/logout", include_in_schema=False)
    async def logout():
        response = RedirectResponse("/ops/login", status_code=303)
        response.delete_cookie(OPS_COOKIE, path="/ops", httponly=True, samesite="strict",
                               secure=settings.public_base.startswith("https://"))
        return response

    return ops


# -- the page ---------------------------------------------------------------------------------------

def render_page(data: dict[str, Any], schedules: list[Schedule], *, since: str | None = None,
                error: str | None = None) -> str:
    """Every schedule of the registry (filtered like the data), plus any the data names that it no longer has."""
    stats = {s["schedule"]: s for s in data["schedules"]}
    known = {s.name: s for s in schedules if data["schedule"] in (None, s.name)}
    names = list(known) + sorted(n for n in stats if n not in known)
    costs = {c["schedule"]: c for c in (data.get("costs") or {}).get("schedules", [])}
    variants = {e["schedule"]: e["steps"] for e in (data.get("experiments") or {}).get("schedules", [])}
    cards = [{"name": n, "s": stats.get(n), "ladder": _ladder(known[n]) if n in known else None,
              "funnel": _funnel(stats[n]) if n in stats else None,
              "hist": _histogram(stats[n]) if n in stats else None,
              "cost": costs.get(n), "step_costs": {(r["step"], r["variant"]): r for r in costs[n]["steps"]}
              if n in costs else {},
              "variants": [_variants(st) for st in variants.get(n, []) if st["comparisons"]],
              "meta": f"priority {known[n].priority} · version {known[n].version[:12]}" if n in known else
              "no longer loaded"} for n in names]
    method = (data.get("experiments") or {}).get("method")
    return _TEMPLATE.render(data=data, cards=cards, since=since or "", error=error, pct=pct,
                            human=human, currency=data.get("currency"), priced="costs" in data, method=method)


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}"


def _variants(st: dict[str, Any]) -> dict[str, Any]:
    """A step's comparisons for the page: each variant's difference from the control with its always-valid
    interval, drawn on an axis that shows 0 and ± the MDE; the verdict; the breakdowns as text."""
    rows = []
    for c in st["comparisons"]:
        rows.append(_comparison_row(c))
    arms = {a["variant"]: a for a in st["variants"]}
    cells = [{"dim": dim, "value": cell["value"], "rows": [_comparison_row(c) for c in cell["comparisons"]]}
             for dim, values in st["breakdowns"].items() for cell in values]
    return {"step": st["step"], "control": st["control"], "concurrent": st["concurrent"], "rows": rows,
            "arms": [arms[v] for v in [st["control"], *(c["variant"]["variant"] for c in st["comparisons"])]],
            "cells": cells}


def _comparison_row(c: dict[str, Any]) -> dict[str, Any]:
    d, mde = c["difference"], c["mde"]
    span = max(2 * mde, *(abs(x) for x in (d["low"], d["high"]) if x is not None))

    def x(v: float) -> float:  # 0 in the middle of a 240-wide axis
        return 130 + 110 * v / span

    bar = None if d["value"] is None else {"low": x(d["low"]), "high": x(d["high"]), "value": x(d["value"])}
    return {"variant": c["variant"]["variant"], "control": c["control"]["variant"],
            "difference": f"{_signed(d['value'])} pts" if d["value"] is not None else "-",
            "interval": f"[{_signed(d['low'])}, {_signed(d['high'])}]" if d["value"] is not None else "",
            "verdict": c["verdict"], "text": c["text"], "bar": bar, "zero": x(0), "mde": (x(-mde), x(mde)),
            "alpha": c["alpha"]}


def _funnel(s: dict[str, Any]) -> dict[str, Any]:
    """Per step and variant: a bar as long as `reached`, split into confirmed, cancelled/escalated, the rest."""
    top = max((r["reached"] for r in s["steps"]), default=0) or 1
    rows = []
    for i, r in enumerate(s["steps"]):
        scale = 300 / top
        confirmed, lost = r["confirmed_after"] * scale, (r["cancelled"] + r["escalated"]) * scale
        rows.append({"y": 34 + i * 40, "label": r["step"], "variant": r["variant"], "reached": r["reached"] * scale,
                     "confirmed": confirmed, "lost": lost, "lost_x": 150 + r["reached"] * scale - lost,
                     "text": f"{r['confirmed_after']} of {r['reached']} confirmed · {pct(r['confirmation_rate'])}",
                     "sub": " · ".join([f"median {human(r['median_time_to_confirm_seconds'])} to confirm"
                                        if r["confirmed_after"] else "no confirmation"] + [
                         f"{r[k]} {k}" for k in ("cancelled", "escalated") if r[k]])})
    return {"rows": rows, "height": max(90, 44 + 40 * len(rows))}


def _histogram(s: dict[str, Any]) -> dict[str, Any]:
    buckets = s["time_to_confirm_histogram"]
    top = max((b["count"] for b in buckets), default=0) or 1
    bars = []
    for i, b in enumerate(buckets):
        h = 140 * b["count"] / top
        bars.append({"x": 30 + i * 52, "y": 170 - h, "h": h, "label": b["bucket"], "count": b["count"]})
    return {"bars": bars}


def _x(t: timedelta, end: timedelta) -> float:
    """Square-root time axis: early steps (minutes apart) and late ones (hours apart) both stay legible."""
    return 40 + 1000 * math.sqrt(max(t.total_seconds(), 0) / max(end.total_seconds(), 1))


def _ladder(schedule: Schedule) -> dict[str, Any]:
    end = schedule.final.after
    points, last_x, level = [], -1000.0, 0
    for step in schedule.steps:
        x = _x(step.after, end)
        level = 1 - level if x - last_x < 120 else 0
        last_x = x
        variants = getattr(step, "variants", ()) or ()
        extra = f" · A/B {'/'.join(v.name for v in variants)}" if variants else ""
        points.append({"x": x, "level": level, "title": step.id, "when": format_duration(step.after),
                       "detail": f"{'+'.join(step.channels)} · {step.template}{extra}"})
    x = _x(end, end)
    final = {"x": x, "y": 112 if x - last_x < 180 and level == 0 else 18, "title": schedule.final.action,
             "when": format_duration(end),
             "detail": f"{'+'.join(schedule.final.channels) or 'no message'} · {schedule.final.reason}"}
    marks = [m for m in (timedelta(0), timedelta(minutes=15), timedelta(hours=1), timedelta(hours=4),
                         timedelta(hours=12), timedelta(days=1), timedelta(days=3)) if m <= end]
    ticks = [{"x": _x(m, end), "label": format_duration(m) if m else "0"} for m in marks]
    return {"points": points, "final": final, "ticks": ticks}


FORBIDDEN = {"model": ErrorBody, "description": "A valid token of another scope (platform, metrics)"}
_LOGIN = Environment(loader=FileSystemLoader(str(Path(__file__).parent)),
                     autoescape=select_autoescape(["html"])).get_template("ops_login.html")
#: The page: inline SVG and CSS, no script (the pages' CSP); escaped throughout.
_TEMPLATE = Environment(loader=FileSystemLoader(str(Path(__file__).parent)), autoescape=True, trim_blocks=True,
                        lstrip_blocks=True).get_template("ops.html")

