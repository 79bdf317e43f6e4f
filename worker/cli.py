"""`remind`: a thin face over the service; every command is a call into worker.service."""

from __future__ import annotations

import json
import os
import sys
from decimal import Decimal
from pathlib import Path

import click
from pydantic import ValidationError

from .errors import AlreadySettled, ConfigError, Conflict, InvalidInput, NotFound, SettingsError, Unavailable
from .logs import setup
from .settings import Settings, describe_invalid

#: sysexits.h: EX_TEMPFAIL (try again later: the database or Redis is down) and EX_CONFIG (fix a setting).
EXIT_UNAVAILABLE = 75
EXIT_CONFIG = 78


class Refused(click.ClickException):
    """One line on stderr, ``remind: ...``, and a distinct exit code: never a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"remind: {self.format_message()}", err=True, file=file)


class _Main(click.Group):
    """Turns the failures a user can act on into one line and an exit code; the rest stay tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            raise Refused(str(exc), EXIT_CONFIG) from None
        except ConfigError as exc:
            raise Refused("invalid configuration (`remind schedules check` shows every problem): "
                          + "; ".join(exc.problems), EXIT_CONFIG) from None
        except ValidationError as exc:
            raise Refused("; ".join(describe_invalid(exc)), EXIT_CONFIG) from None
        except Exception as exc:
            outage = Unavailable.of(exc)
            if outage is None:
                raise
            raise Refused(str(outage), EXIT_UNAVAILABLE) from None


def _settings() -> Settings:
    return Settings()


def _folders(settings: Settings) -> Settings:
    problems = settings.folder_problems()
    if problems:
        raise problems[0]
    return settings


def _remind(settings: Settings | None = None, *, migrate: bool = True):
    from .service import Remind

    settings = _folders(settings or _settings())
    return Remind.from_settings(settings, migrate=migrate)


def _serving(settings: Settings, *, migrate: bool = True):
    """The service for a long-running process, after the checks every such process makes: folders, a
    strong signing key (a development one is generated), and in production a provider for every channel."""
    from .runner import preflight, prepare
    from .store import upgrade

    remind = _remind(prepare(settings), migrate=False)
    preflight(remind)
    if migrate:
        upgrade(remind.store.engine)
    return remind


@click.group(cls=_Main)
@click.option("--json-logs", is_flag=True, help="Log one JSON object a line (or REMIND_LOG_FORMAT=json).")
@click.pass_context
def main(ctx: click.Context, json_logs: bool) -> None:
    """Reminds customers to confirm pending transactions, and cancels the ones they never confirm."""
    ctx.ensure_object(dict)
    setup("json" if json_logs else os.environ.get("REMIND_LOG_FORMAT", "text"),
          os.environ.get("REMIND_LOG_LEVEL", "info"))


@main.command()
@click.option("--port", type=int, default=None, help="HTTP port (default: PORT, else 8000).")
def run(port: int | None) -> None:
    """Scheduler, workers and the web app in one process (the embedded default: SQLite, in-process broker)."""
    from .runner import Embedded, wait_for_signal
    from .senders import describe

    remind = _serving(_settings())
    click.echo(f"remind: database {remind.store.engine.url.render_as_string(hide_password=True)}, "
               f"broker {'redis' if remind.settings.redis_url else 'in-process'}, "
               f"senders {describe(remind.senders)}, tick every {remind.settings.tick_seconds}s", err=True)
    engine = Embedded(remind, web=True, port=port).start()
    try:
        wait_for_signal()
    finally:
        engine.stop()


@main.command()
@click.option("--speed", type=click.FloatRange(min=1, max=10), default=1, show_default=True,
              help="Run the service's clock this many times faster than the wall clock.")
def demo(speed: float) -> None:
    """Two demo transactions on a second-scale schedule: one confirmed, one cancelled. Exits 0 when done."""
    from .demo import run_demo

    ok = run_demo(_settings(), lambda line: click.secho(f"▶ {line}", fg="cyan", err=False), speed=speed)
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--port", type=int, default=None, help="HTTP port (default: PORT, else 8000).")
def web(port: int | None) -> None:
    """The web app alone: the platform API, confirmation pages, health and metrics."""
    from .runner import watch_config, web_server

    remind = _serving(_settings())
    watch_config(remind)
    web_server(remind, port=port).run()


@main.command()
def scheduler() -> None:
    """The periodic scan alone; enqueues to Redis (REDIS_URL) for `remind worker` processes."""
    from .runner import run_scheduler

    settings = _settings()
    if not settings.redis_url:
        raise SettingsError("REDIS_URL", "remind scheduler needs it, to enqueue for `remind worker` processes; "
                            "use `remind run` for the embedded default")
    run_scheduler(_serving(settings))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--processes", "-p", default=None, type=int, help="Worker processes (default: CPUs).")
@click.option("--threads", "-t", default=None, type=int, help="Threads per process (REMIND_WORKER_THREADS).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(processes: int | None, threads: int | None, extra: tuple[str, ...]) -> None:
    """Dramatiq worker processes on Redis (extra arguments go to dramatiq)."""
    settings = _settings()
    if not settings.redis_url:
        raise SettingsError("REDIS_URL", "remind worker needs it, to consume what `remind scheduler` enqueues; "
                            "use `remind run` for the embedded default")
    _serving(settings, migrate=False)  # refuse here, once, rather than in every worker process
    from dramatiq.cli import main as dramatiq_main

    args = ["dramatiq", "worker.dramatiq_app", "--threads", str(threads or settings.worker_threads),
            "--queues", settings.queue_name]
    if processes:
        args += ["--processes", str(processes)]
    sys.argv = args + list(extra)
    sys.exit(dramatiq_main())


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply Alembic migrations up to the newest."""
    from .store import make_engine, upgrade

    settings = _settings()
    upgrade(make_engine(settings.database_url, connect_timeout=settings.db_connect_timeout,
                        tcp_timeout=settings.db_tcp_timeout))
    click.echo("database is up to date")


@db.command("rollup")
@click.option("--again", is_flag=True, help="forget the whole roll-up first and write it anew: after a deploy "
              "during which processes of the previous release ran beside this one (their changes to settled "
              "transactions may have missed what this release rolls up)")
def db_rollup(again: bool) -> None:
    """Roll up the funnel and costs of every settled transaction now (the scheduler's tick does it a step at a
    time)."""
    import time

    from .store import Store, make_engine
    from .store.rollup import forget_all, roll_up_all

    settings = _settings()
    store = Store(make_engine(settings.database_url, connect_timeout=settings.db_connect_timeout,
                              tcp_timeout=settings.db_tcp_timeout))
    started = time.perf_counter()
    if again:
        forget_all(store)
    rolled = roll_up_all(store)
    click.echo(f"funnel roll-up: {rolled} transactions rolled up in {time.perf_counter() - started:.1f}s")


@main.group()
def schedules() -> None:
    """Schedules (REMIND_SCHEDULES_DIR) and templates (REMIND_TEMPLATES_DIR)."""


@schedules.command("check")
def schedules_check() -> None:
    """Validate every schedule and template; exit non-zero naming file, line and field."""
    from .ladder import format_duration
    from .pricing import load_pricing
    from .service import load_config

    settings = _folders(_settings())
    problems: list[str] = []
    try:
        registry, templates = load_config(settings)
    except ConfigError as exc:
        problems += exc.problems
    try:
        pricing = load_pricing(settings.pricing_file)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    for s in registry:
        ladder = ", ".join(f"{format_duration(st.after)} {st.template} [{'/'.join(st.channels)}]" for st in s.steps)
        click.echo(f"ok  {s.name} (priority {s.priority}): {ladder}; {s.final.action} at "
                   f"{format_duration(s.final.after)}")
    click.echo(f"templates: {', '.join(templates.locales)}")
    click.echo(f"prices: {pricing.currency}, SMS {len(pricing.sms_by_code)} calling codes + default "
               f"({settings.pricing_file})" if pricing.available else
               f"prices: none ({settings.pricing_file} does not exist: costs are shown as null)")
    from .preview import sms_budget_warnings

    for warning in sms_budget_warnings(templates, settings.sms_segment_budget, settings):
        click.echo(f"warning: {warning}", err=True)


@schedules.command("preview")
@click.argument("name")
@click.option("--tx", "tx_file", type=click.File("r", encoding="utf-8"), default=None,
              help="A transaction JSON file (- for stdin); default: the sample transaction, created now.")
@click.option("--locale", default=None, help="Render in this locale instead of the customer's (e.g. en, zh-CN).")
@click.option("--json", "as_json", is_flag=True, help="The preview as JSON.")
def schedules_preview(name: str, tx_file, locale: str | None, as_json: bool) -> None:
    """What schedule NAME would send: each step's time in the customer's zone, channel, text, SMS segments."""
    from .preview import preview, to_text
    from .service import load_config

    settings = _folders(_settings())
    try:
        config = load_config(settings)
    except ConfigError as exc:
        raise click.ClickException("invalid configuration:\n" + "\n".join(exc.problems)) from None
    payload = None
    if tx_file is not None:
        try:
            payload = json.loads(tx_file.read(), parse_float=Decimal)
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"not valid JSON: {exc}") from None
    try:
        result = preview(config, name, payload, locale, settings=settings)
    except KeyError:
        raise click.ClickException(f"no schedule {name!r}; there are: "
                                   f"{', '.join(s.name for s in config[0])}") from None
    except InvalidInput as exc:
        _fail(exc)
    click.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False) if as_json else to_text(result))


@main.command()
@click.option("--since", default=None,
              help="Transactions created since: an ISO date/time or a duration (30d). Default: all time.")
@click.option("--schedule", default=None, help="Only this schedule.")
@click.option("--mde", type=click.FloatRange(0.001, 0.5), default=0.05, show_default=True,
              help="Minimum detectable effect, a difference in confirmation rate (0.05 = 5 points).")
@click.option("--alpha", type=click.FloatRange(0.0001, 0.5), default=0.05, show_default=True,
              help="Chance of ever declaring a winner that is not, however often you look.")
@click.option("--json", "as_json", is_flag=True, help="JSON (worker.experiments.report).")
def experiments(since: str | None, schedule: str | None, mde: float, alpha: float, as_json: bool) -> None:
    """A/B variants against the control, valid under daily looks (method: docs/stats.md)."""
    from .experiments import report, to_text

    remind = _remind()
    try:
        data = report(remind.store, since=since, schedule=schedule, schedules=remind.registry, mde=mde, alpha=alpha)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    click.echo(json.dumps(data, indent=2, ensure_ascii=False) if as_json else to_text(data))


@schedules.command("whatif")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--since", default="30d", show_default=True,
              help="Replay transactions created since: a duration back from now (30d) or an ISO date/time.")
@click.option("--schedule", "schedule_name", default=None,
              help="Whose recorded transactions to replay (default: the name in FILE).")
@click.option("--backtest", "with_backtest", is_flag=True,
              help="Also fit on the first half of the period and predict the second half under the schedule "
                   "that ran, with the error.")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON.")
def schedules_whatif(file: Path, since: str, schedule_name: str | None, with_backtest: bool, as_json: bool) -> None:
    """Replay the period's settled transactions under the ladder in FILE: expected messages, SMS segments,
    cost, customer confirmation rate and median time to confirm, beside the current schedule's actual
    figures (model and assumptions: docs/whatif.md)."""
    from .whatif import to_text
    from .whatif_run import load_proposed, pricing_for, run

    remind = _remind()
    try:
        proposed = load_proposed(file, remind)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    try:
        result = run(remind, proposed, since=since, schedule=schedule_name, with_backtest=with_backtest,
                     pricing=pricing_for(remind))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else to_text(result))


@main.group()
def tx() -> None:
    """Transactions."""


def _fail(exc: Exception) -> None:
    if isinstance(exc, InvalidInput):
        lines = [f"  {field}: {msg}" for field, msg in exc.problems.items()]
        raise click.ClickException("invalid transaction:\n" + "\n".join(lines))
    raise click.ClickException(str(exc))


@tx.command("submit")
@click.argument("file", type=click.File("r", encoding="utf-8"))
def tx_submit(file) -> None:
    """Register the transaction(s) in FILE (JSON object or list; - for stdin)."""
    try:
        payload = json.loads(file.read(), parse_float=Decimal)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise click.ClickException(f"not valid JSON: {exc}") from None
    remind = _remind()
    failed = False
    for item in payload if isinstance(payload, list) else [payload]:
        try:
            reg = remind.register(item)
        except (InvalidInput, Conflict) as exc:
            failed = True
            label = str(item.get("id", "?")) if isinstance(item, dict) else "?"
            if isinstance(exc, InvalidInput):
                click.echo(f"{label}: invalid: " + "; ".join(f"{k}: {v}" for k, v in exc.problems.items()), err=True)
            else:
                click.echo(f"{label}: conflict: {exc}", err=True)
            continue
        fallback = f" (no templates for {reg.locale_requested})" if reg.locale_requested is not None else ""
        click.echo(f"{reg.transaction_id}: {'registered' if reg.created else 'already registered'} "
                   f"({reg.status}, schedule {reg.schedule}); messages in {reg.locale}{fallback}")
    sys.exit(1 if failed else 0)


@tx.command("confirm")
@click.argument("tx_id")
def tx_confirm(tx_id: str) -> None:
    """Confirm: no more reminders. Fails when the transaction was cancelled first."""
    try:
        _remind().confirm(tx_id, source="cli")
    except (NotFound, AlreadySettled) as exc:
        _fail(exc)
    click.echo(f"{tx_id}: confirmed")


@tx.command("cancel")
@click.argument("tx_id")
@click.option("--reason", required=True,
              help="Why: customer_request, compliance, risk_declined, or the platform's own code.")
def tx_cancel(tx_id: str, reason: str) -> None:
    """Cancel on the platform's side: no more reminders; the customer is told why."""
    try:
        _remind().cancel(tx_id, reason, source="cli")
    except (NotFound, AlreadySettled, InvalidInput) as exc:
        _fail(exc)
    click.echo(f"{tx_id}: cancelled ({reason})")


@tx.command("show")
@click.argument("tx_id")
@click.option("--json", "as_json", is_flag=True, help="The same JSON as GET /v1/transactions/{id}.")
def tx_show(tx_id: str, as_json: bool) -> None:
    """Status and timeline: every step planned, sent, skipped or failed, and why."""
    from .timeline import to_text

    try:
        view = _remind().show(tx_id)
    except NotFound as exc:
        _fail(exc)
    click.echo(json.dumps(view, indent=2, ensure_ascii=False) if as_json else to_text(view))


@main.group()
def customer() -> None:
    """Customers' personal data."""


@customer.command("erase")
@click.argument("customer_id")
@click.option("--json", "as_json", is_flag=True, help="The same JSON as DELETE /v1/customers/{id}/personal-data.")
def customer_erase(customer_id: str, as_json: bool) -> None:
    """Erase name, phone, email and push tokens from every transaction of CUSTOMER_ID (pending ones are
    cancelled); amounts, statuses and the timeline (masked) stay. Running it again is harmless."""
    try:
        result = _remind().erase_customer(customer_id)
    except InvalidInput as exc:
        raise click.BadParameter(exc.problems["customer_id"], param_hint="CUSTOMER_ID") from None
    if as_json:
        click.echo(json.dumps({"customer_id": customer_id, "transactions": result.transactions,
                               "erased": result.erased, "cancelled": result.cancelled}, indent=2))
        return
    click.echo(f"{customer_id}: no personal data left in {result.transactions} transactions "
               f"({len(result.erased)} erased now)")
    if result.cancelled:
        click.echo(f"cancelled (pending, the customer can no longer be reminded): {', '.join(result.cancelled)}")


@main.group()
def review() -> None:
    """The risk-review queue: escalated transactions, and ops decisions on them."""


@review.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 500))
@click.option("--json", "as_json", is_flag=True, help="The same JSON as GET /v1/reviews.")
def review_list(limit: int, as_json: bool) -> None:
    """Escalated transactions, oldest first, with what was sent and what happened since."""
    found = _remind().reviews(limit=limit)
    if as_json:
        click.echo(json.dumps({"reviews": found}, indent=2, ensure_ascii=False))
        return
    if not found:
        click.echo("nothing to review")
    for r in found:
        state = "customer asked to verify" if r["review_state"] == "contacted" else "waiting"
        click.echo(f"{r['id']}  {r['amount']} {r['currency']} (fee {r['fee']})  customer {r['customer']['id']}  "
                   f"escalated {r['escalated_at']}  {state}")
        for h in r["history"][-3:]:
            who = f" by {h['actor']}" if h["actor"] else ""
            click.echo(f"    {h['at']}  {h['action']} ({h['source']}{who}){': ' + h['note'] if h['note'] else ''}")


def _review_action(action: str, tx_id: str, actor: str, note: str | None, reason: str | None = None) -> None:
    try:
        view = _remind().review(tx_id, action, actor=actor, note=note, reason=reason)
    except (NotFound, AlreadySettled, InvalidInput) as exc:
        _fail(exc)
    done = {"contact": "customer asked to verify", "approve": "confirmed", "decline": "cancelled"}[action]
    click.echo(f"{tx_id}: {done} by {actor} ({view['status']})")


_ACTOR = click.option("--actor", required=True, help="Your name, kept in the audit trail.")
_NOTE = click.option("--note", default=None, help="Why, for the audit trail.")


@review.command("contact")
@click.argument("tx_id")
@_ACTOR
@_NOTE
def review_contact(tx_id: str, actor: str, note: str | None) -> None:
    """Ask the customer to verify the transfer (they can then confirm it by their link)."""
    _review_action("contact", tx_id, actor, note)


@review.command("approve")
@click.argument("tx_id")
@_ACTOR
@_NOTE
def review_approve(tx_id: str, actor: str, note: str | None) -> None:
    """Confirm the transfer after review, and tell the customer."""
    _review_action("approve", tx_id, actor, note)


@review.command("decline")
@click.argument("tx_id")
@_ACTOR
@click.option("--reason", default="risk_declined", show_default=True,
              help="risk_declined, compliance, or another reason code.")
@_NOTE
def review_decline(tx_id: str, actor: str, reason: str, note: str | None) -> None:
    """Cancel the transfer after review, and tell the customer why and how to start again."""
    _review_action("decline", tx_id, actor, note, reason)


@main.group()
def events() -> None:
    """Events to the platform: what was sent, what failed, and sending again."""


@events.command("list")
@click.option("--failed", is_flag=True, help="Only events given up after their retry window.")
@click.option("--since", default=None, help="Written within this long: 1d, 6h, 30m.")
@click.option("--after", default=None, help="Only events after this id (evt_...).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="The same JSON as GET /v1/events.")
def events_list(failed: bool, since: str | None, after: str | None, limit: int, as_json: bool) -> None:
    """Events oldest first, each with its delivery status."""
    from .ladder import parse_duration

    remind = _remind()
    try:
        start = remind.store.clock() - parse_duration(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    try:
        found = remind.events(after=after, limit=limit, failed_only=failed, since=start)
    except InvalidInput as exc:
        raise click.BadParameter(next(iter(exc.problems.values())), param_hint="--after") from None
    if as_json:
        click.echo(json.dumps({"events": found}, indent=2, ensure_ascii=False))
        return
    for e in found:
        d, delivery = e["data"], e["delivery"]
        error = f"  ({delivery['last_error']})" if delivery["last_error"] else ""
        click.echo(f"{e['id']}  {e['created_at']}  {e['type']:<22} {d['id']}  {delivery['status']} after "
                   f"{delivery['attempts']} attempts{error}")


@events.command("resend")
@click.argument("event_ids", nargs=-1)
@click.option("--failed", is_flag=True, help="Every event given up after its retry window.")
def events_resend(event_ids: tuple[str, ...], failed: bool) -> None:
    """Send events again (the same webhook-id: the platform deduplicates), with a new retry window."""
    if bool(event_ids) == failed:
        raise click.UsageError("give event ids, or --failed")
    try:
        sent = _remind().resend_events(list(event_ids) if event_ids else None, failed=failed)
    except (NotFound, InvalidInput, ConfigError) as exc:
        raise click.ClickException(str(exc) if not isinstance(exc, InvalidInput)
                                   else next(iter(exc.problems.values()))) from None
    click.echo(f"{len(sent)} events to send again: {', '.join(sent) or 'none'}")


@main.command()
@click.option("--since", default=None, help="Transactions created since: an ISO date/time or a duration such as "
              "30d (default: the last 7 days).")
@click.option("--schedule", default=None, help="Only this schedule.")
@click.option("--json", "as_json", is_flag=True, help="The same JSON as GET /v1/stats (funnel, costs, experiments).")
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True,
              help="csv/json: the export, one row per schedule, step, variant and segment, with costs "
                   "(the CSV of GET /v1/stats.csv).")
def stats(since: str | None, schedule: str | None, as_json: bool, fmt: str) -> None:
    """The confirmation funnel per schedule, step and variant, with costs and the variant comparison
    (definitions: docs/stats.md)."""
    from .stats import report, to_text

    if fmt != "text":
        if as_json:
            raise click.UsageError("--json is the funnel as GET /v1/stats; --format csv|json is the export: "
                                   "use one of them")
        from .export import export, to_csv

        remind = _remind()
        try:
            rows = export(remind.store, remind.pricing, since=since, schedule=schedule)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
        click.echo(to_csv(rows) if fmt == "csv" else json.dumps(rows, indent=2, ensure_ascii=False), nl=fmt != "csv")
        return
    remind = _remind()
    # Without a price table the costs are null, and the text says so: no log line in the middle of --json.
    pricing = remind.pricing if remind.settings.pricing_file.exists() else None
    try:
        data = report(remind.store, pricing, schedules=remind.registry, since=since, schedule=schedule)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    click.echo(json.dumps(data, indent=2, ensure_ascii=False) if as_json else to_text(data))


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["main", "Path"]
