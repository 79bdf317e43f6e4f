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
from .schemas import ERRORS, ErrorBody
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

NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"
Since = Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_CONTROL, description=(
    "Only transactions created at or after this: an ISO date/time (UTC unless it names a zone), "
    "or a duration back from now such as 7d, 12h, 30d. Default: the last 7 days; widen it for more"))]
ScheduleName = Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_CONTROL,
                                           description="Only this schedule")]


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
_TEMPLATE = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>Confirmation funnel · reminder-worker</title>
<style>
 body{font-family:"Segoe UI",Roboto,"Liberation Sans",Arial,sans-serif;background:#f4f5f7;margin:0;padding:24px;
  color:#1d2330}
 main{max-width:1180px;margin:0 auto} h1{font-size:1.5rem;margin:0 0 4px} h2{font-size:1.2rem;margin:0}
 h3{font-size:.85rem;text-transform:uppercase;letter-spacing:.04em;color:#5f6675;margin:18px 0 6px}
 .note{color:#5f6675;font-size:.9rem} .bad{color:#b3261e;font-weight:600}
 form{margin:12px 0 20px;display:flex;gap:8px;align-items:center;font-size:.9rem}
 input{padding:6px 8px;border:1px solid #c6cad2;border-radius:6px} button{padding:6px 14px;border:0;
  border-radius:6px;background:#1a73e8;color:#fff}
 section{background:#fff;border-radius:12px;padding:20px 24px;margin:0 0 20px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
 .head{display:flex;justify-content:space-between;align-items:baseline}
 .kpis{display:flex;gap:28px;margin:14px 0 4px;flex-wrap:wrap} .kpi b{display:block;font-size:1.35rem}
 .kpi span{color:#5f6675;font-size:.8rem}
 .charts{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
 svg{max-width:100%;height:auto} svg text{font-family:"Liberation Sans",Arial,sans-serif;font-size:12px;fill:#1d2330}
 svg .muted{fill:#5f6675;font-size:11px} svg .strong{font-weight:700}
 table{border-collapse:collapse;width:100%;font-size:.85rem;margin-top:6px}
 th,td{padding:5px 8px;border-bottom:1px solid #eceef2;text-align:right} th{color:#5f6675;font-weight:600}
 th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
 .variants{margin-top:8px} .comparisons td:last-child{text-align:left} .verdict-better b{color:#1e8e3e}
 .verdict-worse b{color:#b3261e} details{margin:6px 0} summary{cursor:pointer}
</style>
</head>
<body><main>
<form method="post" action="/ops/logout" class="note" style="float:right"><button type="submit">Sign out</button></form>
<nav><a href="/ops">Funnel</a> · <a href="/ops/reviews">Risk review</a> · <a href="/ops/whatif">What-if</a></nav>
<h1>Confirmation funnel</h1>
<p class="note">Which reminder each customer confirmed after. {{ 'Transactions created since ' ~ data.since
  if data.since else 'All transactions' }}{{ ', schedule ' ~ data.schedule if data.schedule }}; generated
  {{ data.generated_at }}. Rates carry 95% Wilson intervals.</p>
{% if method %}
<p class="note">Variants: success is a confirmation by the customer's link; each variant's difference from the
  control carries an always-valid {{ '%g' % ((1 - method.alpha) * 100) }}% interval (mSPRT, MDE
  {{ '%g' % (method.mde * 100) }} pts) that stays valid however often it is looked at, from a fixed start. The
  default 7-day window moves every day: to act on a verdict, set since to the day the variants went live.
  "needs ~N more" is per arm, for an 80% chance of an answer if the true difference is the MDE.</p>
{% endif %}
<form method="get" action="">
 <label>since <input name="since" value="{{ since }}" placeholder="7d (default), 30d or 2026-11-01"></label>
 <label>schedule <input name="schedule" value="{{ data.schedule or '' }}" placeholder="all"></label>
 <button type="submit">Show</button>
</form>
{% if error %}<p class="bad">{{ error }}</p>{% endif %}
{% for c in cards %}
<section id="schedule-{{ c.name }}">
 <div class="head"><h2>{{ c.name }}</h2><span class="note">{{ c.meta }}</span></div>
 {% set s = c.s %}
 {% if s %}
 <div class="kpis">
  <div class="kpi"><b>{{ s.transactions }}</b><span>transactions</span></div>
  <div class="kpi"><b>{{ s.confirmed }}</b><span>confirmed by customers · {{ pct(s.confirmation_rate) }}</span></div>
  {% if s.approved %}
  <div class="kpi"><b>{{ s.approved }}</b><span>approved by ops (not counted as confirmed)</span></div>
  {% endif %}
  <div class="kpi"><b>{{ s.cancelled }}</b><span>cancelled</span></div>
  <div class="kpi"><b>{{ s.escalated }}</b><span>escalated</span></div>
  <div class="kpi"><b>{{ s.pending }}</b><span>pending</span></div>
  <div class="kpi"><b>{{ human(s.median_time_to_confirm_seconds) }}</b><span>median time to confirm</span></div>
  <div class="kpi"><b>{{ s.confirmed_before_first_step }}</b><span>confirmed before any reminder</span></div>
  {% if c.cost and currency %}
  <div class="kpi cost"><b>{{ currency }} {{ c.cost.cost }}</b><span>cost · {{ c.cost.cost_per_transaction or '-' }} per
   transaction · {{ c.cost.cost_per_customer_confirmation or '-' }} per customer confirmation
   ({{ c.cost.customer_confirmations }})</span></div>
  {% elif priced %}
  <div class="kpi cost"><b>-</b><span>cost: no price table (pricing.yaml)</span></div>
  {% endif %}
 </div>
 <div class="charts">
  <div>
  <h3>Funnel: reached → confirmed after each step</h3>
  <svg class="chart funnel" role="img" viewBox="0 0 680 {{ c.funnel.height }}" width="680"
   height="{{ c.funnel.height }}" xmlns="http://www.w3.org/2000/svg">
   <title>Funnel of {{ c.name }}</title>
   <rect x="150" y="4" width="12" height="12" fill="#1a73e8"/><text x="166" y="14">confirmed after</text>
   <rect x="270" y="4" width="12" height="12" fill="#d6e2f3"/><text x="286" y="14">later step / pending</text>
   <rect x="420" y="4" width="12" height="12" fill="#d93025"/><text x="436" y="14">cancelled or escalated here</text>
   {% for r in c.funnel.rows %}
   <text x="0" y="{{ r.y + 12 }}" class="strong">{{ r.label }}</text>
   <text x="0" y="{{ r.y + 26 }}" class="muted">{{ r.variant }}</text>
   <rect x="150" y="{{ r.y }}" width="{{ '%.1f' % r.reached }}" height="28" rx="3" fill="#d6e2f3"/>
   <rect x="150" y="{{ r.y }}" width="{{ '%.1f' % r.confirmed }}" height="28" rx="3" fill="#1a73e8"/>
   {% if r.lost %}<rect x="{{ '%.1f' % r.lost_x }}" y="{{ r.y }}" width="{{ '%.1f' % r.lost }}" height="28"
    rx="3" fill="#d93025"/>{% endif %}
   <text x="460" y="{{ r.y + 12 }}">{{ r.text }}</text>
   <text x="460" y="{{ r.y + 26 }}" class="muted">{{ r.sub }}</text>
   {% else %}<text x="0" y="50" class="muted">no reminder went out in this period</text>
   {% endfor %}
  </svg>
  </div>
  <div>
  <h3>Time to confirm (from creation)</h3>
  <svg class="chart histogram" role="img" viewBox="0 0 400 200" width="400" height="200"
   xmlns="http://www.w3.org/2000/svg">
   <title>Time to confirm in {{ c.name }}</title>
   <line x1="24" y1="170.5" x2="396" y2="170.5" stroke="#c6cad2"/>
   {% for b in c.hist.bars %}
   <rect x="{{ b.x }}" y="{{ '%.1f' % b.y }}" width="40" height="{{ '%.1f' % b.h }}" rx="2" fill="#1a73e8"/>
   <text x="{{ b.x + 20 }}" y="{{ '%.1f' % (b.y - 5) }}" text-anchor="middle">{{ b.count }}</text>
   <text x="{{ b.x + 20 }}" y="188" text-anchor="middle" class="muted">{{ b.label }}</text>
   {% endfor %}
  </svg>
  </div>
 </div>
 <table>
  <tr><th>step</th><th>variant</th><th>reached</th><th>confirmed after</th><th>rate [95% CI]</th>
   <th>median</th><th>cancelled</th><th>escalated</th><th>messages</th><th>SMS segments</th>
   {% if c.cost %}<th>cost{{ ' (' ~ currency ~ ')' if currency }}</th><th>per transaction</th>
   <th>customer confirmations</th><th>per customer confirmation</th>{% endif %}</tr>
  {% for r in s.steps %}
  {% set k = c.step_costs.get((r.step, r.variant)) %}
  <tr><td>{{ r.step }}</td><td>{{ r.variant }}</td><td>{{ r.reached }}</td><td>{{ r.confirmed_after }}</td>
   <td>{{ pct(r.confirmation_rate) }}</td><td>{{ human(r.median_time_to_confirm_seconds) }}</td>
   <td>{{ r.cancelled }}</td><td>{{ r.escalated }}</td>
   <td>{% for ch, n in r.messages.items() %}{{ ch }} {{ n }}{{ ', ' if not loop.last }}{% endfor %}</td>
   <td>{{ r.sms_segments if r.sms_segments is not none else '-' }}</td>
   {% if c.cost %}<td class="cost">{{ k.cost or '-' if k else '-' }}</td>
   <td>{{ k.cost_per_transaction or '-' if k else '-' }}</td><td>{{ k.customer_confirmations if k else '-' }}</td>
   <td>{{ k.cost_per_customer_confirmation or '-' if k else '-' }}</td>{% endif %}</tr>
  {% endfor %}
 </table>
 {% if c.cost %}<p class="note">Cost: the reminders of each step and variant that the provider accepted
  (pricing.yaml); per customer confirmation counts only confirmations by the customer's link, attributed to
  the last reminder before them. The schedule's cost also counts its notices.</p>{% endif %}
 {% for v in c.variants %}
 <div class="variants" id="variants-{{ c.name }}-{{ v.step }}">
 <h3>Variants of {{ v.step }}: each against the control, {{ v.control }}</h3>
 <p class="note">Transactions created {{ v.concurrent.from }} to {{ v.concurrent.to }}, while every variant was
  sent{{ ' (' ~ v.concurrent.left_out ~ ' outside, not compared)' if v.concurrent.left_out }}.</p>
 <table>
  <tr><th>variant</th><th>decided</th><th>customer confirmations</th><th>rate</th><th>ops</th><th>platform</th>
   <th>open</th><th>time to confirm: median</th></tr>
  {% for a in v.arms %}
  <tr><td>{{ a.variant }}{{ ' (control)' if a.variant == v.control }}</td><td>{{ a.decided }}</td>
   <td>{{ a.confirmed_by_customer }}</td>
   <td>{{ '%.1f%%' % (a.customer_rate * 100) if a.customer_rate is not none else '-' }}</td>
   <td>{{ a.confirmed_by_ops }}</td><td>{{ a.confirmed_by_platform }}</td><td>{{ a.open }}</td>
   <td>{{ human(a.time_to_confirm_seconds.median) }}</td></tr>
  {% endfor %}
 </table>
 <table class="comparisons">
  <tr><th>variant</th><th>vs</th><th>difference</th><th>always-valid interval</th><th>interval, 0 and ±MDE</th>
   <th>verdict</th></tr>
  {% for r in v.rows %}
  <tr class="verdict-{{ r.verdict | replace(' ', '-') }}"><td>{{ r.variant }}</td><td>{{ r.control }}</td>
   <td>{{ r.difference }}</td><td>{{ r.interval }}</td>
   <td><svg class="interval" role="img" viewBox="0 0 260 24" width="260" height="24"
    xmlns="http://www.w3.org/2000/svg"><title>{{ r.variant }} vs {{ r.control }}: {{ r.difference }}
    {{ r.interval }}</title>
    <rect x="{{ '%.1f' % r.mde[0] }}" y="4" width="{{ '%.1f' % (r.mde[1] - r.mde[0]) }}" height="16" fill="#eceef2"/>
    <line x1="{{ '%.1f' % r.zero }}" y1="2" x2="{{ '%.1f' % r.zero }}" y2="22" stroke="#5f6675"/>
    {% if r.bar %}<rect x="{{ '%.1f' % r.bar.low }}" y="9" width="{{ '%.1f' % (r.bar.high - r.bar.low) }}" height="6"
     rx="3" fill="{{ '#1e8e3e' if r.verdict == 'better' else '#d93025' if r.verdict == 'worse' else '#1a73e8' }}"/>
    <circle cx="{{ '%.1f' % r.bar.value }}" cy="12" r="4" fill="#1d2330"/>{% endif %}
   </svg></td>
   <td><b>{{ r.text }}</b></td></tr>
  {% endfor %}
 </table>
 {% if v.cells %}
 <details><summary class="note">By segment, locale and channels (α shared by the cells of each)</summary>
 <table>
  <tr><th>breakdown</th><th>value</th><th>comparison</th><th>difference</th><th>always-valid interval</th>
   <th>verdict</th></tr>
  {% for cell in v.cells %}{% for r in cell.rows %}
  <tr><td>{{ cell.dim }}</td><td>{{ cell.value }}</td><td>{{ r.variant }} vs {{ r.control }}</td>
   <td>{{ r.difference }}</td><td>{{ r.interval }}</td><td>{{ r.text }}</td></tr>
  {% endfor %}{% endfor %}
 </table>
 </details>
 {% endif %}
 </div>
 {% endfor %}
 {% else %}
 <p class="note">No transactions on this schedule in this period.</p>
 {% endif %}
 {% if c.ladder %}
 <h3>Ladder (square-root time axis)</h3>
 <svg class="chart ladder" role="img" viewBox="0 0 1120 150" width="1120" height="150"
  xmlns="http://www.w3.org/2000/svg">
  <title>Ladder of {{ c.name }}</title>
  <line x1="40" y1="80.5" x2="{{ c.ladder.final.x }}" y2="80.5" stroke="#9aa3b2" stroke-width="2"/>
  {% for t in c.ladder.ticks %}
  <line x1="{{ '%.1f' % t.x }}" y1="76" x2="{{ '%.1f' % t.x }}" y2="85" stroke="#9aa3b2"/>
  <text x="{{ '%.1f' % t.x }}" y="146" text-anchor="middle" class="muted">{{ t.label }}</text>
  {% endfor %}
  {% for p in c.ladder.points %}
  {% set y = 18 if p.level == 0 else 112 %}
  <line x1="{{ '%.1f' % p.x }}" y1="{{ 48 if p.level == 0 else 88 }}" x2="{{ '%.1f' % p.x }}"
   y2="{{ 72 if p.level == 0 else 106 }}" stroke="#c6cad2"/>
  <circle cx="{{ '%.1f' % p.x }}" cy="80.5" r="7" fill="#1a73e8"/>
  <text x="{{ '%.1f' % p.x }}" y="{{ y }}" text-anchor="middle" class="strong">{{ p.title }} · {{ p.when }}</text>
  <text x="{{ '%.1f' % p.x }}" y="{{ y + 16 }}" text-anchor="middle" class="muted">{{ p.detail }}</text>
  {% endfor %}
  {% set f = c.ladder.final %}
  <rect x="{{ '%.1f' % (f.x - 7) }}" y="73.5" width="14" height="14" fill="#d93025"/>
  <text x="{{ '%.1f' % (f.x + 7) }}" y="{{ f.y }}" text-anchor="end" class="strong">{{ f.title }} · {{ f.when }}</text>
  <text x="{{ '%.1f' % (f.x + 7) }}" y="{{ f.y + 16 }}" text-anchor="end" class="muted">{{ f.detail }}</text>
 </svg>
 {% endif %}
</section>
{% else %}
<p class="note">No schedules.</p>
{% endfor %}
</main></body>
</html>
""")
