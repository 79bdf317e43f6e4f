"""Burst: every transaction's first reminder falls due in the same second (as when quiet hours end at 08:00),
the providers answering after ~200 ms. How long until the last message is accepted, and how late each is.

    .venv/bin/python bench/burst.py            # 6,667 transactions -> 20,000 deliveries (sms + email + push each)
    .venv/bin/python bench/burst.py --small    # 200 transactions -> 600 deliveries, about a minute
    .venv/bin/python bench/burst.py --latency 0.2 --send-concurrency 256 --inflight-sms 100 --processes 2

Redis is a redis-server of the benchmark's own on a free port unless ``--shared-redis``; PostgreSQL a
throw-away database ``remind_bench_burst``; a fresh Redis namespace. The schedules folder is a temp dir holding
one schedule, ``burst`` (matches everyone, no quiet hours): its first step, 10 minutes after ``created_at``,
sends sms + email + push with the ``reminder`` templates; a final warning at 20 h and the cancel at 24 h never
come due during the run. The templates are the repo's.

1. Due time: ``T`` = now + the measured registration time (from 50 warm-up registrations, then removed) x 1.3
   + ``--margin`` seconds, rounded to a whole second. ``N`` transactions are registered through the real
   ``Remind.register`` with ``created_at = T - 10 min``: their first step is due at exactly ``T``. Customers
   alternate zh-CN/CNY and en/USD, one phone, one email and one push token each.
2. Then ``remind scheduler`` (REMIND_TICK_SECONDS=``--tick``) and ``remind worker --processes P --threads T``
   start, the senders pointed at the Twilio, SendGrid and FCM fakes (tests/fakes, each in its own process),
   which answer every valid send after uniform ``--latency`` seconds (default 0.1-0.3) and record the most
   requests they held at once. The run stops with an error if the processes are not ready before ``T``.
3. From ``T`` on, this process polls PostgreSQL every 0.25 s until all ``3 N`` deliveries exist and none is
   queued or sending (no progress for ``--stall`` seconds is an error).

Printed, from the ``deliveries`` table: the drain time (the last ``sent_at``, the worker recording the
provider's acceptance, minus ``T``), deliveries/s over it (``sent / drain``), lateness (``sent_at -
due_at``) p50 / p99 / max, split into the scheduler's part (``enqueued_at - due_at``), the queue's
(``started_at - enqueued_at``) and the send's (``sent_at - started_at``); the most requests each fake held
at once beside the configured limit (REMIND_INFLIGHT_SMS / _EMAIL / _PUSH, shared by all worker processes);
the cores each part used between ``T`` and the end; peak RSS. The worker's send settings come from
``--send-concurrency`` (REMIND_SEND_CONCURRENCY) and ``--inflight-sms/-email/-push``. Every delivery must
end ``sent``: failed or skipped ones are counted and printed, never dropped from the figures silently. The
last line is ``burst: key=value ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

DB_NAME = "remind_bench_burst"
FIRST_STEP = timedelta(minutes=10)
SCHEDULE = """\
# bench/burst.py: the first step sends on every channel; nothing else comes due during the run.
name: burst
description: every channel at the first step (a benchmark's schedule)
match: {}
priority: 100
steps:
  - after: 10m
    channels: [sms, email, push]
    template: reminder
  - after: 20h
    channels: [sms, email, push]
    template: final_warning
cancel:
  after: 24h
  template: cancelled
  reason: not_confirmed
  channels: [sms, email, push]
"""
CHANNELS = 3


def wait_for(path: Path, text: str, count: int, deadline: float, proc) -> None:
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}; see {path}")
        time.sleep(0.1)
    raise RuntimeError(f"no {count} x {text!r} in {path} in time (before the burst was due)")


def log_errors(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if " ERROR " in line or "Traceback" in line)


def main() -> int:
    parser = argparse.ArgumentParser(description="Every transaction's first step due in the same second.")
    parser.add_argument("--small", action="store_true", help="200 transactions (600 deliveries), about a minute")
    parser.add_argument("--deliveries", type=int, default=None,
                        help="deliveries in the burst, 3 per transaction (default 20000, --small 600)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=h.WORKER_THREADS,
                        help=f"threads per worker process (default {h.WORKER_THREADS}, the service's)")
    parser.add_argument("--tick", type=float, default=1.0, help="REMIND_TICK_SECONDS of the scheduler (default 1)")
    h.add_provider_flags(parser)
    parser.add_argument("--margin", type=float, default=15.0,
                        help="seconds between the end of the registrations (as estimated) and the due time, for "
                             "the scheduler and workers to start (default 15)")
    parser.add_argument("--stall", type=float, default=120.0, help="give up after this long without progress")
    parser.add_argument("--out", type=Path, default=None, help="keep the processes' logs here")
    h.add_shared_redis_flag(parser)
    args = parser.parse_args()
    deliveries = args.deliveries or (600 if args.small else 20000)
    n_tx = math.ceil(deliveries / CHANNELS)
    expected = n_tx * CHANNELS
    limits = {name: getattr(args, flag) for name, flag in h.LIMIT_FLAG.items()}
    workdir = args.out or Path(tempfile.mkdtemp(prefix="remind-bench-burst-"))
    workdir.mkdir(parents=True, exist_ok=True)
    schedules = workdir / "schedules"
    schedules.mkdir(exist_ok=True)
    (schedules / "burst.yaml").write_text(SCHEDULE)

    busy_before = h.busy_before()
    calibration = h.calibration_ms()
    wall0 = time.monotonic()
    private = None if args.shared_redis else h.PrivateRedis(workdir)
    if private is not None:
        private.start()
    h.log(f"[setup] database {DB_NAME}, redis {h.REDIS_URL}, fakes at {h.format_latency(args.latency)} s, "
          f"logs in {workdir}")
    database_url = h.create_database(DB_NAME)
    fakes = h.Fakes(workdir, args.latency).start()
    namespace = h.new_namespace("remind-bench-burst")
    procs: dict = {}
    fig: dict = {}
    try:
        import psycopg
        from sqlalchemy import text

        from worker.service import Remind

        env = h.remind_env(database_url, namespace, workdir, fakes.env(), REMIND_SCHEDULES_DIR=str(schedules),
                           REMIND_TICK_SECONDS=f"{args.tick:g}", REMIND_WORKER_THREADS=str(args.threads),
                           **h.provider_settings(args))
        remind = Remind.from_settings(h.settings_from_env(env), migrate=True)
        assert [s.name for s in remind.registry] == ["burst"], "the burst schedule did not load"
        zones = h.daytime_zones(datetime.now(UTC))

        # 1. the due time, from the measured cost of a registration; then the registrations
        warm = 50
        t0 = time.monotonic()
        for i in range(warm):
            remind.register(h.transaction(i, "warm" + os.urandom(3).hex(), created_at=None, zones=zones))
        per_tx = (time.monotonic() - t0) / warm
        h.truncate(remind.store.engine)
        due = (datetime.now(UTC) + timedelta(seconds=per_tx * n_tx * 1.3 + args.margin)).replace(microsecond=0) \
            + timedelta(seconds=1)
        created = due - FIRST_STEP
        h.log(f"[register] {n_tx} transactions ({per_tx * 1000:.1f} ms each when warming up), first step due at "
              f"{due:%H:%M:%S} UTC, in {(due - datetime.now(UTC)).total_seconds():.0f}s")
        run = os.urandom(3).hex()
        t0 = time.monotonic()
        for i in range(n_tx):
            remind.register(h.transaction(i, run, created_at=created, zones=zones))
        fig["register_s"] = time.monotonic() - t0
        engine = remind.store.engine
        with engine.connect() as conn:
            due_rows = conn.execute(text("SELECT count(*), min(next_due_at), max(next_due_at) FROM transactions "
                                         "WHERE status = 'pending'")).one()
        engine.dispose()
        if due_rows[0] != n_tx or due_rows[1] != due or due_rows[2] != due:
            raise RuntimeError(f"expected {n_tx} pending transactions all due at {due}, found {tuple(due_rows)}")

        # 2. the processes, ready before the due time
        left = (due - datetime.now(UTC)).total_seconds()
        deadline = time.monotonic() + left
        procs["worker"] = h.launch([str(h.BIN / "remind"), "worker", "--processes", str(args.processes),
                                    "--threads", str(args.threads)], env, workdir / "worker.log")
        procs["scheduler"] = h.launch([str(h.BIN / "remind"), "scheduler"], env, workdir / "scheduler.log")
        wait_for(workdir / "worker.log", "worker ready", args.processes, deadline, procs["worker"])
        wait_for(workdir / "scheduler.log", "scheduler ticking", 1, deadline, procs["scheduler"])
        left = (due - datetime.now(UTC)).total_seconds()
        if left <= 0:
            raise RuntimeError("the scheduler and workers were ready only after the burst was due; rerun with a "
                               "larger --margin")
        h.log(f"[burst] scheduler (tick {args.tick:g}s) and {args.processes} x {args.threads} workers ready "
              f"{left:.1f}s before the due time")
        time.sleep(left)

        # 3. from the due time until every delivery is sent (or has failed)
        pg = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)

        def groups() -> dict[str, list[int]]:
            return {"workers": [procs["worker"].pid, *h.descendants(procs["worker"].pid)],
                    "scheduler": [procs["scheduler"].pid], "fakes": fakes.pids,
                    "postgres": h.postgres_pids(DB_NAME), "redis": h.redis_pids(), "bench": [os.getpid()]}

        meter = h.CpuMeter()
        meter.start = meter.snapshot(groups())
        last_change, last_done, peak_backlog = time.monotonic(), -1, 0
        while True:
            total, done, busy = pg.execute(
                "SELECT count(*), count(*) FILTER (WHERE status NOT IN ('queued', 'sending')), "
                "count(*) FILTER (WHERE status IN ('queued', 'sending')) FROM deliveries").fetchone()
            now = time.monotonic()
            peak_backlog = max(peak_backlog, busy)
            if total >= expected and busy == 0:
                break
            if done != last_done:
                last_change, last_done = now, done
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"remind {name} exited with {proc.returncode}; see {workdir}/{name}.log")
            if now - last_change > args.stall:
                raise RuntimeError(f"no progress for {args.stall:.0f}s: {total} deliveries, {done} done, {busy} "
                                   f"queued or sending")
            time.sleep(0.25)
        meter.end = meter.snapshot(groups())
        fig["cores"] = meter.report()
        fig["poll_s"] = time.monotonic() - wall0
        fig["scheduler_hwm_mb"] = h.vm_hwm_mb(procs["scheduler"].pid)
        fig["worker_hwm_mb"] = max((h.vm_hwm_mb(p) for p in h.worker_processes(procs["worker"].pid)), default=0.0)
        rows = pg.execute("SELECT channel, status, reason, due_at, enqueued_at, started_at, sent_at "
                          "FROM deliveries").fetchall()
        pg.close()
        fig.update(rows=rows, peak_backlog=peak_backlog, due=due, per_tx=per_tx)
    finally:
        summary = h.tear_down(procs.values(), fakes, namespace, DB_NAME, private)
    wall_s = time.monotonic() - wall0

    # -- figures -------------------------------------------------------------------------------------------
    rows = fig["rows"]
    due = fig["due"]
    sent = [r for r in rows if r[1] in ("sent", "delivered")]
    statuses: dict[str, int] = {}
    for r in rows:
        key = r[1] if r[1] in ("sent", "delivered") else f"{r[1]} ({(r[2] or '')[:50]})"
        statuses[key] = statuses.get(key, 0) + 1
    if not sent:
        raise RuntimeError(f"nothing was sent: {statuses}")
    late = [(r[6] - r[3]).total_seconds() for r in sent]
    parts = {"scheduler: enqueued - due": [(r[4] - r[3]).total_seconds() for r in sent],
             "queue: started - enqueued": [(r[5] - r[4]).total_seconds() for r in sent],
             "send: sent - started": [(r[6] - r[5]).total_seconds() for r in sent]}
    last = max(r[6] for r in sent)
    drain_s = (last - due).total_seconds()
    per_s = len(sent) / drain_s if drain_s > 0 else float("nan")
    by_channel = {}
    for channel in ("sms", "email", "push"):
        mine = [r[6] for r in sent if r[0] == channel]
        if mine:
            by_channel[channel] = (len(mine), (max(mine) - due).total_seconds())
    max_in_flight = fakes.max_in_flight()
    problems = fakes.problems()
    unsent = len(rows) - len(sent)

    print(f"burst: {n_tx} transactions, first step (sms + email + push) due at {due:%H:%M:%S} UTC: {len(rows)} "
          f"deliveries (expected {expected}); scheduler tick {args.tick:g}s; {args.processes} worker processes x "
          f"{args.threads} threads, REMIND_SEND_CONCURRENCY={args.send_concurrency}; fakes answering after uniform "
          f"{h.format_latency(args.latency)} s; {os.cpu_count()} cores ({busy_before:.0f} % busy before the run)")
    print(f"setup: registered in {fig['register_s']:.1f}s ({fig['register_s'] / n_tx * 1000:.1f} ms each)")
    print(f"deliveries: {statuses}; peak backlog (queued + sending) {fig['peak_backlog']}")
    print(f"drain: the last message accepted {drain_s:.1f}s after the due time: {per_s:.1f} deliveries/s; per "
          f"channel " + ", ".join(f"{c} {n} by +{s:.1f}s" for c, (n, s) in by_channel.items()))
    for name, values in (("sent - due (lateness)", late), *((f"  {k}", v) for k, v in parts.items())):
        print(f"{name}: p50 {h.percentile(values, 50):.3f}s  p99 {h.percentile(values, 99):.3f}s  "
              f"max {max(values):.3f}s  (n={len(values)})")
    print("most requests in flight at once: " + ", ".join(
        f"{name} {max_in_flight.get(name, 0)} (limit {limits[name]})" for name in h.Fakes.NAMES))
    print(f"cores from the due time to the end: {h.cores_line(fig['cores'])}")
    errors = log_errors(workdir / "worker.log") + log_errors(workdir / "scheduler.log")
    print(f"peak RSS: worker {fig['worker_hwm_mb']:.0f} MiB, scheduler {fig['scheduler_hwm_mb']:.0f} MiB; "
          f"log errors {errors}")
    print("fakes (accepted / send requests / refused / bugs): " + ", ".join(
        f"{name} {f.get('messages')}/{f.get('requests')}/{f.get('rejected')}/{len(f.get('errors') or [])}"
        for name, f in summary.items()))
    if problems:
        print("WARNING: the fakes refused requests or failed: " + "; ".join(problems))
    if unsent or len(rows) != expected:
        print(f"WARNING: {unsent} of {len(rows)} deliveries did not end sent (expected {expected} sent)")
    print(f"logs: {workdir}")
    figures = {"deliveries": len(rows), "sent": len(sent), "not_sent": unsent, "drain_s": f"{drain_s:.1f}",
               "per_s": f"{per_s:.1f}", "lateness_p50_s": f"{h.percentile(late, 50):.3f}",
               "lateness_p99_s": f"{h.percentile(late, 99):.3f}", "lateness_max_s": f"{max(late):.3f}",
               "scheduler_max_s": f"{max(parts['scheduler: enqueued - due']):.3f}"}
    for name in h.Fakes.NAMES:
        figures[f"max_in_flight_{name}"] = max_in_flight.get(name, 0)
        figures[f"limit_{name}"] = limits[name]
    figures.update(send_concurrency=args.send_concurrency, processes=args.processes, threads=args.threads,
                   latency_s=h.format_latency(args.latency), tick_s=f"{args.tick:g}",
                   fake_problems=len(problems), log_errors=errors,
                   worker_peak_rss_mb=f"{fig['worker_hwm_mb']:.0f}",
                   scheduler_peak_rss_mb=f"{fig['scheduler_hwm_mb']:.0f}", wall_s=f"{wall_s:.0f}",
                   cpu_busy_before_pct=f"{busy_before:.0f}",
                   calibration_ms=f"{calibration:.0f}")
    print("burst: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
