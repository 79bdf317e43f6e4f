"""Delivery throughput on the real Redis broker, the senders pointed at local fake providers that answer at once
and that answer after a provider's latency (uniform 100-300 ms by default), against the no-op dramatiq ceiling.

    .venv/bin/python bench/throughput.py            # 4 runs of 3000 transactions (9000 deliveries) + no-op
    .venv/bin/python bench/throughput.py --small    # 200 transactions a run, a minute or two
    .venv/bin/python bench/throughput.py --latency 0.2 --send-concurrency 256 --inflight-sms 100

Redis: a redis-server of the benchmark's own on a free port (the same binary as the shared one on 6379,
no persistence), since the chaos tests restart the shared one without saving; ``--shared-redis`` uses
127.0.0.1:6379 (or BENCH_REDIS_URL). Every run gets a fresh namespace either way.

One invocation makes a run at 0 ms and one at ``--latency`` (default 0.1-0.3: uniform, ~200 ms) for each of
1 and 2 worker processes (``--processes``), fresh fakes (started at that latency) and a fresh Redis namespace
each time. The worker's send settings are passed to every run (``--send-concurrency`` ->
REMIND_SEND_CONCURRENCY, ``--inflight-sms/-email/-push`` -> REMIND_INFLIGHT_SMS/_EMAIL/_PUSH, the requests in
flight to each provider shared by all worker processes); each fake records the most requests it held at once,
printed beside the limit. What one run does:

1. registers N transactions in PostgreSQL (``Remind.register``, a throw-away database ``remind_bench_tp``),
   created 20 h 1 min ago on the shipped ``default`` schedule, so the final warning (SMS + email + push:
   three deliveries each; the two earlier steps are recorded skipped by the late-step rule) is due now;
   customers alternate zh-CN/CNY and en/USD, in time zones where it is daytime (quiet hours hold nothing);
2. ticks once (``Remind.tick`` with ``worker.broker.bind`` on a RedisBroker): the deliveries are inserted and
   one message per delivery is enqueued;
3. starts ``remind worker --processes P --threads T`` with the senders pointed at the Twilio, SendGrid and
   FCM fakes (tests/fakes, each in its own process: bench/_fakes_server.py) and polls PostgreSQL every
   0.1 s until no delivery is queued or sending. Every delivery goes the whole way: lock the row, re-check
   the transaction, read suppressions, render (Jinja + Babel), sign the link, call the provider's SDK,
   record ``sent``.

The no-op ceiling: the same number of messages (at least ``--noop-min``) for an actor with an empty body
(bench/_noop_app.py, on ``worker.broker.make_broker``: the same RedisBroker and middleware), consumed by
``dramatiq`` with the same processes and threads; a message counts as done when the broker acknowledges
it (its id leaves the queue's ``.msgs`` hash in Redis), polled every 0.01 s.

Rates: the headline is the steady rate between 10 % and 90 % of the messages done (start-up of the worker
processes and the last stragglers excluded, the same for both); the whole-run rate (first message started
to last done) is printed beside it. The CPU each part used over the steady window is printed in cores
(1.00 = one core busy): the workers, the fakes, PostgreSQL, Redis, this process and anything else on the
machine (the machine has 2 cores, shared by all of them).

Printed: each run's rate, worker CPU ms per delivery (the worker processes' CPU over the steady window / the
rate), worker peak RSS, the most requests in flight at each fake; the ratios 200ms / 0ms per process count
(1.0: the providers' latency is hidden entirely), pipeline / no-op per process count, and the "CPU ratio"
pipeline-0ms-1p / no-op-1p. The last line is ``throughput: key=value ...``.

With ``--profile``, a profile: one more 1-process run (at 0 ms, or with ``--profile-at latency`` at the
providers' latency) with py-spy attached to the worker
process, first sampling only the thread holding the GIL (where the CPU goes), then every thread inside a
delivery, waiting or not (where a delivery's wall time goes). And a sequential in-process calibration of the
same Deliverer (not timed against the others): SQL statements, transactions and pool check-outs per
delivery, and the time spent rendering, signing, sending and in the rest.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

DB_NAME = "remind_bench_tp"
NOOP_QUEUE = "bench-noop"


# -- the pipeline -----------------------------------------------------------------------------------------

class Pipeline:
    def __init__(self, args, workdir: Path, database_url: str) -> None:
        from worker.store import make_engine

        self.args = args
        self.workdir = workdir
        self.fakes: h.Fakes | None = None  # started afresh for every run, at that run's latency
        self.database_url = database_url
        self.engine = make_engine(database_url)
        self.namespaces: list[str] = []

    def env(self, namespace: str) -> dict[str, str]:
        return h.remind_env(self.database_url, namespace, self.workdir, self.fakes.env(),
                            REMIND_WORKER_THREADS=str(self.args.threads), **h.provider_settings(self.args))

    def start_fakes(self, latency: tuple[float, float]) -> h.Fakes:
        self.fakes = h.Fakes(self.workdir, latency).start()
        return self.fakes

    def stop_fakes(self) -> dict:
        """Stop the run's fakes; their summary, the most requests each held at once, and any problem."""
        fakes, self.fakes = self.fakes, None
        if fakes is None:
            return {}
        summary = fakes.stop()
        return {"fakes": summary, "max_in_flight": fakes.max_in_flight(), "fake_problems": fakes.problems()}

    def prepare(self, n_tx: int, label: str):
        """Register ``n_tx`` transactions whose final warning is due, tick once; returns (env, figures)."""
        from worker.broker import bind, make_broker
        from worker.service import Remind

        h.truncate(self.engine)
        namespace = h.new_namespace("remind-bench-tp")
        self.namespaces.append(namespace)
        env = self.env(namespace)
        remind = Remind.from_settings(h.settings_from_env(env), migrate=False)
        broker = make_broker(remind.settings)
        bind(remind, broker)
        now = datetime.now(UTC)
        zones = h.daytime_zones(now)
        created = now - timedelta(hours=20, minutes=1)
        run = label + os.urandom(3).hex()
        t0 = time.monotonic()
        for i in range(n_tx):
            remind.register(h.transaction(i, run, created_at=created, zones=zones))
        register_s = time.monotonic() - t0
        t0 = time.monotonic()
        result = remind.tick()
        tick_s = time.monotonic() - t0
        with self.engine.connect() as conn:
            from sqlalchemy import text

            mix = dict(conn.execute(text("SELECT channel, count(*) FROM deliveries WHERE status = 'queued' "
                                         "GROUP BY channel ORDER BY channel")).all())
        broker.close()
        remind.store.engine.dispose()
        figures = {"register_s": register_s, "tick_s": tick_s, "enqueued": len(result.enqueued), "mix": mix,
                   "claimed": result.claimed, "zones": zones}
        return env, figures

    def poll(self):
        import psycopg

        conn = psycopg.connect(self.database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)

        def counts() -> tuple[int, int, int, int]:
            return conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('sent', 'delivered')), "
                "count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'queued'), "
                "count(*) FILTER (WHERE status = 'sending') FROM deliveries").fetchone()

        return conn, counts

    def run(self, processes: int, n_tx: int, latency: tuple[float, float], *, profile: dict | None = None) -> dict:
        label = f"{latency_label(latency)}-{processes}p" + ("-prof" if profile else "")
        h.log(f"[pipeline {label}] fakes answering after {h.format_latency(latency)} s; registering {n_tx} "
              f"transactions and ticking ...")
        self.start_fakes(latency)
        try:
            fig = self._run(processes, n_tx, label, profile)
        finally:
            done = self.stop_fakes()
        fig.update(done)
        fig["latency"] = latency
        return fig

    def _run(self, processes: int, n_tx: int, label: str, profile: dict | None) -> dict:
        env, fig = self.prepare(n_tx, label)
        n = fig["enqueued"]
        h.log(f"[pipeline {label}] registered in {fig['register_s']:.1f}s, tick enqueued {n} in "
              f"{fig['tick_s']:.2f}s ({fig['mix']}); starting `remind worker -p {processes} -t {self.args.threads}`")
        conn, counts = self.poll()
        log_path = self.workdir / f"worker-{label}.log"
        proc = h.launch([str(h.BIN / "remind"), "worker", "--processes", str(processes),
                         "--threads", str(self.args.threads)], env, log_path)
        try:
            fig.update(self._watch(proc, n, counts, profile=profile, label=label))
            workers = h.worker_processes(proc.pid)
            fig["worker_hwm_mb"] = max((h.vm_hwm_mb(p) for p in workers), default=0.0)
            fig["main_hwm_mb"] = h.vm_hwm_mb(proc.pid)
        finally:
            h.stop(proc)
        fig["sent"], fig["failed"], queued, sending = counts()
        fig["db_rate"] = self._db_rate(conn)
        conn.close()
        text_log = log_path.read_text(errors="replace")
        fig["log_errors"] = sum(1 for line in text_log.splitlines() if " ERROR " in line or "Traceback" in line)
        fig["log_warnings"] = sum(1 for line in text_log.splitlines() if " WARNING " in line)
        fig["log"] = str(log_path)
        return fig

    @staticmethod
    def _db_rate(conn) -> float:
        first, last, n = conn.execute("SELECT min(started_at), max(sent_at), count(*) FROM deliveries "
                                      "WHERE status IN ('sent', 'delivered')").fetchone()
        if not n or first is None or last is None or last <= first:
            return 0.0
        return n / (last - first).total_seconds()

    def _groups(self, proc) -> dict[str, list[int]]:
        return {"workers": [proc.pid, *h.descendants(proc.pid)], "fakes": self.fakes.pids,
                "postgres": h.postgres_pids(DB_NAME), "redis": h.redis_pids(), "bench": [os.getpid()]}

    def _watch(self, proc, n: int, counts, *, profile: dict | None, label: str) -> dict:
        """Poll until every enqueued delivery is sent or failed; the steady window is 10 %..90 % done."""
        launched = time.monotonic()
        first = t10 = t90 = None
        d10 = d90 = 0
        meter = h.CpuMeter()
        last_change, last_done = launched, -1
        profiler: threading.Thread | None = None
        while True:
            sent, failed, queued, sending = counts()
            now = time.monotonic()
            done = sent + failed
            if first is None and queued < n:
                first = now
                if profile is not None:
                    profiler = threading.Thread(target=self._profile, args=(proc, profile), daemon=True)
                    profiler.start()
            if t10 is None and done >= 0.1 * n:
                t10, d10 = now, done
                meter.start = meter.snapshot(self._groups(proc))
            if t90 is None and done >= 0.9 * n:
                t90, d90 = now, done
                meter.end = meter.snapshot(self._groups(proc))
            if done != last_done:
                last_change, last_done = now, done
            if queued == 0 and sending == 0:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"[pipeline {label}] the worker exited with {proc.returncode}; see its log")
            if now - last_change > self.args.stall:
                raise RuntimeError(f"[pipeline {label}] no progress for {self.args.stall:.0f}s at {done}/{n}")
            time.sleep(0.1)
        end = time.monotonic()
        if profiler is not None:
            profiler.join()
        out = {"startup_s": (first or end) - launched, "total_s": end - (first or end)}
        out["rate"] = (d90 - d10) / (t90 - t10) if t90 and t10 and t90 > t10 else float("nan")
        out["run_rate"] = n / out["total_s"] if out["total_s"] > 0 else float("nan")
        out["cores"] = meter.report() if meter.start and meter.end else {}
        return out

    def _profile(self, proc, profile: dict) -> None:
        """py-spy on the (single) worker process: CPU (GIL holder) first, then wall (all threads, idle too)."""
        deadline = time.monotonic() + 30
        workers: list[int] = []
        while not workers and time.monotonic() < deadline:
            workers = h.worker_processes(proc.pid)
            time.sleep(0.05)
        if not workers:
            profile["error"] = "no worker process found"
            return
        pid = workers[0]
        for name, extra in (("cpu", ["--gil"]), ("wall", ["--idle"])):
            out = Path(profile["dir"]) / f"pyspy-{name}.txt"
            cmd = [str(h.BIN / "py-spy"), "record", "--pid", str(pid), "--rate", str(profile["rate"]),
                   "--duration", str(math.ceil(profile["seconds"])), "--nonblocking", "--format", "raw",
                   "-o", str(out), *extra]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0 or not out.exists():
                profile["error"] = f"py-spy {name}: {run.stderr.strip()[-400:]}"
                return
            profile[name] = str(out)
        h.log(f"[profile] py-spy samples written to {profile['dir']}")


# -- the no-op ceiling --------------------------------------------------------------------------------------

def run_noop(args, workdir: Path, database_url: str, processes: int, n: int, namespaces: list[str]) -> dict:
    import dramatiq
    import redis

    from worker.broker import make_broker

    namespace = h.new_namespace("remind-bench-noop")
    namespaces.append(namespace)
    env = h.remind_env(database_url, namespace, workdir, {})
    broker = make_broker(h.settings_from_env(env))
    actor = dramatiq.Actor(lambda i: None, broker=broker, actor_name="bench.noop", queue_name=NOOP_QUEUE,
                           priority=0, options={})
    h.log(f"[noop {processes}p] enqueueing {n} messages ...")
    t0 = time.monotonic()
    for i in range(n):
        actor.send(i)
    enqueue_s = time.monotonic() - t0
    broker.close()
    client = redis.Redis.from_url(h.REDIS_URL)
    msgs = f"{namespace}:{NOOP_QUEUE}.msgs"
    assert client.hlen(msgs) == n, "the no-op messages did not all reach Redis"
    log_path = workdir / f"noop-{processes}p.log"
    proc = h.launch([str(h.BIN / "dramatiq"), "_noop_app", "--path", str(h.ROOT / "bench"), "--processes",
                     str(processes), "--threads", str(args.threads), "--queues", NOOP_QUEUE], env, log_path)
    try:
        launched = time.monotonic()
        first = t10 = t90 = None
        d10 = d90 = 0
        meter = h.CpuMeter()
        last_change, last_done = launched, -1
        while True:
            left = client.hlen(msgs)
            now = time.monotonic()
            done = n - left
            if first is None and done > 0:
                first = now
            if t10 is None and done >= 0.1 * n:
                t10, d10 = now, done
                meter.start = meter.snapshot(noop_groups(proc))
            if t90 is None and done >= 0.9 * n:
                t90, d90 = now, done
                meter.end = meter.snapshot(noop_groups(proc))
            if done != last_done:
                last_change, last_done = now, done
            if left == 0:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"[noop {processes}p] dramatiq exited with {proc.returncode}; see {log_path}")
            if now - last_change > args.stall:
                raise RuntimeError(f"[noop {processes}p] no progress for {args.stall:.0f}s at {done}/{n}")
            time.sleep(0.01)
        end = time.monotonic()
        workers = h.worker_processes(proc.pid)
        hwm = max((h.vm_hwm_mb(p) for p in workers), default=0.0)
    finally:
        h.stop(proc)
    client.close()
    total = end - (first or end)
    return {"n": n, "enqueue_s": enqueue_s, "startup_s": (first or end) - launched, "total_s": total,
            "rate": (d90 - d10) / (t90 - t10) if t90 and t10 and t90 > t10 else float("nan"),
            "run_rate": n / total if total > 0 else float("nan"), "worker_hwm_mb": hwm,
            "cores": meter.report() if meter.start and meter.end else {}}


def noop_groups(proc) -> dict[str, list[int]]:
    return {"workers": [proc.pid, *h.descendants(proc.pid)], "redis": h.redis_pids(), "bench": [os.getpid()]}


# -- in-process calibration: what one delivery costs, sequentially ------------------------------------------

def calibrate(pipeline: Pipeline, n_tx: int) -> dict:
    """The real Deliverer in this process, one delivery at a time, with SQL counted and each part timed."""
    from sqlalchemy import event

    import worker.delivery as delivery_mod
    from worker.service import Remind

    h.truncate(pipeline.engine)
    env = pipeline.env(h.new_namespace("remind-bench-cal"))
    remind = Remind.from_settings(h.settings_from_env(env), migrate=False)
    ids: list[int] = []
    remind.enqueue = ids.extend
    now = datetime.now(UTC)
    zones = h.daytime_zones(now)
    for i in range(n_tx):
        remind.register(h.transaction(i, "cal" + os.urandom(3).hex(), created_at=now - timedelta(hours=20, minutes=1),
                                      zones=zones))
    remind.tick()
    engine = remind.store.engine
    counts = Counter()
    spent = defaultdict(float)
    event.listen(engine, "before_cursor_execute", lambda *a, **k: counts.update(["statements"]))
    event.listen(engine, "begin", lambda *a: counts.update(["transactions"]))
    event.listen(engine.pool, "checkout", lambda *a: counts.update(["checkouts"]))

    calls = Counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
                calls[name] += 1
        return wrapper

    saved = {name: getattr(delivery_mod, name) for name in ("facts_for", "confirm_url")}
    delivery_mod.facts_for = timed("facts (Babel)", saved["facts_for"])
    delivery_mod.confirm_url = timed("link (itsdangerous)", saved["confirm_url"])
    templates = remind.templates
    templates.render = timed("templates (Jinja)", templates.render)
    for channel, sender in remind.senders.items():
        sender.send = timed(f"send {channel} ({sender.name})", sender.send)
    try:
        warm, rest = ids[:6], ids[6:]
        for delivery_id in warm:  # connections, the FCM access token, template caches
            remind.deliver(delivery_id)
        counts.clear()
        spent.clear()
        calls.clear()
        t0 = time.perf_counter()
        outcomes = Counter(remind.deliver(d) for d in rest)
        total = time.perf_counter() - t0
    finally:
        for name, fn in saved.items():
            setattr(delivery_mod, name, fn)
        engine.dispose()
    k = len(rest)
    per = {name: 1000 * s / k for name, s in spent.items()}
    per["SQL + the rest"] = 1000 * total / k - sum(per.values())
    return {"deliveries": k, "outcomes": dict(outcomes), "ms_per_delivery": 1000 * total / k, "ms": per,
            "per_call": {name: 1000 * s / calls[name] for name, s in spent.items() if calls[name]},
            "per_delivery": {name: c / k for name, c in counts.items()}}


# -- py-spy summaries --------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = _FRAME.match(part.strip())
        out.append((m["func"], m["file"]) if m else (part.strip(), ""))
    return out


def _lib(path: str) -> str:
    p = path.replace("\\", "/")
    for name in ("sqlalchemy", "psycopg", "jinja2", "babel", "twilio", "sendgrid", "python_http_client", "google",
                 "requests", "urllib3", "dramatiq", "redis", "itsdangerous", "json", "logging", "http", "ssl",
                 "socket", "email", "cryptography", "zoneinfo", "threading", "queue", "selectors", "re", "pydantic"):
        if f"/{name}/" in p or p.startswith(f"{name}/") or p.endswith(f"/{name}.py") or p == f"{name}.py":
            return name
    return "other"


def _stage(frames: list[tuple[str, str]]) -> str:
    """Which part of the work a sample belongs to: the innermost frame in worker/ decides, else the library."""
    files = [f for _, f in frames]
    if any(_lib(f) == "logging" for f in files):
        return "logging"
    for func, path in reversed(frames):
        p = path.replace("\\", "/")
        if "worker/" not in p or "site-packages/dramatiq" in p:
            continue
        if p.endswith("render.py"):
            inner = [_lib(f) for f in files[files.index(path):]]
            if any(name in func for name in ("facts_for", "babel_locale", "_plain_spaces")):
                return "render: Babel facts"
            return "render: Jinja templates" if "babel" not in inner else "render: Babel facts"
        if p.endswith("links.py"):
            return "confirm link (itsdangerous)"
        if "/senders/twilio" in p:
            return "send: Twilio SDK + HTTP"
        if "/senders/sendgrid" in p:
            return "send: SendGrid SDK + HTTP"
        if "/senders/fcm" in p:
            return "send: FCM google-auth + HTTP"
        if "/store/" in p:
            return "SQL (SQLAlchemy + psycopg)"
        if p.endswith("runner.py") or (p.endswith("service.py") and ("config" in func or "reload" in func)):
            return "config reload watcher"
        return "delivery logic (worker/ Python)"
    # no frame of worker/ (py-spy cut the stack short, or a library's own thread): the innermost library
    for _, path in reversed(frames):
        lib = _lib(path)
        if lib in ("sqlalchemy", "psycopg"):
            return "SQL (SQLAlchemy + psycopg)"
        if lib == "jinja2":
            return "render: Jinja templates"
        if lib == "babel":
            return "render: Babel facts"
        if lib in ("twilio", "sendgrid", "python_http_client", "google", "requests", "urllib3", "http", "ssl"):
            return "send: SDK + HTTP (stack cut short)"
        if lib in ("dramatiq", "redis"):
            return "dramatiq + redis client (no actor)"
    return "other (interpreter, threading, unknown)"


def summarize(path: str, *, only_delivery: bool) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    stages, leaves, total = Counter(), Counter(), 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = _frames(stack)
        if only_delivery and not any(func.endswith(("deliver", "deliver_many")) and f.endswith("delivery.py")
                                     for func, f in frames):
            continue
        n = int(count)
        total += n
        stages[_stage(frames)] += n
        func, f = frames[-1]
        leaves[f"{func} ({_lib(f) if _lib(f) != 'other' else f.rsplit('/', 1)[-1]})"] += n
    if not total:
        return 0, [], []
    return total, [(k, 100 * v / total) for k, v in stages.most_common()], \
        [(k, 100 * v / total) for k, v in leaves.most_common(12)]


def latency_label(latency: tuple[float, float]) -> str:
    """``0ms``, ``200ms`` (the mean of a uniform latency): the key of a run in the figures."""
    return f"{round(500 * (latency[0] + latency[1]))}ms"


# -- main -----------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description="Delivery throughput at 0 ms and at the providers' latency, "
                                                 "against the no-op Dramatiq ceiling.")
    parser.add_argument("--small", action="store_true", help="a quick run (about a minute or two)")
    parser.add_argument("--tx", type=int, default=None, help="transactions per run (3 deliveries each); "
                                                             "default 3000, --small 200")
    parser.add_argument("--processes", default="1,2", help="worker process counts to run (default 1,2)")
    parser.add_argument("--threads", type=int, default=h.WORKER_THREADS,
                        help=f"threads per worker process (default {h.WORKER_THREADS}, the service's)")
    parser.add_argument("--noop-min", type=int, default=None, help="at least this many no-op messages "
                                                                   "(default 20000, --small 3000)")
    h.add_provider_flags(parser)
    parser.add_argument("--profile", action="store_true", help="also a py-spy profile of one more 1-process run "
                                                               "(at 0 ms, see --profile-at), and the in-process "
                                                               "calibration")
    parser.add_argument("--profile-at", choices=("0", "latency"), default="0",
                        help="the profiled run's provider latency: 0 (default) or --latency's (where the CPU that "
                             "latency adds goes)")
    parser.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)  # the default now
    parser.add_argument("--profile-seconds", type=float, default=None, help="per py-spy pass (default 10, small 3)")
    parser.add_argument("--stall", type=float, default=60.0, help="give up after this long without progress")
    parser.add_argument("--out", type=Path, default=None, help="keep logs and profiles here (default: a temp dir)")
    h.add_shared_redis_flag(parser)
    args = parser.parse_args()
    n_tx = args.tx or (200 if args.small else 3000)
    noop_min = args.noop_min or (3000 if args.small else 20000)
    prof_s = args.profile_seconds or (3.0 if args.small else 10.0)
    counts = [int(p) for p in args.processes.split(",")]
    zero = (0.0, 0.0)
    latencies = [zero] + ([args.latency] if args.latency != zero else [])
    labels = [latency_label(lat) for lat in latencies]
    workdir = args.out or Path(tempfile.mkdtemp(prefix="remind-bench-tp-"))
    workdir.mkdir(parents=True, exist_ok=True)
    limits = {name: getattr(args, flag) for name, flag in h.LIMIT_FLAG.items()}

    private = None if args.shared_redis else h.PrivateRedis(workdir)
    if private is not None:
        private.start()
    h.log(f"[setup] database {DB_NAME}, redis {h.REDIS_URL}, logs in {workdir}")
    busy_before = h.busy_before()
    calibration = h.calibration_ms()
    database_url = h.create_database(DB_NAME)
    wall0 = time.monotonic()
    pipeline = None
    results: dict[tuple[str, int], dict] = {}
    noop: dict[int, dict] = {}
    profile: dict = {}
    cal: dict = {}
    noop_namespaces: list[str] = []
    try:
        from worker.store import make_engine, upgrade

        engine = make_engine(database_url)
        upgrade(engine)
        engine.dispose()
        pipeline = Pipeline(args, workdir, database_url)
        for lat, label in zip(latencies, labels, strict=True):
            for p in counts:
                r = results[label, p] = pipeline.run(p, n_tx, lat)
                h.log(f"[pipeline {label}-{p}p] {r['rate']:.0f}/s steady, {r['run_rate']:.0f}/s whole run, "
                      f"{r['sent']} sent, {r['failed']} failed; most in flight {r['max_in_flight']}")
        n_noop = max(noop_min, max(r["enqueued"] for r in results.values()))
        for p in counts:
            noop[p] = run_noop(args, workdir, database_url, p, n_noop, noop_namespaces)
            h.log(f"[noop {p}p] {noop[p]['rate']:.0f}/s steady, {noop[p]['run_rate']:.0f}/s whole run")
        if args.profile and not (h.BIN / "py-spy").exists():
            h.log("[profile] skipped: py-spy is not installed (.venv/bin/pip install py-spy)")
            profile = {"error": "skipped: py-spy is not installed (.venv/bin/pip install py-spy)"}
        elif args.profile:
            rate1 = results[labels[0], counts[0]]["rate"]
            rate1 = rate1 if math.isfinite(rate1) else 100
            prof_tx = max(60, int(rate1 * (2 * prof_s + 4) / 3))
            profile = {"dir": str(workdir), "seconds": prof_s, "rate": 200}
            profile["run"] = pipeline.run(1, prof_tx, latencies[-1] if args.profile_at == "latency" else zero,
                                          profile=profile)
        if args.profile:
            pipeline.start_fakes(zero)
            try:
                cal = calibrate(pipeline, 30 if args.small else 120)
            finally:
                pipeline.stop_fakes()
    finally:
        if pipeline is not None:
            pipeline.stop_fakes()
            pipeline.engine.dispose()
            for ns in pipeline.namespaces:
                h.drop_namespace(ns)
        for ns in noop_namespaces:
            h.drop_namespace(ns)
        h.drop_database(DB_NAME)
        if private is not None:
            private.stop()
    wall_s = time.monotonic() - wall0

    # -- report --------------------------------------------------------------------------------------------
    print(f"throughput: {n_tx} transactions a run, final warning due: 3 deliveries each (sms/twilio, "
          f"email/sendgrid, push/fcm); fakes answering at once (0ms) and after uniform "
          f"{h.format_latency(args.latency)} s ({labels[-1]}); {args.threads} threads per worker process, "
          f"REMIND_SEND_CONCURRENCY={args.send_concurrency}, in-flight limits sms {args.inflight_sms} / email "
          f"{args.inflight_email} / push {args.inflight_push}; {os.cpu_count()} cores ({busy_before:.0f} % busy "
          f"before the run); redis {'private' if private else 'shared'} {h.REDIS_URL}")
    for (label, p), r in results.items():
        cpu_ms = worker_cpu_ms(r)
        print(f"pipeline {label} {p}p: {r['rate']:.1f} deliveries/s steady (10-90 %), {r['run_rate']:.1f}/s whole run "
              f"({r['enqueued']} in {r['total_s']:.1f}s after {r['startup_s']:.1f}s start-up), "
              f"{r['db_rate']:.1f}/s from the rows' started_at..sent_at; {r['sent']} sent, {r['failed']} failed; "
              f"mix {r['mix']}; worker peak RSS {r['worker_hwm_mb']:.0f} MiB; log errors {r['log_errors']}, "
              f"warnings {r['log_warnings']}")
        print("  most requests in flight at once: " + ", ".join(
            f"{name} {r['max_in_flight'].get(name, 0)} (limit {limits[name]})" for name in h.Fakes.NAMES)
              + f"; worker CPU {cpu_ms:.2f} ms per delivery")
        print(f"  setup: register {r['register_s'] / r['claimed'] * 1000:.1f} ms/transaction, tick (claim, plan, "
              f"insert, enqueue) {r['tick_s']:.2f}s for {r['enqueued']} deliveries")
        print(f"  cores over the steady window: {h.cores_line(r['cores'])}")
        if r["fake_problems"]:
            print("  WARNING: the fakes refused requests or failed: " + "; ".join(r["fake_problems"]))
    for p in counts:
        r = noop[p]
        print(f"noop {p}p: {r['rate']:.1f} messages/s steady, {r['run_rate']:.1f}/s whole run ({r['n']} in "
              f"{r['total_s']:.2f}s; enqueue took {r['enqueue_s']:.1f}s); worker peak RSS {r['worker_hwm_mb']:.0f} "
              f"MiB; worker CPU {worker_cpu_ms(r):.2f} ms per message")
        print(f"  cores over the steady window: {h.cores_line(r['cores'])}")
    for p in counts:
        print(f"ratio {p}p: pipeline 0ms / no-op = {ratio(results[labels[0], p], noop[p]):.3f}"
              + (f"; pipeline {labels[-1]} / 0ms = {ratio(results[labels[-1], p], results[labels[0], p]):.3f} "
                 f"(1.0: the latency is hidden entirely)" if len(labels) > 1 else ""))
    if 1 in counts:
        print(f"CPU ratio (pipeline 0ms 1p / no-op 1p): {ratio(results[labels[0], 1], noop[1]):.3f}")
    print("fakes per run (accepted / send requests / refused / bugs): " + "; ".join(
        f"{label} {p}p " + ", ".join(f"{name} {f.get('messages')}/{f.get('requests')}/{f.get('rejected')}/"
                                     f"{len(f.get('errors') or [])}" for name, f in r["fakes"].items())
        for (label, p), r in results.items()))
    if profile:
        profiled = labels[-1] if args.profile_at == "latency" else labels[0]
        cpu_ms = worker_cpu_ms(results[profiled, counts[0]]) if counts[0] == 1 else 0
        if profile.get("error"):
            print(f"profile: {profile['error']}")
        for name, title, only in (("cpu", "CPU (samples of the thread holding the GIL)", False),
                                  ("wall", "wall time of threads inside deliver_many() (waiting included)", True)):
            if name not in profile:
                continue
            total, stages, leaves = summarize(profile[name], only_delivery=only)
            print(f"profile {title}, {total} samples, 1 worker process, {args.threads} threads, {profiled}:")
            for k, v in stages:
                if v >= 0.5:
                    print(f"  {v:5.1f}%  {k}" + (f"  ~{v / 100 * cpu_ms:.2f} ms CPU per delivery"
                                                 if name == "cpu" and cpu_ms else ""))
            print("  hottest leaf functions: " + ", ".join(f"{k} {v:.1f}%" for k, v in leaves[:8]))
        pr = profile.get("run")
        if pr:
            print(f"  (profiled run: {pr['rate']:.1f} deliveries/s under py-spy --nonblocking; raw stacks in "
                  f"{profile['dir']}/pyspy-cpu.txt and pyspy-wall.txt)")
    if cal:
        per = cal["per_delivery"]
        print(f"calibration, one delivery at a time in this process ({cal['deliveries']} deliveries, "
              f"{cal['outcomes']}): {cal['ms_per_delivery']:.2f} ms each = "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(cal["ms"].items(), key=lambda kv: -kv[1])))
        print("  per call: " + ", ".join(f"{k} {v:.2f} ms" for k, v in cal["per_call"].items()))
        print(f"  SQL per delivery: {per.get('statements', 0):.1f} statements in {per.get('transactions', 0):.1f} "
              f"transactions (each adds a BEGIN and a COMMIT round trip) on {per.get('checkouts', 0):.1f} pool "
              f"check-outs (each a pre-ping SELECT 1)")
    print(f"logs and profiles: {workdir}")

    figures = {}
    for label in labels:
        for p in counts:
            figures[f"pipeline_{label}_{p}p_per_s"] = f"{results[label, p]['rate']:.1f}"
    for p in counts:
        figures[f"noop_{p}p_per_s"] = f"{noop[p]['rate']:.1f}"
    if len(labels) > 1:
        for p in counts:
            figures[f"ratio_{labels[-1]}_0ms_{p}p"] = f"{ratio(results[labels[-1], p], results[labels[0], p]):.3f}"
    for p in counts:
        figures[f"ratio_noop_{p}p"] = f"{ratio(results[labels[0], p], noop[p]):.3f}"
    if 1 in counts:
        figures["cpu_ratio"] = f"{ratio(results[labels[0], 1], noop[1]):.3f}"
    for label in labels:
        for p in counts:
            figures[f"cpu_ms_per_delivery_{label}_{p}p"] = f"{worker_cpu_ms(results[label, p]):.2f}"
    for name in h.Fakes.NAMES:
        figures[f"max_in_flight_{name}"] = max(r["max_in_flight"].get(name, 0) for r in results.values())
        figures[f"limit_{name}"] = limits[name]
    figures["send_concurrency"] = args.send_concurrency
    figures["threads"] = args.threads
    figures["latency_s"] = h.format_latency(args.latency)
    figures["deliveries_per_run"] = max(r["enqueued"] for r in results.values())
    figures["failed"] = sum(r["failed"] for r in results.values())
    figures["fake_problems"] = sum(len(r["fake_problems"]) for r in results.values())
    figures["worker_peak_rss_mb"] = f"{max(r['worker_hwm_mb'] for r in results.values()):.0f}"
    figures["wall_s"] = f"{wall_s:.0f}"
    figures["cpu_busy_before_pct"] = f"{busy_before:.0f}"
    figures["calibration_ms"] = f"{calibration:.0f}"
    print("throughput: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


def ratio(a: dict, b: dict) -> float:
    return a["rate"] / b["rate"] if b["rate"] and math.isfinite(b["rate"]) else float("nan")


def worker_cpu_ms(r: dict) -> float:
    """CPU milliseconds the worker processes (all of them) spent per delivery over the steady window."""
    cores = r.get("cores") or {}
    if not cores or not r["rate"] or not math.isfinite(r["rate"]):
        return float("nan")
    return 1000 * cores.get("workers", 0) / r["rate"]


if __name__ == "__main__":
    sys.exit(main())
