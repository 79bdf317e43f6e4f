"""Lateness: at a sustained load of due steps, how long after its due time each message goes out.

    .venv/bin/python bench/lateness.py            # 50 transactions/s for 60 s, 2 worker processes (~3-5 min)
    .venv/bin/python bench/lateness.py --small    # 20/s for 15 s, under a minute
    .venv/bin/python bench/lateness.py --rate 15  # another offered load

Redis is a redis-server of the benchmark's own on a free port unless ``--shared-redis`` (the chaos tests restart
the shared one on 6379 without saving). The real processes on Redis + PostgreSQL (a throw-away database
``remind_bench_lat``): ``remind scheduler``
with REMIND_TICK_SECONDS=1 and ``remind worker --processes P --threads T``, the senders pointed at the
Twilio, SendGrid and FCM fakes (tests/fakes, each in its own process). The schedules folder is a temp dir
holding a copy of worker/demo/demo.yaml, the second-scale ladder (push at 2 s, SMS + push at 5 s, SMS +
email + push at 8 s, cancel at 12 s with an SMS + email notice: 8 messages a transaction); the templates
are the repo's. This process registers transactions (``Remind.register``, created now) at a steady rate,
then waits until every transaction is settled and no delivery is queued or sending.

Lateness of a delivery = ``sent_at - due_at`` from the ``deliveries`` table (``due_at``: the step's time;
``sent_at``: when the worker recorded the provider's answer), over every reminder and notice sent. It is
split into the scheduler's part (``enqueued_at - due_at``: waiting for the next tick; ``enqueued_at`` is
the tick's clock), the queue's (``started_at - enqueued_at``: the rest of the tick, Redis, waiting for a
worker thread) and the send itself (``sent_at - started_at``). Deliveries that were never sent (a reminder
whose transaction was cancelled before a worker reached it) are counted apart: they have no lateness.
Target: p99 under the tick interval plus one second.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

DB_NAME = "remind_bench_lat"
DEMO = h.ROOT / "worker" / "demo" / "demo.yaml"


def wait_for(path: Path, text: str, count: int, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}; see {path}")
        time.sleep(0.1)
    raise RuntimeError(f"no {text!r} in {path} after {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description="Lateness of sent messages at a steady offered load.")
    parser.add_argument("--small", action="store_true", help="20 transactions/s for 15 s (under a minute)")
    parser.add_argument("--rate", type=float, default=None, help="transactions registered per second (default 50)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of registering (default 60)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=h.WORKER_THREADS,
                        help=f"threads per worker process (default {h.WORKER_THREADS}, the service's)")
    parser.add_argument("--tick", type=float, default=1.0, help="REMIND_TICK_SECONDS (default 1)")
    parser.add_argument("--delivery-batch", type=int, default=None,
                        help="REMIND_DELIVERY_BATCH for the scheduler (default: the setting's, 20)")
    parser.add_argument("--drain", type=float, default=420.0, help="give up this long after the last registration")
    parser.add_argument("--out", type=Path, default=None, help="keep the processes' logs here")
    h.add_shared_redis_flag(parser)
    args = parser.parse_args()
    rate = args.rate or (20.0 if args.small else 50.0)
    duration = args.duration or (15.0 if args.small else 60.0)
    workdir = args.out or Path(tempfile.mkdtemp(prefix="remind-bench-lat-"))
    workdir.mkdir(parents=True, exist_ok=True)
    schedules = workdir / "schedules"
    schedules.mkdir(exist_ok=True)
    shutil.copy(DEMO, schedules / "demo.yaml")

    private = None if args.shared_redis else h.PrivateRedis(workdir)
    if private is not None:
        private.start()
    h.log(f"[setup] database {DB_NAME}, redis {h.REDIS_URL}, fakes, logs in {workdir}")
    database_url = h.create_database(DB_NAME)
    fakes = h.Fakes(workdir).start()
    namespace = h.new_namespace("remind-bench-lat")
    procs = {}
    figures: dict = {}
    try:
        from sqlalchemy import text

        from worker.service import Remind

        env = h.remind_env(database_url, namespace, workdir, fakes.env(), REMIND_SCHEDULES_DIR=str(schedules),
                           REMIND_TICK_SECONDS=f"{args.tick:g}", REMIND_WORKER_THREADS=str(args.threads),
                           **({"REMIND_DELIVERY_BATCH": str(args.delivery_batch)} if args.delivery_batch else {}))
        remind = Remind.from_settings(h.settings_from_env(env), migrate=True)  # migrations; registers below
        figures["ladder_s"] = max(s.final.after.total_seconds() for s in remind.registry)
        procs["worker"] = h.launch([str(h.BIN / "remind"), "worker", "--processes", str(args.processes),
                                    "--threads", str(args.threads)], env, workdir / "worker.log")
        procs["scheduler"] = h.launch([str(h.BIN / "remind"), "scheduler"], env, workdir / "scheduler.log")
        wait_for(workdir / "worker.log", "worker ready", args.processes, 60, procs["worker"])
        wait_for(workdir / "scheduler.log", "scheduler ticking", 1, 60, procs["scheduler"])
        h.log(f"[run] scheduler (tick {args.tick:g}s) and {args.processes}x{args.threads} workers ready; "
              f"registering {rate:g} transactions/s for {duration:g}s")

        run = os.urandom(3).hex()
        start = time.monotonic()
        n = int(rate * duration)
        behind = 0.0
        for i in range(n):
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                behind = max(behind, -wait)
            remind.register(h.transaction(i, run, created_at=None, zones=["Asia/Shanghai", "Europe/Berlin"]))
        offered_s = time.monotonic() - start
        h.log(f"[run] registered {n} in {offered_s:.1f}s (at most {behind:.2f}s behind the schedule); draining")

        deadline = time.monotonic() + args.drain
        engine = remind.store.engine
        peak_backlog = 0
        while True:
            with engine.connect() as conn:
                pending = conn.execute(text("SELECT count(*) FROM transactions WHERE status = 'pending'")).scalar()
                busy = conn.execute(text("SELECT count(*) FROM deliveries WHERE status IN ('queued', 'sending')"))\
                    .scalar()
            peak_backlog = max(peak_backlog, busy)
            if not pending and not busy:
                break
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"remind {name} exited with {proc.returncode}; see {workdir}/{name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not drained {args.drain:.0f}s after the last registration: {pending} pending "
                                   f"transactions, {busy} deliveries queued or sending")
            time.sleep(0.25)
        drained_s = time.monotonic() - start
        figures["scheduler_hwm_mb"] = h.vm_hwm_mb(procs["scheduler"].pid)
        figures["worker_hwm_mb"] = max((h.vm_hwm_mb(p) for p in h.worker_processes(procs["worker"].pid)),
                                       default=0.0)
        for proc in procs.values():
            h.stop(proc)

        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT kind, channel, status, reason, due_at, enqueued_at, started_at, sent_at FROM deliveries"
            )).all()
        remind.store.engine.dispose()
        sent = [r for r in rows if r.status in ("sent", "delivered") and r.kind in ("reminder", "notice")]
        late = [(r.sent_at - r.due_at).total_seconds() for r in sent]
        tick_part = [(r.enqueued_at - r.due_at).total_seconds() for r in sent]
        queue_part = [(r.started_at - r.enqueued_at).total_seconds() for r in sent]
        send_part = [(r.sent_at - r.started_at).total_seconds() for r in sent]
        statuses: dict[str, int] = {}
        for r in rows:
            key = r.status if r.status != "skipped" else f"skipped ({(r.reason or '')[:40]})"
            statuses[key] = statuses.get(key, 0) + 1
        first = min(r.started_at for r in sent)
        last = max(r.sent_at for r in sent)
        # what the workers got through, whatever the outcome (a reminder found cancelled is skipped, not sent)
        worked = [r for r in rows if r.enqueued_at is not None
                  and r.status in ("sent", "delivered", "failed", "skipped")]
        figures["processed_rate"] = len(worked) / (last - first).total_seconds()
        figures["not_sent"] = sum(1 for r in rows if r.status == "skipped" and r.kind == "reminder"
                                  and (r.reason or "").startswith("not sent"))
        figures.update(n=n, offered_s=offered_s, drained_s=drained_s, sent=len(sent), statuses=statuses,
                       late=late, tick_part=tick_part, queue_part=queue_part, send_part=send_part,
                       peak_backlog=peak_backlog, drain_rate=len(sent) / (last - first).total_seconds())
    finally:
        summary = h.tear_down(procs.values(), fakes, namespace, DB_NAME, private)

    sched_log = (workdir / "scheduler.log").read_text(errors="replace")
    missed = sched_log.count("was missed by")
    overran = sched_log.count("maximum number of running instances reached")
    errors = sum(1 for p in ("worker.log", "scheduler.log")
                 for line in (workdir / p).read_text(errors="replace").splitlines()
                 if " ERROR " in line or "Traceback" in line)
    late = figures["late"]
    per_tx = 8
    print(f"lateness: {figures['n']} transactions registered at {rate:g}/s for {duration:g}s on the demo ladder "
          f"({per_tx} messages each: offered {rate * per_tx:.0f} messages/s at steady state); scheduler tick "
          f"{args.tick:g}s; {args.processes} worker processes x {args.threads} threads; {os.cpu_count()} cores")
    print(f"deliveries: {figures['statuses']}; peak backlog (queued + sending) {figures['peak_backlog']}; "
          f"drained {figures['drained_s'] - figures['offered_s']:.1f}s after the last registration")
    offered = rate * per_tx
    tail = figures["drained_s"] - figures["offered_s"]
    overloaded = figures["not_sent"] > 0 or tail > figures["ladder_s"] + 2 * args.tick + 2
    print(f"workers got through {figures['processed_rate']:.1f} deliveries/s on average (sent, failed or skipped; "
          f"ramp-up and tail included), sent {figures['drain_rate']:.1f}/s; offered {offered:.0f}/s once every step "
          f"of the {figures['ladder_s']:g}s ladder is running; the last transaction's ladder ended {tail:.1f}s after "
          f"its registration" + (f" -> OVERLOADED: the lateness below is mostly backlog, and {figures['not_sent']} "
                                 f"reminders were never sent because the deadline cancelled their transaction first "
                                 f"(they have no lateness)" if overloaded else " (keeping up)"))
    for name, values in (("sent - due (lateness)", late), ("  tick wait: enqueued - due", figures["tick_part"]),
                         ("  queue: started - enqueued", figures["queue_part"]),
                         ("  send: sent - started", figures["send_part"])):
        print(f"{name}: p50 {h.percentile(values, 50):.3f}s  p95 {h.percentile(values, 95):.3f}s  "
              f"p99 {h.percentile(values, 99):.3f}s  max {max(values):.3f}s  (n={len(values)})")
    target = args.tick + 1
    p99 = h.percentile(late, 99)
    print(f"target p99 < {target:g}s: {'met' if p99 < target else 'missed'}; scheduler peak RSS "
          f"{figures['scheduler_hwm_mb']:.0f} MiB, worker peak RSS {figures['worker_hwm_mb']:.0f} MiB; "
          f"ticks skipped because the previous one overran {overran}, misfired {missed}; log errors {errors}")
    print(f"fakes: {summary}")
    problems = fakes.problems()
    if problems:
        print("WARNING: the fakes refused requests or failed: " + "; ".join(problems))
    print(f"logs: {workdir}")
    print(f"lateness_p50_s={h.percentile(late, 50):.3f} lateness_p95_s={h.percentile(late, 95):.3f} "
          f"lateness_p99_s={p99:.3f} lateness_max_s={max(late):.3f} tick_s={args.tick:g} target_p99_s={target:g} "
          f"offered_msgs_per_s={offered:.0f} processed_msgs_per_s={figures['processed_rate']:.0f} "
          f"scheduler_peak_rss_mb={figures['scheduler_hwm_mb']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
