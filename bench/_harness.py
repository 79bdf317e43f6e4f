"""What bench/throughput.py and bench/lateness.py share: a throw-away PostgreSQL database, the provider fakes
in their own processes, the environment of `remind` processes pointed at them, sample transactions, and
/proc readings (CPU seconds, peak RSS) of the processes involved. Not a benchmark itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PYTHON = BIN / "python"
PG_HOST = os.environ.get("BENCH_PG", "postgres@127.0.0.1:5432")
PG_ADMIN = f"postgresql://{PG_HOST}/test"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def service_default(field: str):
    """A setting's default as the service has it (worker/settings.py): the benchmarks measure what a deployment
    that sets nothing runs."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from worker.settings import Settings

    return Settings.model_fields[field].default


WORKER_THREADS = service_default("worker_threads")
SEND_CONCURRENCY = service_default("send_concurrency")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- PostgreSQL -------------------------------------------------------------------------------------

def _admin():
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True)


def create_database(name: str) -> str:
    """A fresh, empty database ``name`` (dropped first if a previous run left it); returns its URL."""
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://{PG_HOST}/{name}"


def drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def truncate(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("TRUNCATE deliveries, transactions, suppressions RESTART IDENTITY CASCADE"))


def postgres_pids(dbname: str) -> list[int]:
    """PostgreSQL's processes that work for ``dbname`` (it runs on this machine): the backends of its
    connections, and the server's shared ones (postmaster, WAL writer, checkpointer, ...), not other
    databases' backends."""
    out = []
    for pid, cmd in _cmdlines():
        if cmd.startswith("postgres: "):
            if f" {dbname} " in cmd or "(" not in cmd:
                out.append(pid)
        elif "/bin/postgres " in cmd:
            out.append(pid)
    return out


# -- Redis --------------------------------------------------------------------------------------------

class PrivateRedis:
    """A redis-server of this benchmark's own on a free port (``--private-redis``), for when the shared one on
    6379 may be restarted under the benchmark (the chaos tests do that). Same binary, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        global REDIS_URL
        import socket

        import redis

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        REDIS_URL = url
        return url

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def redis_pids() -> list[int]:
    """The redis-server the benchmark uses (found by its port)."""
    port = REDIS_URL.rsplit(":", 1)[1].split("/")[0]
    return [pid for pid, cmd in _cmdlines() if cmd.startswith("redis-server") and cmd.endswith(f":{port}")]


def add_shared_redis_flag(parser) -> None:
    """The same --shared-redis flag for every benchmark that starts its own redis-server."""
    parser.add_argument("--shared-redis", action="store_true", help="use the shared Redis (BENCH_REDIS_URL, default "
                        "127.0.0.1:6379) instead of a redis-server of our own on a free port; the chaos tests restart "
                        "the shared one without saving, which loses a run's queued messages")


def new_namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def drop_namespace(namespace: str) -> int:
    """Delete every key of a namespace this benchmark created."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    client.close()
    return len(keys)


# -- the provider fakes ---------------------------------------------------------------------------------

#: What the benchmarks that model the providers default to: each send answered after uniform(100, 300) ms.
PROVIDER_LATENCY = "0.1-0.3"


def parse_latency(value: str) -> tuple[float, float]:
    """``0``, ``0.2`` or ``0.1-0.3`` (seconds) -> (lo, hi)."""
    import argparse

    lo, sep, hi = str(value).strip().partition("-")
    try:
        pair = (float(lo), float(hi) if sep else float(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"latency {value!r}: seconds, or lo-hi seconds (e.g. 0.1-0.3)") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"latency {value!r}: need 0 <= lo <= hi")
    return pair


def format_latency(pair: tuple[float, float]) -> str:
    return f"{pair[0]:g}" if pair[0] == pair[1] else f"{pair[0]:g}-{pair[1]:g}"


def add_provider_flags(parser, *, latency: bool = True) -> None:
    """The flags of the benchmarks that model the providers: their latency, and the worker's send limits
    (REMIND_SEND_CONCURRENCY, REMIND_INFLIGHT_SMS / _EMAIL / _PUSH), passed to every `remind` process."""
    if latency:
        parser.add_argument("--latency", type=parse_latency, default=parse_latency(PROVIDER_LATENCY),
                            help=f"each provider fake answers a valid send after this many seconds: 0, 0.2, or "
                                 f"lo-hi for uniform (default {PROVIDER_LATENCY})")
    parser.add_argument("--send-concurrency", type=int, default=SEND_CONCURRENCY,
                        help=f"REMIND_SEND_CONCURRENCY: sends in flight per worker process "
                             f"(default {SEND_CONCURRENCY}, the service's)")
    for channel, provider in (("sms", "Twilio"), ("email", "SendGrid"), ("push", "FCM")):
        parser.add_argument(f"--inflight-{channel}", type=int, default=100,
                            help=f"REMIND_INFLIGHT_{channel.upper()}: most requests in flight to {provider}, shared "
                                 f"by all worker processes through Redis (default 100)")


def provider_settings(args) -> dict[str, str]:
    """The environment for `remind` processes from add_provider_flags' flags."""
    return {"REMIND_SEND_CONCURRENCY": str(args.send_concurrency), "REMIND_INFLIGHT_SMS": str(args.inflight_sms),
            "REMIND_INFLIGHT_EMAIL": str(args.inflight_email), "REMIND_INFLIGHT_PUSH": str(args.inflight_push)}


#: The worker setting that limits requests in flight to each fake.
LIMIT_FLAG = {"twilio": "inflight_sms", "sendgrid": "inflight_email", "fcm": "inflight_push"}


class Fakes:
    """Twilio, SendGrid and FCM fakes, each in a process of its own (see _fakes_server.py), answering each
    valid send after ``latency`` seconds (``(lo, hi)``: uniform; default at once)."""

    NAMES = ("twilio", "sendgrid", "fcm")

    def __init__(self, workdir: Path, latency: tuple[float, float] = (0.0, 0.0)) -> None:
        self.workdir = workdir
        self.latency = latency
        self.procs: dict[str, subprocess.Popen] = {}
        self.info: dict[str, dict] = {}
        self.summary: dict[str, dict] = {}

    def start(self) -> Fakes:
        for name in self.NAMES:
            proc = subprocess.Popen([str(PYTHON), str(ROOT / "bench" / "_fakes_server.py"), "--only", name,
                                     "--dir", str(self.workdir), "--latency", format_latency(self.latency)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, cwd=ROOT)
            self.procs[name] = proc
        for name, proc in self.procs.items():
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {name} fake did not start")
            self.info[name] = json.loads(line)[name]
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def env(self) -> dict[str, str]:
        tw, sg, fcm = self.info["twilio"], self.info["sendgrid"], self.info["fcm"]
        return {
            "TWILIO_ACCOUNT_SID": tw["account_sid"], "TWILIO_AUTH_TOKEN": tw["auth_token"],
            "TWILIO_MESSAGING_SERVICE_SID": tw["messaging_service_sid"], "TWILIO_API_BASE_URL": tw["base_url"],
            "SENDGRID_API_KEY": sg["api_key"], "SENDGRID_FROM_EMAIL": "reminders@pay.example",
            "SENDGRID_API_BASE_URL": sg["base_url"],
            "FCM_PROJECT_ID": fcm["project_id"], "FCM_CREDENTIALS_FILE": fcm["credentials_file"],
            "FCM_API_BASE_URL": fcm["base_url"],
        }

    def stop(self) -> dict[str, dict]:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:  # communicate() closes stdin: the fake prints its summary and exits
                    out, _ = proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                lines = [line for line in out.splitlines() if line.strip()]
                if lines:
                    self.summary[name] = json.loads(lines[-1]).get(name, {})
        self.procs.clear()
        return self.summary

    def max_in_flight(self) -> dict[str, int]:
        """The most send requests each fake held at once (from the summaries: after stop())."""
        return {name: int(s.get("max_in_flight", 0)) for name, s in self.summary.items()}

    def problems(self) -> list[str]:
        """Refused requests or bugs in a fake: a benchmark run with these is not a clean run."""
        out = []
        for name, s in self.summary.items():
            if s.get("rejected") or s.get("errors"):
                out.append(f"{name}: {s.get('rejected')} refused {s.get('rejected_first')}, errors {s.get('errors')}")
        return out


# -- remind processes --------------------------------------------------------------------------------------

_OURS = ("DATABASE_URL", "REDIS_URL", "TWILIO_", "SENDGRID_", "FCM_", "REMIND_")


def tear_down(procs: Iterable[subprocess.Popen], fakes: Fakes, namespace: str, db_name: str,
              private: PrivateRedis | None) -> dict[str, dict]:
    """Stop a run's processes and fakes, drop its Redis namespace and database; the fakes' summary."""
    for proc in procs:
        stop(proc)
    summary = fakes.stop()
    drop_namespace(namespace)
    drop_database(db_name)
    if private is not None:
        private.stop()
    return summary


def remind_env(database_url: str, namespace: str, workdir: Path, providers: dict[str, str], **extra: str) -> dict:
    """The environment of a `remind` process: this machine's, less any remind/provider settings, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env.update(providers)
    env.update({
        "DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "REMIND_REDIS_NAMESPACE": namespace,
        "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"), "REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMIND_OUTBOX": str(workdir / "outbox.jsonl"), "REMIND_PUBLIC_URL": "https://pay.example",
        "REMIND_SECRET_KEY": "bench-" + uuid.uuid4().hex, "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def settings_from_env(env: dict[str, str]):
    """The Settings object a `remind` process with this environment builds."""
    from worker.settings import Settings

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings(_env_file=None)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a process in its own session (so its children can be stopped with it), output to ``log``."""
    handle = open(log, "ab")
    return subprocess.Popen(args, env=env, cwd=log.parent, stdout=handle, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (dramatiq and APScheduler stop gracefully on it), then SIGKILL to the process group we started."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# -- /proc --------------------------------------------------------------------------------------------------

def _cmdlines() -> Iterable[tuple[int, str]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            yield int(entry), raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from "state" on (field 3)


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def worker_processes(main_pid: int) -> list[int]:
    """dramatiq's worker processes under a `remind worker` / `dramatiq` main process: forked (the default;
    same command line as the main process) or spawned, never the multiprocessing resource tracker."""
    out = []
    for pid in descendants(main_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "resource_tracker" not in cmd:
            out.append(pid)
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the live processes among ``pids`` (all their threads)."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


def busy_before(seconds: float = 1.0) -> float:
    """Percent of all cores busy over ``seconds``: what else was running when a benchmark started."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return 100 * (busy1 - busy0) / max(1e-9, total1 - total0)


def calibration_ms() -> float:
    """Milliseconds of a fixed piece of pure-Python work on one core, the best of five (``calibration_ms`` on
    every benchmark's last line). The same machine kind has measured 3x apart from one session to the next;
    figures from different days compare only in proportion to this."""
    def work() -> int:
        table: dict[str, int] = {}
        for i in range(200_000):
            key = f"k{i % 5000}"
            table[key] = table.get(key, 0) + len(json.dumps([i, key]))
        return sum(table.values())

    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class CpuMeter:
    """CPU seconds used by groups of processes between two snapshots; the rest of the machine is "other"."""

    def __init__(self) -> None:
        self.start: dict[str, float] | None = None
        self.end: dict[str, float] | None = None

    @staticmethod
    def snapshot(groups: dict[str, Iterable[int]]) -> dict[str, float]:
        snap = {name: cpu_seconds(pids) for name, pids in groups.items()}
        snap["_busy"], snap["_total"] = machine_cpu()
        snap["_wall"] = time.monotonic()
        return snap

    def report(self) -> dict[str, float]:
        """Cores used by each group over the interval (1.0 = one core busy the whole time)."""
        assert self.start and self.end
        wall = self.end["_wall"] - self.start["_wall"]
        out = {}
        for name in self.start:
            if not name.startswith("_"):
                out[name] = max(0.0, self.end.get(name, 0) - self.start[name]) / wall
        busy = (self.end["_busy"] - self.start["_busy"]) / wall
        out["other"] = max(0.0, busy - sum(out.values()))
        out["idle"] = max(0.0, (self.end["_total"] - self.start["_total"]) / wall - busy)
        return out


def cores_line(report: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in report.items())


# -- transactions -------------------------------------------------------------------------------------------

#: Candidate customer zones; a benchmark uses those where it is daytime now, so quiet hours hold nothing back.
ZONES = ("UTC", "Europe/London", "Europe/Berlin", "Europe/Moscow", "Asia/Dubai", "Asia/Kolkata", "Asia/Shanghai",
         "Asia/Tokyo", "Australia/Sydney", "Pacific/Auckland", "America/Sao_Paulo", "America/New_York",
         "America/Chicago", "America/Denver", "America/Los_Angeles", "Pacific/Honolulu")


def daytime_zones(now: datetime, first_hour: int = 10, last_hour: int = 19) -> list[str]:
    zones = [z for z in ZONES if first_hour <= now.astimezone(ZoneInfo(z)).hour <= last_hour]
    return zones or ["UTC"]


def transaction(i: int, run: str, *, created_at: datetime | None, zones: list[str]) -> dict:
    """A pending transfer for customer ``i``: alternately zh-CN / CNY and en / USD, one phone, one email,
    one push token, in one of ``zones``."""
    chinese = i % 2 == 0
    data = {
        "id": f"tx_{run}_{i:07d}",
        "customer": {"id": f"c_{run}_{i}", "name": "李伟" if chinese else "Alex Doe",
                     "phone": f"+86138{i % 10**8:08d}", "email": f"customer{i}@example.com",
                     "push_tokens": [f"fcm-token-{run}-{i}"], "locale": "zh-CN" if chinese else "en",
                     "timezone": zones[i % len(zones)], "segment": "returning"},
        "amount": "1000.00" if chinese else "250.00", "currency": "CNY" if chinese else "USD",
        "fee": "12.50" if chinese else "3.99", "payment_method": "Bank card ending 1234",
        "expected_arrival": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
        "risk_flag": False, "metadata": {"channel": "bench"},
    }
    if created_at is not None:
        data["created_at"] = created_at.isoformat()
    return data


# -- figures ---------------------------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
    return ordered[k]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
