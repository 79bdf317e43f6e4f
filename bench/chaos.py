"""Chaos run: transactions on second-scale ladders through two schedulers and two worker processes on
the real Redis and PostgreSQL, while workers are SIGKILLed, Redis restarts (a redis-server of the
run's own, on a free port), and the providers fail
20% of requests with 5xx and time out on 5%. A random third of the transactions are confirmed at
random moments. Afterwards every invariant is checked and one line of counts is printed:

    chaos: transactions=... sent=... duplicates=0 lost=0 reminded_after_confirm=0
    confirmed_then_cancelled=0 cancelled_twice=0 webhooks_missing=0

It exits non-zero when any count after ``sent`` is above zero.

    .venv/bin/python bench/chaos.py            # 2000 transactions
    .venv/bin/python bench/chaos.py --small    # 150, for CI
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from worker.broker import bind, make_broker  # noqa: E402
from worker.errors import AlreadySettled  # noqa: E402
from worker.service import Remind  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.store import make_engine, upgrade  # noqa: E402

PG_ADMIN = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SECRET = "whsec_" + "Y2hhb3Mtc2VjcmV0LWNoYW9zLXNlY3JldA=="

LADDER = """\
name: chaos
match: {}
steps:
  - after: 2s
    channels: [push]
    template: nudge
  - after: 5s
    channels: [sms, push]
    template: reminder
  - after: 8s
    channels: [sms, email, push]
    template: final_warning
cancel:
  after: 12s
  template: cancelled
  reason: not_confirmed
  channels: [sms, email]
"""


# -- the providers, in their own process so their threads do not slow the checker ---------------------

def run_fakes(conn, p_5xx: float, p_timeout: float, credentials: str) -> None:
    from fakes import FcmFake, SendGridFake, TwilioFake

    fakes = {"twilio": TwilioFake(hang_seconds=3), "sendgrid": SendGridFake(hang_seconds=3),
             "fcm": FcmFake(hang_seconds=3)}
    for fake in fakes.values():
        fake.start()
        fake.fail_rate(p_5xx, p_timeout, seed=7)
    fakes["fcm"].write_credentials(Path(credentials))
    tw, sg, fcm = fakes["twilio"], fakes["sendgrid"], fakes["fcm"]
    conn.send({"TWILIO_ACCOUNT_SID": tw.account_sid, "TWILIO_AUTH_TOKEN": tw.auth_token,
               "TWILIO_MESSAGING_SERVICE_SID": tw.messaging_service_sid, "TWILIO_API_BASE_URL": tw.base_url,
               "SENDGRID_API_KEY": sg.api_key, "SENDGRID_FROM_EMAIL": "reminders@pay.example",
               "SENDGRID_API_BASE_URL": sg.base_url, "FCM_PROJECT_ID": fcm.project_id,
               "FCM_CREDENTIALS_FILE": credentials, "FCM_API_BASE_URL": fcm.base_url})
    conn.recv()  # wait for "stop"
    received = []
    for m in tw.messages:
        received.append(("sms", m.to, hashlib.sha256(m.body.encode()).hexdigest(), m.received_at))
    for m in sg.messages:
        args = m.custom_args or {}
        received.append(("email", str(m.to), f"{args.get('transaction_id')}:{args.get('step')}", m.received_at))
    for m in fcm.messages:
        received.append(("push", m.token, hashlib.sha256(f"{m.title}|{m.body}".encode()).hexdigest(), m.received_at))
    conn.send(received)
    for fake in fakes.values():
        fake.stop()


# -- the platform: verifies each webhook, refuses 20% of them ---------------------------------------------

class Platform:
    def __init__(self, fail: float) -> None:
        from standardwebhooks.webhooks import Webhook

        self.events: list[tuple[str, str, str]] = []
        rng, lock, events = random.Random(3), threading.Lock(), self.events
        verifier = Webhook(SECRET)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = verifier.verify(body, headers)
                except Exception:  # noqa: BLE001 - a bad signature is a test failure, counted as missing
                    self.send_response(400)
                    self.end_headers()
                    return
                with lock:
                    refuse = rng.random() < fail
                    if not refuse:
                        events.append((headers["webhook-id"], event["type"], event["data"]["id"]))
                self.send_response(503 if refuse else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"


# -- processes ---------------------------------------------------------------------------------------------

class Procs:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir = env, workdir
        self.remind = str(Path(sys.executable).parent / "remind")
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.workers: list[subprocess.Popen] = []
        self.schedulers: list[subprocess.Popen] = []
        self.started = 0

    def _start(self, *args: str) -> subprocess.Popen:
        self.started += 1
        log = open(self.logs / f"{args[0]}-{self.started}.log", "w")  # noqa: SIM115 - kept for the process
        return subprocess.Popen([self.remind, *args], env=self.env, cwd=self.workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self) -> None:
        self.workers.append(self._start("worker", "--processes", "1", "--threads", "6"))

    def start_scheduler(self) -> None:
        self.schedulers.append(self._start("scheduler"))

    def kill_a_worker(self, rng: random.Random) -> None:
        victim = self.workers.pop(rng.randrange(len(self.workers)))
        os.killpg(victim.pid, signal.SIGKILL)  # the dramatiq parent and its worker process, mid-work
        victim.wait()
        self.start_worker()

    def stop(self) -> None:
        for p in self.workers + self.schedulers:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.workers + self.schedulers:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


class OwnRedis:
    """A redis-server of this run's own on a free port (no persistence, like the machine's), so the
    restart hits only this run and never the Redis other work shares."""

    def __init__(self, workdir: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def restart(self) -> None:
        """Everything queued is lost, as when a Redis without persistence restarts."""
        self.stop()
        time.sleep(1.0)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def transaction(i: int, run: str, created: datetime) -> dict:
    return {
        "id": f"chaos_{run}_{i:05}",
        "customer": {"id": f"c_{run}_{i}", "name": f"Customer {i}", "phone": f"+1415555{i:04}",
                     "email": f"customer{i}.{run}@example.com", "push_tokens": [f"tok-{run}-{i}"],
                     "locale": random.choice(["en", "zh-CN"]), "timezone": "Europe/Lisbon", "segment": "chaos"},
        "amount": "120.00", "currency": "EUR", "fee": "1.50", "payment_method": "Card ending 0005",
        "expected_arrival": (created + timedelta(days=1)).isoformat(), "created_at": created.isoformat(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transactions", type=int, default=2000)
    ap.add_argument("--small", action="store_true", help="150 transactions, for CI")
    ap.add_argument("--kills", type=int, default=4, help="worker SIGKILLs during the run")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    n = 150 if args.small else args.transactions
    rng = random.Random(args.seed)
    random.seed(args.seed)
    run = uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix="remind-chaos-"))
    (work / "schedules").mkdir()
    (work / "schedules" / "chaos.yaml").write_text(LADDER)

    db = f"remind_chaos_{run}"
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    db_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{db}"
    upgrade(make_engine(db_url))

    parent, child = multiprocessing.get_context("spawn").Pipe()
    fakes = multiprocessing.get_context("spawn").Process(target=run_fakes,
                                                         args=(child, 0.20, 0.05, str(work / "fcm.json")))
    fakes.start()
    provider_env = parent.recv()
    platform = Platform(fail=0.2)
    redis_server = OwnRedis(work)
    env = {**os.environ, **provider_env, "DATABASE_URL": db_url, "REDIS_URL": redis_server.url,
           "REMIND_REDIS_NAMESPACE": f"chaos-{run}", "REMIND_SCHEDULES_DIR": str(work / "schedules"),
           "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_TICK_SECONDS": "0.5",
           "REMIND_LEASE_SECONDS": "6", "REMIND_PROVIDER_TIMEOUT": "1", "REMIND_MAX_ATTEMPTS": "12",
           "REMIND_PLATFORM_WEBHOOK_URL": platform.url, "REMIND_WEBHOOK_SECRET": SECRET,
           "REMIND_PUBLIC_URL": "https://pay.example", "REMIND_LOG_FORMAT": "text",
           "REMIND_SECRET_KEY": "chaos-" + uuid.uuid4().hex}
    settings = Settings(_env_file=None, **{k: v for k, v in env.items() if k in _SETTING_NAMES})
    remind = Remind.from_settings(settings, migrate=False)
    bind(remind, make_broker(settings))

    procs = Procs(env, work)
    failures = 0
    try:
        for _ in range(2):
            procs.start_scheduler()
            procs.start_worker()
        time.sleep(2)
        # Register over a few seconds, then confirm a random third at random moments.
        spread = 6.0
        plan = sorted((rng.uniform(0, spread), i) for i in range(n))
        confirm_at = {i: rng.uniform(1.0, 14.0) for i in rng.sample(range(n), n // 3)}
        events = [(t, "register", i) for t, i in plan] + [(plan_t + confirm_at[i], "confirm", i)
                                                         for plan_t, i in plan if i in confirm_at]
        kills = sorted(rng.uniform(3, 16) for _ in range(args.kills))
        events += [(t, "kill", -1) for t in kills] + [(9.0, "redis", -1)]
        events.sort()
        t0 = time.monotonic()
        confirmed: set[str] = set()
        for at, what, i in events:
            delay = at - (time.monotonic() - t0)
            if delay > 0:
                time.sleep(delay)
            if what == "register":
                remind.register(transaction(i, run, datetime.now(UTC)))
            elif what == "confirm":
                try:
                    remind.confirm(f"chaos_{run}_{i:05}")
                    confirmed.add(f"chaos_{run}_{i:05}")
                except AlreadySettled:
                    pass
            elif what == "kill":
                procs.kill_a_worker(rng)
            elif what == "redis":
                redis_server.restart()
        # Let everything settle: no pending transaction, nothing queued or in flight.
        deadline = time.monotonic() + (240 if not args.small else 120)
        while time.monotonic() < deadline:
            counts = remind.store.counts()
            if not counts.get("transactions_pending") and not counts.get("deliveries_queued") \
                    and not counts.get("deliveries_sending"):
                break
            time.sleep(1)
        time.sleep(2)
    finally:
        procs.stop()
        redis_server.stop()
        parent.send("stop")
        received = parent.recv()
        fakes.join(timeout=30)

    # -- the checks -------------------------------------------------------------------------------------
    with remind.store.engine.connect() as conn:
        txs = {r.id: r for r in conn.execute(text("SELECT * FROM transactions"))}
        rows = list(conn.execute(text("SELECT * FROM deliveries")))
    keys = Counter((channel, recipient, key) for channel, recipient, key, _ in received)
    duplicates = sum(count - 1 for count in keys.values() if count > 1)
    if duplicates:
        by_channel = Counter(channel for (channel, _, _), count in keys.items() for _ in range(count - 1))
        print(f"duplicates by channel: {dict(by_channel)}; e.g. {[k for k, c in keys.items() if c > 1][:3]}")
    unfinished = [r for r in rows if r.status in ("queued", "sending")]
    unexplained = [r for r in rows if r.status in ("failed", "skipped") and not r.reason]
    lost = len(unfinished) + len(unexplained) + sum(1 for t in txs.values() if t.status == "pending")
    reminded_after = sum(1 for r in rows if r.kind == "reminder" and r.status in ("sent", "delivered")
                         and txs[r.transaction_id].confirmed_at is not None
                         and r.started_at > txs[r.transaction_id].confirmed_at)
    confirmed_then_cancelled = sum(1 for t in txs.values() if t.confirmed_at is not None and t.cancelled_at is not None)
    confirmed_then_cancelled += sum(1 for t in confirmed if txs[t].status != "confirmed")
    notices = Counter((r.transaction_id, r.channel) for r in rows if r.step == "cancel" and r.kind == "notice")
    webhook_ids = Counter(tx_id for _, kind, tx_id in set(platform.events) if kind == "transaction.cancelled")
    cancelled_twice = sum(1 for c in notices.values() if c > 1) + sum(1 for c in webhook_ids.values() if c > 1)
    cancelled = [t for t in txs.values() if t.status == "cancelled"]
    webhooks_missing = sum(1 for t in cancelled if webhook_ids[t.id] == 0)
    sent = sum(1 for r in rows if r.status in ("sent", "delivered") and r.kind != "webhook")
    failed = Counter(r.reason.split(":")[0] for r in rows if r.status == "failed")
    print(f"workers killed={args.kills} redis restarts=1 confirmed={len(confirmed)} cancelled={len(cancelled)} "
          f"provider messages={len(received)} failed deliveries={sum(failed.values())} {dict(failed.most_common(4))}")
    line = (f"chaos: transactions={len(txs)} sent={sent} duplicates={duplicates} lost={lost} "
            f"reminded_after_confirm={reminded_after} confirmed_then_cancelled={confirmed_then_cancelled} "
            f"cancelled_twice={cancelled_twice} webhooks_missing={webhooks_missing}")
    print(line)
    failures = duplicates + lost + reminded_after + confirmed_then_cancelled + cancelled_twice + webhooks_missing
    if failures:
        print(f"logs kept in {work / 'logs'}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    remind.store.engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    return 1 if failures else 0


_SETTING_NAMES = {f.alias for f in Settings.model_fields.values() if f.alias}

if __name__ == "__main__":
    sys.exit(main())
