"""Issue #14, for real: PostgreSQL is stopped (`pg_ctl stop -m fast`) under running `remind web`,
`remind scheduler` and `remind worker` processes and started again; Redis is killed and restarted under
running scheduler and worker processes. While a server is down the API answers 503 with Retry-After, the
confirmation page asks to try again, the CLI exits 75 with one line; afterwards the same processes (never
restarted) catch up by themselves: nothing lost, nothing sent twice, each deadline settled once.

The servers are private (tests/servers.py), on free ports: the machine's shared ones are never stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from servers import PrivatePostgres, PrivateRedis, SilentServer, free_port, running
from starlette.testclient import TestClient
from support import ROOT, T0, Clock, make_settings, transaction

from worker.service import Remind
from worker.store import make_engine, upgrade
from worker.web.app import create_app

BIN = Path(sys.executable).parent
SECRET = "outage-" + uuid.uuid4().hex
API_TOKEN = "platform-token-" + uuid.uuid4().hex

#: Seconds-scale ladder: a push nudge, an SMS reminder, an email when the deadline cancels.
LADDER = """\
name: outage
match: {}
priority: 100
steps:
  - after: 2s
    channels: [push]
    template: nudge
  - after: 20s
    channels: [sms]
    template: reminder
cancel:
  after: 40s
  template: cancelled
  reason: not_confirmed
  channels: [email]
"""


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this module's own (initdb + pg_ctl on a free port), removed at the end."""
    with running("a private PostgreSQL", PrivatePostgres) as server:
        yield server


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    with running("a private redis-server", lambda: PrivateRedis(tmp_path)) as server:
        yield server


def wait_for(what: str, predicate: Callable[[], object], seconds: float, every: float = 0.2):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(every)


class Processes:
    """`remind ...` processes with their output in files, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(BIN / "remind"), *args], env=self.env, cwd=self.workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)[-3000:]}" for name in self.procs)

    def wait_ready(self, name: str, line: str, seconds: float = 60) -> None:
        def ready():
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited {self.procs[name].returncode}:\n{self.log(name)[-3000:]}")
            return line in self.log(name)

        wait_for(f"{name} to say {line!r}", ready, seconds)

    def dead(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def service_env(tmp_path: Path, database_url: str, redis_url: str, twilio, sendgrid, fcm, *, ladder: str = LADDER,
                **extra: str) -> dict:
    """Production: PostgreSQL, Redis, the providers' fakes as the providers, no stand-in sender."""
    schedules = tmp_path / "schedules"
    schedules.mkdir(exist_ok=True)
    (schedules / "outage.yaml").write_text(ladder)
    ours = ("REMIND_", "DATABASE_URL", "REDIS_URL", "PORT", "TWILIO_", "SENDGRID_", "FCM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update({
        "DATABASE_URL": database_url, "REDIS_URL": redis_url, "REMIND_REDIS_NAMESPACE": f"outage-{uuid.uuid4().hex}",
        "REMIND_SCHEDULES_DIR": str(schedules), "REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
        "REMIND_SECRET_KEY": SECRET, "REMIND_PUBLIC_URL": "https://pay.example", "REMIND_API_TOKEN": API_TOKEN,
        "REMIND_TICK_SECONDS": "0.5", "REMIND_RETENTION_DAYS": "0",
        "TWILIO_ACCOUNT_SID": twilio.account_sid, "TWILIO_AUTH_TOKEN": twilio.auth_token,
        "TWILIO_MESSAGING_SERVICE_SID": twilio.messaging_service_sid, "TWILIO_API_BASE_URL": twilio.base_url,
        "SENDGRID_API_KEY": sendgrid.api_key, "SENDGRID_FROM_EMAIL": "payments@pay.example",
        "SENDGRID_API_BASE_URL": sendgrid.base_url,
        "FCM_PROJECT_ID": fcm.project_id, "FCM_CREDENTIALS_FILE": str(fcm.credentials_file),
        "FCM_API_BASE_URL": fcm.base_url,
    })
    env.update(extra)
    return env


def customer_tx(tx_id: str, n: int, created_at: datetime) -> dict:
    """A transaction whose customer has their own phone, email and device, so each message names its step."""
    return transaction(tx_id, created_at=created_at.isoformat(), customer={
        "id": f"c_{tx_id}", "phone": f"+86138001380{n:02}", "email": f"{tx_id}@example.com",
        "push_tokens": [f"device-{tx_id}"], "locale": "en", "timezone": "UTC"})


def sent_to(twilio, sendgrid, fcm, but: str = "registered_late") -> Counter:
    """Every message the providers accepted, by (channel, recipient), less those to ``but``'s customer (whose
    nudge may or may not go out before it is confirmed)."""
    sent = Counter([("sms", m.to) for m in twilio.messages] + [("email", to) for m in sendgrid.messages for to in m.to]
                   + [("push", m.token) for m in fcm.messages])
    return Counter({key: n for key, n in sent.items() if but not in key[1] and key[1] != "+8613800138009"})


def db_rows(database_url: str) -> tuple[dict[str, dict], list[dict]]:
    from sqlalchemy import text

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            txs = {r["id"]: dict(r) for r in conn.execute(text("SELECT * FROM transactions")).mappings()}
            rows = [dict(r) for r in conn.execute(text("SELECT * FROM deliveries ORDER BY id")).mappings()]
    finally:
        engine.dispose()
    return txs, rows


def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "remind"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_postgres_stopped_and_started_under_the_running_service(tmp_path, private_postgres, private_redis,
                                                                 twilio_fake, sendgrid_fake, fcm_fake):
    database_url = private_postgres.create_database(f"remind_pg_outage_{uuid.uuid4().hex[:8]}")
    upgrade(make_engine(database_url))
    twilio_fake.latency = (8, 8)  # the SMS sent just before the outage is answered during it
    port = free_port()
    env = service_env(tmp_path, database_url, private_redis.url, twilio_fake, sendgrid_fake, fcm_fake)
    procs = Processes(env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    http = httpx.Client(base_url=base, timeout=30)
    try:
        procs.start("web", "web", "--port", str(port))
        procs.start("scheduler", "scheduler")
        procs.start("worker", "worker", "-p", "1", "-t", "4")
        wait_for("the web process", lambda: _healthy(http), 60)
        procs.wait_ready("scheduler", "scheduler ticking", 60)
        procs.wait_ready("worker", "worker ready", 60)

        # Registered at t0, placed on the ladder so that the database stops before t0 + 12 s and stays down
        # past t0 + 18 s: due_soon's SMS (t0 + 15) and cancels_in_outage's deadline (t0 + 16) fall inside the
        # outage; confirms' deadline (t0 + 40) and due_soon's (t0 + 35) come well after it.
        t0 = datetime.now(UTC)
        plan = {"due_soon": t0 - timedelta(seconds=5), "cancels_in_outage": t0 - timedelta(seconds=24),
                "confirms": t0}
        for n, (tx_id, created) in enumerate(plan.items()):
            created_resp = http.post("/v1/transactions", json=customer_tx(tx_id, n, created), headers=auth)
            assert created_resp.status_code == 201, created_resp.text
        started = time.monotonic()
        # Before the outage: the nudges of due_soon and confirms, recorded as sent; the SMS of cancels_in_outage
        # (its nudge was superseded) is at Twilio, which answers only once the database is gone.
        before = {("push", "device-due_soon"): 1, ("push", "device-confirms"): 1}
        wait_for("the messages due before the outage", lambda: sent_to(twilio_fake, sendgrid_fake, fcm_fake) == before,
                 10)
        wait_for("the pushes to be recorded", lambda: all(r["status"] == "sent" for r in db_rows(database_url)[1]
                                                          if r["channel"] == "push" and r["status"] != "skipped"), 10)
        wait_for("the SMS to be at Twilio", lambda: twilio_fake.in_flight == 1, 10, every=0.05)
        link = urlsplit(next(m.data["confirm_url"] for m in fcm_fake.messages if m.token == "device-confirms")).path
        assert http.get(link).status_code == 200  # the customer opens the reminder's link: the Confirm button
        assert time.monotonic() - started < 12, "too slow to stop the database before the SMS falls due"

        private_postgres.stop("fast")
        stopped = time.monotonic()
        twilio_fake.latency = (0, 0)  # the SMS in flight still waits out its 8 s; later ones do not
        try:
            # -- the outage, as each face shows it ----------------------------------------------------------
            done = cli(env, tmp_path, "tx", "confirm", "confirms")
            assert done.returncode == 75, done.stdout + done.stderr
            line, = done.stderr.splitlines()
            assert line.startswith("remind: the database is unreachable (") and "Traceback" not in done.stderr
            assert line.endswith("try again in a minute (repeating is safe)") and done.stdout == ""

            for response in (http.post("/v1/transactions", json=customer_tx("registered_late", 9, t0), headers=auth),
                             http.get("/v1/transactions/confirms", headers=auth),
                             http.post("/v1/transactions/confirms/confirm", headers=auth)):
                assert response.status_code == 503, response.text
                assert int(response.headers["retry-after"]) > 0
                assert response.json()["error"] == "unavailable"
            page = http.post(link)  # the customer presses Confirm while the database is down
            assert page.status_code == 503 and int(page.headers["retry-after"]) > 0
            assert "Please try again in a minute" in page.text and "press the button again" in page.text
            assert http.get("/healthz").status_code == 200  # alive, so no supervisor restarts it
            assert http.get("/readyz").status_code == 503  # but not ready: a balancer may route around it

            # Down past the due SMS and the deadline, and for several seconds whatever the machine's pace.
            while time.monotonic() < max(stopped + 6, started + 18):
                time.sleep(0.2)
                assert not procs.dead(), procs.logs()
        finally:
            private_postgres.start()

        # -- recovery: the same processes, never restarted ----------------------------------------------------
        assert not procs.dead(), procs.logs()
        confirmed = wait_for("the page's confirmation to land once the database is back",
                             lambda: _try_confirm(http, link), 30, every=0.5)
        assert "Transfer confirmed" in confirmed.text
        again = http.post("/v1/transactions", json=customer_tx("registered_late", 9, t0), headers=auth)
        assert again.status_code == 201, again.text  # the refused registration, repeated, lands
        assert http.post("/v1/transactions/confirms/confirm", headers=auth).json()["status"] == "confirmed"
        done = cli(env, tmp_path, "tx", "confirm", "registered_late")
        assert done.returncode == 0 and done.stdout == "registered_late: confirmed\n", done.stdout + done.stderr

        after = {**before, ("sms", "+8613800138001"): 1, ("sms", "+8613800138000"): 1,
                 ("email", "cancels_in_outage@example.com"): 1, ("email", "due_soon@example.com"): 1}
        # due_soon's SMS and the cancellation of cancels_in_outage come once the database is back; due_soon's
        # own deadline (t0 + 35 s) cancels it with an email.
        wait_for("the reminders and cancellations due during the outage",
                 lambda: sent_to(twilio_fake, sendgrid_fake, fcm_fake) == after, 60, every=0.5)
        time.sleep(2)  # nothing more comes: no second copy of anything
        assert sent_to(twilio_fake, sendgrid_fake, fcm_fake) == after
        assert not procs.dead(), procs.logs()
        txs, rows = db_rows(database_url)
        assert {k: v["status"] for k, v in txs.items()} == {
            "due_soon": "cancelled", "cancels_in_outage": "cancelled", "confirms": "confirmed",
            "registered_late": "confirmed"}
        assert not [r for r in rows if r["status"] in ("queued", "sending", "failed")], rows
        assert Counter((r["transaction_id"], r["step"]) for r in rows if r["step"] == "cancel") == {
            ("due_soon", "cancel"): 1, ("cancels_in_outage", "cancel"): 1}
        assert not twilio_fake.rejected and not sendgrid_fake.rejected and not fcm_fake.rejected
    finally:
        http.close()
        procs.stop()
        if not private_postgres.running():
            private_postgres.start()
    # The SMS Twilio accepted while the database was down is recorded sent once it is back, not "outcome unknown".
    assert "the results of 1 sends wait for the database" in procs.log("worker"), procs.logs()
    scheduler_log = procs.log("scheduler")
    assert "tick: the database is unreachable (" in scheduler_log and "tick: working again after" in scheduler_log
    assert "Traceback" not in scheduler_log + procs.log("web"), procs.logs()  # one line, not one traceback per tick


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def _try_confirm(http: httpx.Client, link: str):
    """The customer presses the button again: the response once it is no longer 'try again'."""
    response = http.post(link)
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    return response


@pytest.mark.timeout(300)
def test_redis_killed_and_restarted_under_the_running_scheduler_and_worker(tmp_path, private_postgres, private_redis,
                                                                           twilio_fake, sendgrid_fake, fcm_fake):
    """Redis runs without persistence here, as on the machine: its restart loses every message it held. The
    deliveries behind them are in SQL, so they go out once, when Redis is back; like what the scheduler could not
    hand over while Redis was down goes out as soon as it is back; both without waiting for the lease."""
    from worker.service import Remind
    from worker.settings import Settings

    database_url = private_postgres.create_database(f"remind_redis_outage_{uuid.uuid4().hex[:8]}")
    upgrade(make_engine(database_url))
    # One worker thread and providers at ~1 s, so most of the first burst still waits in Redis when it dies.
    fcm_fake.latency = (0.8, 1.0)
    lease = 300  # the default REMIND_LEASE_SECONDS: nothing here may wait for it
    env = service_env(tmp_path, database_url, private_redis.url, twilio_fake, sendgrid_fake, fcm_fake,
                      ladder=LADDER.replace("after: 20s", "after: 10m").replace("after: 40s", "after: 20m"))
    remind = Remind.from_settings(Settings(_env_file=None, database_url=database_url, secret_key=SECRET,
                                           schedules_dir=tmp_path / "schedules", templates_dir=ROOT / "templates",
                                           public_url="https://pay.example", dev_sender="outbox",
                                           outbox=tmp_path / "unused.jsonl"), migrate=False)
    procs = Processes(env, tmp_path)
    try:
        procs.start("scheduler", "scheduler")
        procs.start("worker", "worker", "-p", "1", "-t", "1")
        procs.wait_ready("scheduler", "scheduler ticking", 60)
        procs.wait_ready("worker", "worker ready", 60)

        def register(prefix: str, count: int, first: int) -> list[str]:
            now = datetime.now(UTC)
            ids = [f"{prefix}{i}" for i in range(count)]
            for i, tx_id in enumerate(ids):  # the nudge (2 s) is due at once
                remind.register(customer_tx(tx_id, first + i, now - timedelta(seconds=2)))
            return ids

        def pushed() -> Counter:
            return Counter(m.token for m in fcm_fake.messages)

        burst = register("burst_", 16, 0)
        wait_for("the first sends of the burst", lambda: len(fcm_fake.messages) >= 1, 30, every=0.05)
        private_redis.kill()
        killed = time.monotonic()
        in_outage = register("outage_", 4, 20)  # due while Redis is down: committed, not handed over
        confirmed_in_outage = register("confirmed_", 1, 30)
        remind.confirm(confirmed_in_outage[0])  # the database is up: confirming does not need Redis
        while time.monotonic() < killed + 6:
            time.sleep(0.2)
            assert not procs.dead(), procs.logs()
        private_redis.start()
        restarted = time.monotonic()

        expected = Counter({f"device-{tx_id}": 1 for tx_id in burst + in_outage})
        # Both what Redis lost and what could not reach it go out at once, not after the 5-minute lease.
        wait_for("every nudge", lambda: pushed() == expected, 45, every=0.5)
        assert time.monotonic() - restarted < lease
        time.sleep(2)
        assert pushed() == expected  # nothing twice, and nothing for the transaction confirmed meanwhile
        assert not procs.dead(), procs.logs()
        counts = remind.store.counts()
        assert not counts.get("deliveries_queued") and not counts.get("deliveries_sending"), counts
        assert not [e for t in burst + in_outage for e in remind.show(t)["timeline"] if e["status"] == "failed"]
    finally:
        procs.stop()
        remind.store.engine.dispose()
    assert "Redis lost its queued messages (restarted empty?)" in procs.log("scheduler"), procs.logs()
    assert "Traceback" not in procs.log("scheduler"), procs.logs()
    print(procs.logs())


# -- hosts that take the connection and never answer: an outage within the timeouts, never a hang ----------

#: REMIND_DB_CONNECT_TIMEOUT below (psycopg alone waits 130 s for such a host); MARGIN covers a loaded machine.
CONNECT_TIMEOUT = 2
MARGIN = 10


def test_a_database_host_that_never_answers_is_an_outage_within_the_connect_timeout(tmp_path):
    """A host that drops packets, or a proxy that accepts and never answers, leaves psycopg waiting for the
    server's first byte: the API answers 503 with Retry-After and /readyz 503 within REMIND_DB_CONNECT_TIMEOUT."""
    with SilentServer() as silent:
        url = f"postgresql+psycopg://remind@127.0.0.1:{silent.port}/remind"
        settings = make_settings(tmp_path, url, db_connect_timeout=CONNECT_TIMEOUT, api_tokens=API_TOKEN)
        remind = Remind.from_settings(settings, migrate=False, clock=Clock())
        with TestClient(create_app(remind)) as client:
            started = time.monotonic()
            response = client.post("/v1/transactions", json=transaction("tx_silent", created_at=T0.isoformat()),
                                   headers={"Authorization": f"Bearer {API_TOKEN}"})
            took = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0 and response.json()["error"] == "unavailable"
            assert response.json()["detail"].startswith("the database is unreachable (")
            assert CONNECT_TIMEOUT - 0.5 <= took < CONNECT_TIMEOUT + MARGIN, took

            started = time.monotonic()
            ready = client.get("/readyz")
            took = time.monotonic() - started
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            assert ready.json()["checks"]["database"] == "unreachable: PostgreSQL (OperationalError)"
            assert CONNECT_TIMEOUT - 0.5 <= took < CONNECT_TIMEOUT + MARGIN, took
            assert client.get("/healthz").status_code == 200
        remind.store.engine.dispose()
        assert silent.accepted >= 2  # each attempt reached the host and waited for it: nothing was refused


def test_a_connect_timeout_in_the_database_url_wins_over_the_setting():
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    with SilentServer() as silent:
        engine = make_engine(f"postgresql://remind@127.0.0.1:{silent.port}/remind?connect_timeout=4",
                             connect_timeout=CONNECT_TIMEOUT)
        started = time.monotonic()
        with pytest.raises(OperationalError, match="connection timeout expired"), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        took = time.monotonic() - started
        engine.dispose()
    assert 3.5 <= took < 4 + MARGIN, took


def test_the_cli_exits_75_within_the_connect_timeout_when_the_database_never_answers(tmp_path, monkeypatch):
    """`remind tx confirm` (and `remind db upgrade`, the release step) print one line and exit 75, after about
    REMIND_DB_CONNECT_TIMEOUT seconds rather than psycopg's 130."""
    from click.testing import CliRunner

    from worker.cli import main

    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(("REMIND_", "DATABASE_URL", "REDIS_URL"))]:
        monkeypatch.delenv(key)
    with SilentServer() as silent:
        env = {"DATABASE_URL": f"postgresql://remind@127.0.0.1:{silent.port}/remind",
               "REMIND_DB_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT), "REMIND_SECRET_KEY": SECRET,
               "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"), "REMIND_TEMPLATES_DIR": str(ROOT / "templates")}
        for args in (["tx", "confirm", "tx_1"], ["db", "upgrade"]):
            started = time.monotonic()
            done = CliRunner().invoke(main, args, env=env)
            took = time.monotonic() - started
            assert done.exit_code == 75, (args, done.output)
            line, = done.stderr.splitlines()
            assert line.startswith("remind: the database is unreachable (") and "connection timeout expired" in line
            assert done.stdout == ""
            assert CONNECT_TIMEOUT - 0.5 <= took < CONNECT_TIMEOUT + MARGIN, (args, took)
        assert silent.accepted == 2  # one connection each, and each waited


def test_readyz_names_redis_while_it_is_down_and_is_ready_again_when_it_is_back(tmp_path, private_redis):
    """The web process registers and confirms through Redis when REDIS_URL is set: killed, /readyz answers 503
    naming Redis (and /healthz stays 200); back on the same port, 200 again, without a restart."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'ready.db'}", redis_url=private_redis.url)
    remind = Remind.from_settings(settings, clock=Clock())
    with TestClient(create_app(remind)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "config": "ok"}

        private_redis.kill()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert ready.json()["checks"] == {"database": "ok", "broker": "unreachable: Redis (ConnectionError)",
                                          "config": "ok"}
        assert client.get("/healthz").status_code == 200

        private_redis.start()
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["broker"] == "ok", ready.text
    remind.store.engine.dispose()


def test_readyz_answers_when_redis_accepts_and_never_answers(tmp_path):
    with SilentServer() as silent:
        settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'ready.db'}",
                                 redis_url=f"redis://127.0.0.1:{silent.port}/0")
        remind = Remind.from_settings(settings, clock=Clock())
        with TestClient(create_app(remind)) as client:
            started = time.monotonic()
            ready = client.get("/readyz")
            took = time.monotonic() - started
        remind.store.engine.dispose()
        assert ready.status_code == 503
        assert ready.json()["checks"]["broker"] == "unreachable: Redis (TimeoutError)"
        assert took < MARGIN, took
        assert silent.accepted == 1


def test_readyz_checks_at_once_and_answers_within_its_bound_when_postgres_and_redis_both_never_answer(tmp_path):
    """One after the other, the default timeouts made a probe wait REMIND_DB_CONNECT_TIMEOUT (5 s) and then the
    Redis check (2 s): a balancer's probe gave up first, knowing nothing. The checks run at once and /readyz
    answers within READY_TIMEOUT naming both; a probe that comes while a check still waits shares it, so a silent
    host does not collect a connection per probe."""
    from worker.web.health import READY_TIMEOUT

    with SilentServer() as silent_pg, SilentServer() as silent_redis:
        settings = make_settings(tmp_path, f"postgresql+psycopg://remind@127.0.0.1:{silent_pg.port}/remind",
                                 redis_url=f"redis://127.0.0.1:{silent_redis.port}/0", api_tokens=API_TOKEN)
        assert settings.db_connect_timeout > READY_TIMEOUT  # the defaults: the bound, not the check, ends the wait
        remind = Remind.from_settings(settings, migrate=False, clock=Clock())
        with TestClient(create_app(remind)) as client:
            started = time.monotonic()
            ready = client.get("/readyz")
            took = time.monotonic() - started
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            silent = f"no answer within {READY_TIMEOUT:g} s"
            assert ready.json()["checks"] == {"database": f"unreachable: PostgreSQL ({silent})",
                                              "broker": "unreachable: Redis (TimeoutError)", "config": "ok"}
            assert READY_TIMEOUT - 0.5 <= took < READY_TIMEOUT + 1.5, took

            started = time.monotonic()
            again = client.get("/readyz")  # the first probe's database check is still waiting for its connection
            took = time.monotonic() - started
            assert again.status_code == 503, again.text
            assert again.json()["checks"]["database"].startswith("unreachable: PostgreSQL (")
            assert again.json()["checks"]["broker"].startswith("unreachable: Redis (")
            assert took < READY_TIMEOUT + 1.5, took
        remind.store.engine.dispose()
        assert silent_pg.accepted == 1 and silent_redis.accepted == 2
