"""/ops/whatif: paste or upload a schedule file and see the what-if (worker.whatif) as a table. A plain HTML
form, no script (the strict CSP holds); signed in like /ops. Bad input is a 413 or 422 page, never a 500."""

from __future__ import annotations

import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..errors import ConfigError
from ..service import Remind

_ENV = Environment(loader=FileSystemLoader(str(Path(__file__).parent)), autoescape=select_autoescape(["html"]))
#: The largest schedule file taken (the body limit, REMIND_MAX_BODY_BYTES, applies first).
MAX_FILE_BYTES = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\.ya?ml$")


def router(remind: Remind) -> APIRouter:
    page = APIRouter(include_in_schema=False)

    def render(status: int = 200, **values: Any) -> HTMLResponse:
        values.setdefault("since", "30d")
        values.setdefault("text", "")
        result = values.get("result")
        if result is not None:
            from ..whatif import backtest_text, table_rows  # numpy/statsmodels: only once ops use the page

            values["rows"] = table_rows(result)
            values["backtest_lines"] = backtest_text(result["backtest"]) if result.get("backtest") else None
        return HTMLResponse(_ENV.get_template("whatif.html").render(**values), status_code=status)

    @page.get("/ops/whatif", response_class=HTMLResponse)
    async def form(request: Request):
        if not ops_signed_in_now(request):
            return RedirectResponse("/ops/login", status_code=303)
        return render()

    def ops_signed_in_now(request: Request) -> bool:
        from .security import ops_signed_in

        return ops_signed_in(request, remind.settings, remind.store.clock())

    @page.post("/ops/whatif", response_class=HTMLResponse)
    async def submit(request: Request, schedule_yaml: Annotated[str, Form()] = "",
                     upload: Annotated[UploadFile | None, File()] = None, since: Annotated[str, Form()] = "30d",
                     schedule: Annotated[str, Form()] = "", backtest: Annotated[str, Form()] = ""):
        if not ops_signed_in_now(request):
            return RedirectResponse("/ops/login", status_code=303)
        since, schedule = since.strip()[:64] or "30d", schedule.strip()[:64]
        name = "proposed.yaml"
        data = schedule_yaml.encode("utf-8")
        if upload is not None and upload.filename:
            data = await upload.read(MAX_FILE_BYTES + 1)
            if _NAME.match(Path(upload.filename).name):
                name = Path(upload.filename).name
        keep = {"since": since, "schedule": schedule, "backtest": bool(backtest)}
        if len(data) > MAX_FILE_BYTES:
            return render(413, title="Too large", problems=[f"a schedule file is at most {MAX_FILE_BYTES} bytes"],
                          **keep)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return render(422, title="Not a schedule", problems=["the file is not UTF-8 text"], **keep)
        keep["text"] = text
        if not text.strip():
            return render(422, title="Not a schedule", problems=["paste a schedule file, or upload one"], **keep)
        try:
            result = await run_in_threadpool(_run, remind, text, name, since, schedule or None, bool(backtest))
        except ConfigError as exc:
            return render(422, title="The schedule is not valid", problems=exc.problems, **keep)
        except ValueError as exc:
            return render(422, title="Nothing to replay", problems=[str(exc)], **keep)
        return render(result=result, **keep)

    return page


def _run(remind: Remind, text: str, name: str, since: str, schedule: str | None, with_backtest: bool) -> dict:
    """Validate with the same loader as `remind schedules check` (on a private copy of the text: problems
    name it as ``proposed.yaml`` or the uploaded file's name), then the what-if."""
    # The model's libraries (numpy, scipy, statsmodels: ~70 MB) load with the first what-if, not with the
    # web process that serves the confirmation links.
    from ..whatif_run import load_proposed, pricing_for, run

    with tempfile.TemporaryDirectory(prefix="remind-whatif-") as folder:
        path = Path(folder) / name
        path.write_text(text, encoding="utf-8")
        try:
            proposed = replace(load_proposed(path, remind), source=name)
        except ConfigError as exc:
            raise ConfigError([p.replace(str(path), name) for p in exc.problems]) from None
    return run(remind, proposed, since=since, schedule=schedule, with_backtest=with_backtest,
               pricing=pricing_for(remind))
