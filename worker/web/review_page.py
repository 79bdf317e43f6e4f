"""The risk-review page under /ops: the queue of escalated transactions and the three ops actions, as
plain HTML forms (no script, so it passes the strict CSP). Signed in like /ops; the session cookie is
SameSite=Strict, so another site cannot make a signed-in browser post these forms."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..errors import AlreadySettled, InvalidInput, NotFound
from ..service import Remind
from .api import TxId
from .security import ops_signed_in

_ENV = Environment(loader=FileSystemLoader(str(Path(__file__).parent)), autoescape=select_autoescape(["html"]))
DONE = {"contact": "asked the customer to verify", "approve": "approved", "decline": "declined"}


def router(remind: Remind) -> APIRouter:
    page = APIRouter(include_in_schema=False)

    def render(message: str | None = None, tone: str = "ok", status: int = 200) -> HTMLResponse:
        reviews = remind.reviews(limit=200)
        return HTMLResponse(_ENV.get_template("reviews.html").render(reviews=reviews, message=message, tone=tone),
                            status_code=status)

    @page.get("/ops/reviews", response_class=HTMLResponse)
    async def queue(request: Request):
        if not ops_signed_in(request, remind.settings, remind.store.clock()):
            return RedirectResponse("/ops/login", status_code=303)
        return await run_in_threadpool(render)

    @page.post("/ops/reviews/{tx_id}/{action}", response_class=HTMLResponse)
    async def act(request: Request, tx_id: TxId, action: str,
                  actor: Annotated[str, Form(max_length=128)] = "", note: Annotated[str, Form(max_length=1000)] = "",
                  reason: Annotated[str, Form(max_length=500)] = "risk_declined"):
        if not ops_signed_in(request, remind.settings, remind.store.clock()):
            return RedirectResponse("/ops/login", status_code=303)
        if action not in DONE:
            return await run_in_threadpool(render, f"Unknown action {action!r}.", "bad", 404)
        try:
            await run_in_threadpool(lambda: remind.review(tx_id, action, actor=actor, note=note or None,
                                                          reason=reason if action == "decline" else None))
        except InvalidInput as exc:
            problems = "; ".join(f"{k}: {v}" for k, v in exc.problems.items())
            return await run_in_threadpool(render, f"{tx_id}: {problems}", "bad", 422)
        except (NotFound, AlreadySettled) as exc:
            return await run_in_threadpool(render, f"{exc}.", "bad", 409)
        return await run_in_threadpool(render, f"{tx_id}: {DONE[action]} by {actor.strip()}.")

    return page
