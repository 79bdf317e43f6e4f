#!/usr/bin/env python
"""The web process at scale, on PostgreSQL: /metrics, /ops and /v1/stats over 1M transactions and 5M deliveries.

    .venv/bin/python bench/scale.py                 # build bench_scale (a few minutes), then measure
    .venv/bin/python bench/scale.py --reuse         # measure again on the database a previous run built
    .venv/bin/python bench/scale.py --small         # 20,000 transactions / ~100,000 deliveries
    .venv/bin/python bench/scale.py --reuse --code /tmp/main-src --schema 0005   # another tree's code (a baseline)

The database (``--db-name``, default ``bench_scale``) is built once with ``INSERT … SELECT generate_series``
and kept; ``--reuse`` skips the build when it holds the expected number of transactions. Transactions are
spread evenly over the ``--days`` (60) days before now: 70 % ``default``, 20 % ``new_customer``, 10 %
``risk_review``; 68 % confirm at a time drawn from a skewed distribution (most within the first hours),
the others are cancelled (escalated on ``risk_review``) at the deadline, and those of the last day are
still pending. Deliveries follow each schedule's ladder up to the confirmation or the deadline (the notice
and the platform webhook after a cancel): sent, delivered, a few failed and skipped, the reminders of the
last minutes queued. 300,000 suppressions. Then ``VACUUM ANALYZE``.

Measured against the real web app: ``remind web`` (uvicorn, one process) started as a subprocess on the
database, from this tree or from ``--code DIR`` (``PYTHONPATH``), after ``remind db upgrade`` (timed) or
the alembic revision ``--schema``, and its ``remind db rollup`` where it has one (timed: the funnel's
roll-up of every settled transaction, which the scheduler's tick would build a step at a time). Then:
``/metrics`` ``--scrapes`` times (p50/p95, after one warm-up),
``/ops`` and ``/v1/stats`` with ``since=7d``, ``/ops`` with no ``since`` (the default window), and with
``--all-time`` also ``/v1/stats`` since the first transaction; the web process's peak RSS (``VmHWM``) at
the end; then ``/v1/experiments?since=7d`` and the peak RSS after it; then, in a second web process with
the tree's ``pricing.yaml`` (what a deployment started from the checkout reads; ``--no-priced`` skips it),
``/ops`` and ``/v1/stats`` with ``since=7d`` again (``ops_7d_priced_ms``, ``stats_7d_priced_ms``: the cost
figures read the window's rolled-up cost units, and the customer messages of the rest). In a child process
on the same code: the ``EXPLAIN (ANALYZE, BUFFERS)`` of the suppression
lookup (``Store.suppressed`` of 200 addresses, 20 of them suppressed, statements captured as sent), of
the stats queries (``funnel(since=7d)``) and of the cost figures' (``cost_figures(since=7d)``, priced: the
roll-up's ``cost_units`` for settled transactions, the deliveries of the rest). The last line is
``key=value`` figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _harness import PG_HOST, _admin, log, percentile, vm_hwm_mb  # noqa: E402

#: The schema the data is loaded into (the last revision before the scale indexes).
BUILD_SCHEMA = "0005"
OPS_TOKEN = "bench-ops-" + uuid.uuid4().hex
METRICS_TOKEN = "bench-metrics-" + uuid.uuid4().hex

# The shipped ladders (schedules/*.yaml): schedule, step, kind, channel, seconds after created_at.
LADDER = [
    ("default", "nudge", "reminder", ["push"], 900),
    ("default", "reminder", "reminder", ["sms", "push"], 7200),
    ("default", "final_warning", "reminder", ["sms", "email", "push"], 72000),
    ("default", "cancel", "notice", ["sms", "email", "push"], 86400),
    ("default", "cancel", "webhook", ["webhook"], 86400),
    ("new_customer", "nudge", "reminder", ["push"], 300),
    ("new_customer", "guide", "reminder", ["email", "push"], 1800),
    ("new_customer", "reminder", "reminder", ["sms", "push"], 14400),
    ("new_customer", "final_warning", "reminder", ["sms", "email", "push"], 72000),
    ("new_customer", "cancel", "notice", ["sms", "email", "push"], 86400),
    ("new_customer", "cancel", "webhook", ["webhook"], 86400),
    ("risk_review", "verify", "reminder", ["sms", "push"], 300),
    ("risk_review", "verify_again", "reminder", ["sms", "email", "push"], 3600),
    ("risk_review", "final_warning", "reminder", ["sms", "email", "push"], 21600),
    ("risk_review", "escalate", "notice", ["sms", "email"], 28800),
    ("risk_review", "escalate", "webhook", ["webhook"], 28800),
]


def build_sql(tx_count: int, days: int, suppressions: int) -> list[str]:
    """The statements that fill an empty schema. ``now()`` is the database's clock at build time."""
    ladder = ", ".join(f"('{s}', '{st}', '{k}', '{c}', {a})" for s, st, k, chans, a in LADDER for c in chans)
    span = days * 86400
    return [
        "CREATE TEMP TABLE ladder(schedule text, step text, kind text, channel text, after_s int)",
        f"INSERT INTO ladder VALUES {ladder}",
        # i = 1 is the newest; r1 decides the schedule, r2 whether and when the customer confirms.
        f"""
        CREATE TEMP TABLE g AS
        SELECT i, now() - make_interval(secs => (i - 1) * {span}.0 / {tx_count}) AS created_at,
               CASE WHEN i % 10 < 7 THEN 'default' WHEN i % 10 < 9 THEN 'new_customer' ELSE 'risk_review' END
                   AS schedule,
               ((i::bigint * 2654435761) % 1000) / 1000.0 AS r1,
               ((i::bigint * 40503) % 10007) / 10007.0 AS r2
        FROM generate_series(1, {tx_count}) AS i""",
        """
        CREATE TEMP TABLE t AS
        SELECT i, created_at, schedule,
               created_at + CASE schedule WHEN 'risk_review' THEN interval '8 hours' ELSE interval '24 hours' END
                   AS deadline,
               CASE WHEN r1 < 0.68 THEN created_at + make_interval(secs => 60 + r2 * r2 * 60000) END AS confirm_at
        FROM g""",
        """
        INSERT INTO transactions (id, status, content, customer_id, segment, risk_flag, amount, currency, schedule,
                                  schedule_version, created_at, expires_at, deadline, registered_at, handled_until,
                                  next_due_at, confirmed_at, cancelled_at, escalated_at, status_reason)
        SELECT 'tx_scale_' || lpad(i::text, 8, '0'),
               CASE WHEN confirm_at <= now() THEN 'confirmed'
                    WHEN deadline <= now() THEN CASE schedule WHEN 'risk_review' THEN 'escalated' ELSE 'cancelled' END
                    ELSE 'pending' END,
               json_build_object('id', 'tx_scale_' || lpad(i::text, 8, '0'), 'amount', '100.00', 'currency', 'USD',
                                 'customer', json_build_object('id', 'c_scale_' || i, 'locale', 'en')),
               'c_scale_' || i, CASE schedule WHEN 'new_customer' THEN 'new' ELSE 'returning' END,
               schedule = 'risk_review', 100.00, 'USD', schedule, 'bench', created_at, NULL, deadline, created_at,
               NULL,
               CASE WHEN (confirm_at IS NULL OR confirm_at > now()) AND deadline > now()
                    THEN greatest(now(), created_at + interval '15 minutes') END,
               CASE WHEN confirm_at <= now() THEN confirm_at END,
               CASE WHEN confirm_at IS NULL OR confirm_at > deadline THEN
                    CASE WHEN deadline <= now() AND schedule <> 'risk_review' THEN deadline END END,
               CASE WHEN confirm_at IS NULL OR confirm_at > deadline THEN
                    CASE WHEN deadline <= now() AND schedule = 'risk_review' THEN deadline END END,
               NULL
        FROM t""",
        # confirmations after the deadline did not happen: those transactions were settled first
        """UPDATE transactions SET status = 'cancelled', confirmed_at = NULL, cancelled_at = deadline
           WHERE status = 'confirmed' AND confirmed_at > deadline AND schedule <> 'risk_review'""",
        """UPDATE transactions SET status = 'escalated', confirmed_at = NULL, escalated_at = deadline
           WHERE status = 'confirmed' AND confirmed_at > deadline AND schedule = 'risk_review'""",
        # every ladder row due before the transaction's end (its confirmation, else its deadline, else now)
        """
        INSERT INTO deliveries (transaction_id, step, kind, channel, template, variant, due_at, status, reason,
                                attempts, lease_until, enqueued_at, started_at, sent_at, updated_at, provider_id,
                                segments)
        SELECT tx.id, l.step, l.kind, l.channel, CASE WHEN l.kind = 'webhook' THEN NULL ELSE l.step END, 'default',
               due, st, CASE st WHEN 'failed' THEN 'provider refused' WHEN 'skipped' THEN 'no contact' END,
               CASE WHEN st = 'skipped' THEN 0 WHEN h % 50 = 0 THEN 2 + h % 3 ELSE 1 END,
               CASE WHEN st IN ('queued', 'sending') THEN now() + interval '5 minutes' END,
               due,
               CASE WHEN st <> 'skipped' AND st <> 'queued' THEN due + interval '1 second' END,
               CASE WHEN st IN ('sent', 'delivered') THEN due + make_interval(secs => 1.2 + (h % 7) / 10.0) END,
               due + interval '3 seconds', NULL,
               CASE WHEN l.channel = 'sms' AND st IN ('sent', 'delivered') THEN 1 + (h % 5 = 0)::int END
        FROM transactions AS tx
        JOIN ladder AS l ON l.schedule = tx.schedule
        CROSS JOIN LATERAL (SELECT tx.created_at + make_interval(secs => l.after_s) AS due,
                                   abs(hashtext(tx.id || l.step || l.channel)) AS h) AS x
        CROSS JOIN LATERAL (SELECT CASE WHEN due > now() - interval '2 minutes' THEN 'queued'
                                        WHEN h % 100 < 2 THEN 'skipped' WHEN h % 100 < 5 THEN 'failed'
                                        WHEN h % 100 < 40 AND l.channel <> 'webhook' THEN 'delivered'
                                        ELSE 'sent' END AS st) AS s
        WHERE due <= now()
          AND (l.kind = 'reminder' AND due < coalesce(tx.confirmed_at, tx.deadline)
               OR l.kind <> 'reminder' AND tx.status IN ('cancelled', 'escalated'))
        ORDER BY due""",
        f"""
        INSERT INTO suppressions (channel, address_hash, customer_id, reason, created_at)
        SELECT ch, encode(sha256(convert_to(ch || ':bench-address-' || i, 'UTF8')), 'hex'), 'c_scale_' || i,
               'bench', now()
        FROM generate_series(1, {suppressions}) AS i,
             LATERAL (SELECT (ARRAY['sms', 'email', 'push'])[1 + i % 3] AS ch) AS c""",
    ]


def cpu_busy(seconds: float = 1.0) -> float:
    """The share of all cores busy over ``seconds`` (from /proc/stat)."""
    from _harness import machine_cpu

    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / max(total1 - total0, 1e-9)


def suppressed_address(i: int) -> tuple[str, str]:
    """The (channel, address) of the i-th suppression the build wrote."""
    return ("sms", "email", "push")[i % 3], f"bench-address-{i}"


# -- the database -----------------------------------------------------------------------------------------

def db_url(name: str) -> str:
    return f"postgresql://{PG_HOST}/{name}"


def existing_count(name: str) -> int | None:
    import psycopg

    with _admin() as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            return None
    try:
        with psycopg.connect(db_url(name)) as conn:
            return conn.execute("SELECT count(*) FROM transactions").fetchone()[0]
    except psycopg.Error:
        return None


def build(args) -> None:
    import psycopg
    from sqlalchemy import create_engine

    from worker.store.migrate import upgrade

    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{args.db_name}"')
    engine = create_engine("postgresql+psycopg://" + db_url(args.db_name).split("://", 1)[1])
    upgrade(engine, BUILD_SCHEMA)  # loaded before the newer indexes exist; migrate() then builds them, timed
    engine.dispose()
    started = time.perf_counter()
    with psycopg.connect(db_url(args.db_name), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET work_mem = '256MB'")
        for statement in build_sql(args.transactions, args.days, args.suppressions):
            t0 = time.perf_counter()
            cur = conn.execute(statement)
            log(f"  {statement.split()[0]} {statement.split()[2] if len(statement.split()) > 2 else ''}: "
                f"{cur.rowcount} rows, {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        log(f"  VACUUM ANALYZE: {time.perf_counter() - t0:.1f}s")
    log(f"built {args.db_name} in {time.perf_counter() - started:.0f}s")


def migrate(args, env: dict[str, str]) -> float:
    """Bring the database to ``--schema`` with this tree's migrations (down or up); the seconds it took."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from worker.store.migrate import MIGRATIONS

    engine = create_engine("postgresql+psycopg://" + db_url(args.db_name).split("://", 1)[1])
    with engine.connect() as conn:
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    t0 = time.perf_counter()
    if args.schema != "head" and current is not None and current > args.schema:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, args.schema)
            conn.commit()
        log(f"downgraded {current} -> {args.schema}")
    else:  # the measured code's own `remind db upgrade`
        out = subprocess.run([*remind_cmd(), "db", "upgrade"], env=env, capture_output=True, text=True,
                             cwd=tempfile.gettempdir())  # not this tree: `python -c` puts the cwd first on sys.path
        if out.returncode:
            raise SystemExit(f"remind db upgrade failed: {out.stdout}{out.stderr}")
    engine.dispose()
    return time.perf_counter() - t0


def rollup(env: dict[str, str]) -> float | None:
    """The measured code's ``remind db rollup`` (the funnel's roll-up of every settled transaction, which its
    scheduler would otherwise build a step per tick); the seconds it took, or None for code without one."""
    t0 = time.perf_counter()
    out = subprocess.run([*remind_cmd(), "db", "rollup"], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if out.returncode and "No such command" in out.stderr:
        return None
    if out.returncode:
        raise SystemExit(f"remind db rollup failed: {out.stdout}{out.stderr}")
    log(out.stdout.strip())
    return time.perf_counter() - t0


# -- the web process --------------------------------------------------------------------------------------

def remind_cmd() -> list[str]:
    return [sys.executable, "-c", "from worker.cli import main; main()"]


def code_root(args) -> Path:
    """The tree whose code is measured."""
    return Path(args.code) if args.code else ROOT


def web_env(args, port: int) -> dict[str, str]:
    code = code_root(args)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMIND_", "DATABASE_URL", "REDIS_URL"))}
    env.update({
        "PYTHONPATH": str(code), "DATABASE_URL": db_url(args.db_name),
        "REMIND_SCHEDULES_DIR": str(code / "schedules"), "REMIND_TEMPLATES_DIR": str(code / "templates"),
        "REMIND_SECRET_KEY": "bench-" + uuid.uuid4().hex + uuid.uuid4().hex, "REMIND_PUBLIC_URL": "https://pay.example",
        "REMIND_DEV_SENDER": "outbox", "REMIND_OUTBOX": str(Path(tempfile.gettempdir()) / "scale-outbox.jsonl"),
        "REMIND_OPS_TOKEN": OPS_TOKEN, "REMIND_METRICS_TOKEN": METRICS_TOKEN, "REMIND_API_TOKEN": "bench-platform",
        "REMIND_HOST": "127.0.0.1", "PORT": str(port), "REMIND_RELOAD_SECONDS": "0", "PYTHONUNBUFFERED": "1",
    })
    return env


def stop_web(proc: subprocess.Popen, tmp: Path) -> None:
    """Stop a web process ``start_web`` started, and remove its folder."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def start_web(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    import httpx

    handle = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen([*remind_cmd(), "web"], env=env, cwd=log_path.parent, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{env['PORT']}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"remind web exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("remind web did not answer /healthz within 120s")
        time.sleep(0.2)


def timed_get(client, path: str, token: str) -> tuple[float, int | str, int]:
    """(milliseconds, HTTP status or "timeout", body bytes)."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = client.get(path, headers={"Authorization": f"Bearer {token}"})
    except httpx.TimeoutException:
        return (time.perf_counter() - t0) * 1000, "timeout", 0
    return (time.perf_counter() - t0) * 1000, r.status_code, len(r.content)


# -- plans ------------------------------------------------------------------------------------------------

_PLANS = r'''
import json, sys
from datetime import UTC, datetime, timedelta
from sqlalchemy import event, text
from worker.store import Store, make_engine
from worker.store.export import cost_figures
from worker.stats import funnel

url, pairs = sys.argv[1], json.loads(sys.argv[2])
engine = make_engine(url)
store = Store(engine)
seen = []

@event.listens_for(engine, "before_cursor_execute")
def grab(conn, cursor, statement, parameters, context, many):
    if statement.lstrip().upper().startswith(("SELECT", "WITH")):  # what EXPLAIN can plan
        seen.append((statement, parameters))

def explain(label, call, *settings):
    seen.clear()
    call()
    out = []
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        for statement, parameters in list(seen):
            cur = raw.cursor()
            for setting in ("work_mem = '64MB'", "jit = off", *settings):  # as the statement's caller sets them
                cur.execute("SET " + setting)
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            out.append("\n".join(row[0] for row in cur.fetchall()))
            raw.rollback()
    return {"label": label, "statements": [s for s, _ in seen], "plans": out}

def lookup():
    with engine.connect() as conn:
        return store.suppressed(conn, [tuple(p) for p in pairs])

found = lookup()
since = datetime.now(UTC) - timedelta(days=7)
result = [explain("suppression lookup", lookup),
          explain("stats, since=7d", lambda: funnel(store, since="7d")),
          explain("costs, since=7d", lambda: cost_figures(store, since=since), "random_page_cost = 1.1")]
print(json.dumps({"found": len(found), "explains": result}))
'''


def plans(args, env: dict[str, str]) -> dict:
    pairs = [suppressed_address(i) for i in range(1, 21)] + [("sms", f"+1555{i:07d}") for i in range(180)]
    out = subprocess.run([sys.executable, "-c", _PLANS, db_url(args.db_name).replace("postgresql://",
                                                                                      "postgresql+psycopg://"),
                          json.dumps(pairs)], env=env, capture_output=True, text=True, timeout=900,
                         cwd=tempfile.gettempdir())
    if out.returncode:
        raise SystemExit(f"the plans failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main -------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="20,000 transactions (~100,000 deliveries)")
    parser.add_argument("--transactions", type=int, help="transactions (default 1,000,000; about 5 deliveries each)")
    parser.add_argument("--days", type=int, default=60, help="the transactions are spread over this many days (60)")
    parser.add_argument("--suppressions", type=int, default=300_000, help="suppressed addresses (300,000)")
    parser.add_argument("--db-name", default="bench_scale", help="the database, kept between runs (bench_scale)")
    parser.add_argument("--reuse", action="store_true", help="measure on the database a previous run built")
    parser.add_argument("--no-priced", action="store_true", help="skip /ops and /v1/stats with the shipped "
                        "pricing.yaml (ops_7d_priced_ms, stats_7d_priced_ms)")
    parser.add_argument("--code", help="run the web app from this source tree (PYTHONPATH), e.g. a baseline")
    parser.add_argument("--schema", default="head", help="alembic revision to measure at (head; 0005: before 0007)")
    parser.add_argument("--scrapes", type=int, default=20, help="timed /metrics scrapes (20)")
    parser.add_argument("--all-time", action="store_true", help="also /v1/stats since the first transaction")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one request may take (900)")
    parser.add_argument("--no-default", action="store_true", help="skip /ops with no since (all time before 0007)")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end (kept by default)")
    args = parser.parse_args()
    args.transactions = args.transactions or (20_000 if args.small else 1_000_000)
    if args.small:
        args.suppressions = min(args.suppressions, 20_000)
    wall = time.perf_counter()
    figures: dict[str, object] = {}

    count = existing_count(args.db_name)
    if args.reuse and count == args.transactions:
        log(f"reusing {args.db_name}: {count:,} transactions")
    else:
        if args.reuse:
            log(f"--reuse: {args.db_name} holds {count} transactions, not {args.transactions:,}: building it")
        log(f"building {args.db_name}: {args.transactions:,} transactions over {args.days} days")
        build(args)
    import psycopg

    with psycopg.connect(db_url(args.db_name)) as conn:
        tx_n = conn.execute("SELECT count(*) FROM transactions").fetchone()[0]
        dl_n = conn.execute("SELECT count(*) FROM deliveries").fetchone()[0]
        by_status = conn.execute("SELECT status, count(*) FROM transactions GROUP BY 1 ORDER BY 1").fetchall()
    log(f"{tx_n:,} transactions ({', '.join(f'{s} {n:,}' for s, n in by_status)}), {dl_n:,} deliveries")

    # How busy the machine is: the CPU share other processes used over a second, and a fixed piece of
    # server work (about 0.4 s on an idle core of the machine this was written on); figures scale with it.
    busy = cpu_busy()
    with psycopg.connect(db_url(args.db_name)) as conn:
        t0 = time.perf_counter()
        conn.execute("SELECT count(*) FROM generate_series(1, 5000000)").fetchone()
        calibration_ms = (time.perf_counter() - t0) * 1000
    log(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, {100 * busy:.0f}% busy; "
        f"calibration (count of 5M generate_series) {calibration_ms:.0f} ms")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = web_env(args, port)
    figures["migrate_s"] = f"{migrate(args, env):.1f}"
    rolled = rollup(env)
    if rolled is not None:
        figures["rollup_s"] = f"{rolled:.1f}"
    tmp = Path(tempfile.mkdtemp(prefix="remind-scale-"))
    proc = start_web(env, tmp / "web.log")
    import httpx

    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=args.timeout) as client:
            ms, status, size = timed_get(client, "/metrics", METRICS_TOKEN)
            log(f"/metrics warm-up: {ms:.0f} ms, HTTP {status}, {size} bytes")
            times = []
            for _ in range(args.scrapes):
                ms, status, _size = timed_get(client, "/metrics", METRICS_TOKEN)
                assert status == 200, status
                times.append(ms)
            body = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
            log("/metrics: " + ", ".join(f"{t:.0f}" for t in times) + " ms")
            log("\n".join(line for line in body.splitlines() if line.startswith("remind_") and "{" in line
                          and ("transactions" in line or "due" in line or "lag" in line))[:2000])
            figures["metrics_p50_ms"] = f"{statistics.median(times):.1f}"
            figures["metrics_p95_ms"] = f"{percentile(times, 95):.1f}"
            for key, path in (("ops_7d_ms", "/ops?since=7d"), ("stats_7d_ms", "/v1/stats?since=7d"),
                              ("ops_default_ms", "/ops")):
                if key == "ops_default_ms":  # before this work, /ops' default was all time
                    if args.no_default:
                        break
                    figures["web_rss_7d_mb"] = f"{vm_hwm_mb(proc.pid):.0f}"
                    stats = client.get("/v1/stats?since=7d", headers={"Authorization": f"Bearer {OPS_TOKEN}"}).json()
                    figures["stats_7d_transactions"] = sum(s["transactions"] for s in stats["schedules"])
                ms, status, size = timed_get(client, path, OPS_TOKEN)
                log(f"{path}: {ms:.0f} ms, HTTP {status}, {size:,} bytes, web RSS peak so far "
                    f"{vm_hwm_mb(proc.pid):.0f} MB")
                figures[key] = f"{ms:.0f}" if status == 200 else f"{status}_after_{ms:.0f}"
            if args.all_time:
                ms, status, size = timed_get(client, "/v1/stats?since=2000-01-01", OPS_TOKEN)
                log(f"/v1/stats since 2000-01-01: {ms:.0f} ms, HTTP {status}, {size:,} bytes")
                figures["stats_all_ms"] = f"{ms:.0f}" if status == 200 else f"{status}_after_{ms:.0f}"
        figures["web_rss_mb"] = f"{vm_hwm_mb(proc.pid):.0f}"
        # -- the variant comparison (worker/experiments.py; issue #13), after web_rss_mb so that figure keeps
        # its meaning: the statement /ops runs for schedules with variants, over every schedule here
        with httpx.Client(base_url=base, timeout=args.timeout) as client:
            ms, status, size = timed_get(client, "/v1/experiments?since=7d", OPS_TOKEN)
        figures["experiments_7d_ms"] = f"{ms:.0f}" if status == 200 else f"{status}_after_{ms:.0f}"
        figures["web_rss_experiments_mb"] = f"{vm_hwm_mb(proc.pid):.0f}"
        log(f"/v1/experiments?since=7d: {ms:.0f} ms, HTTP {status}, {size:,} bytes, web RSS peak "
            f"{figures['web_rss_experiments_mb']} MB")
    finally:
        stop_web(proc, tmp)

    # -- the same pages with the shipped price table (a deployment started from the checkout reads
    # pricing.yaml): the cost statement reads every customer message of the window (issue #13)
    priced = code_root(args) / "pricing.yaml"
    if priced.exists() and not args.no_priced:
        tmp = Path(tempfile.mkdtemp(prefix="remind-scale-priced-"))
        proc = start_web({**env, "REMIND_PRICING_FILE": str(priced)}, tmp / "web.log")
        try:
            with httpx.Client(base_url=base, timeout=args.timeout) as client:
                for key, path in (("ops_7d_priced_ms", "/ops?since=7d"), ("stats_7d_priced_ms", "/v1/stats?since=7d")):
                    ms, status, size = timed_get(client, path, OPS_TOKEN)
                    log(f"{path} with {priced.name}: {ms:.0f} ms, HTTP {status}, {size:,} bytes")
                    figures[key] = f"{ms:.0f}" if status == 200 else f"{status}_after_{ms:.0f}"
            figures["web_rss_priced_mb"] = f"{vm_hwm_mb(proc.pid):.0f}"
        finally:
            stop_web(proc, tmp)

    explained = plans(args, env)
    uses_index = False
    for item in explained["explains"]:
        log(f"\n== EXPLAIN (ANALYZE, BUFFERS): {item['label']} ==")
        for statement, plan in zip(item["statements"], item["plans"], strict=True):
            log(" ".join(statement.split())[:600])
            log("\n".join(line if len(line) < 400 else line[:400] + " …" for line in plan.splitlines()))
            if item["label"] == "suppression lookup":
                uses_index = "suppressions_pkey" in plan and "Seq Scan on suppressions" not in plan
    figures["suppression_index"] = "yes" if uses_index else "no"
    figures["suppressions_found"] = explained["found"]
    figures["transactions"] = tx_n
    figures["deliveries"] = dl_n
    figures["code"] = "tree" if not args.code else Path(args.code).name
    figures["wall_s"] = f"{time.perf_counter() - wall:.0f}"
    figures["cpu_busy_before_pct"] = f"{100 * busy:.0f}"
    figures["calibration_ms"] = f"{calibration_ms:.0f}"
    if args.drop:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')
    print("scale: " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
