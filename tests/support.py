"""Helpers shared by the tests: a settable clock, a harness driving the pipeline, sample data."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import text
from standardwebhooks.webhooks import Webhook

from worker.broker import InProcessWorker
from worker.service import Remind
from worker.settings import Settings
from worker.store import make_engine, upgrade

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def write_files(folder: Path, contents: dict[str, str]) -> Path:
    """``folder`` (made if missing) holding a file per name with its text: a test's schedules folder, say."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in contents.items():
        (folder / name).write_text(body)
    return folder


def unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure, not a skip)")
    pytest.skip(message)


class Clock:
    """A settable clock shared by the store and the scheduler."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def set(self, now: datetime) -> None:
        with self._lock:
            self.now = now

    def advance(self, **delta: float) -> datetime:
        self.set(self.now + timedelta(**delta))
        return self.now


@dataclass
class Harness:
    """A service wired to a real broker and database, driven tick by tick with a settable clock."""

    remind: Remind
    clock: Clock
    outbox: Path
    worker: InProcessWorker | None = None
    queue: str = "remind"
    extra: list = field(default_factory=list)

    def at(self, **delta: float) -> Harness:
        self.clock.set(T0 + timedelta(**delta))
        return self

    def tick(self, *, settle: bool = True):
        result = self.remind.tick(self.clock())
        self.drain(settle=settle)
        return result

    def drain(self, timeout: float = 30.0, *, settle: bool = True) -> None:
        """Wait until the broker is empty and no delivery is queued or in flight (retries included:
        dramatiq holds a delayed retry in the worker, where joining the queue does not see it)."""
        if not self.worker:
            return
        deadline = time.monotonic() + timeout
        while True:
            self.worker.join(self.queue, timeout_ms=30_000)
            if not settle:
                return
            counts = self.remind.store.counts()
            if not counts.get("deliveries_queued") and not counts.get("deliveries_sending"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"deliveries still in flight after {timeout}s: {counts}")
            time.sleep(0.05)

    def lines(self, tx_id: str | None = None) -> list[dict]:
        if not self.outbox.exists():
            return []
        rows = [json.loads(line) for line in self.outbox.read_text().splitlines()]
        return [r for r in rows if tx_id is None or r["transaction_id"] == tx_id]


def transaction(tx_id: str = "tx_1", **overrides) -> dict:
    data = {
        "id": tx_id,
        "customer": {"id": "c_42", "name": "Li Wei", "phone": "+8613800138000", "email": "li.wei@example.com",
                     "push_tokens": ["fcm-token-1"], "locale": "zh-CN", "timezone": "Asia/Shanghai",
                     "segment": "returning"},
        "amount": "1000.00", "currency": "CNY", "fee": "12.50", "payment_method": "Bank card ending 1234",
        "expected_arrival": "2026-11-26T10:00:00+08:00", "created_at": T0.isoformat(),
        "risk_flag": False, "metadata": {"channel": "app"},
    }
    customer = overrides.pop("customer", None)
    if customer:
        data["customer"] = {**data["customer"], **customer}
    data.update(overrides)
    return data


def make_settings(tmp_path: Path, database_url: str, **overrides) -> Settings:
    values = dict(
        database_url=database_url, redis_url=None, schedules_dir=ROOT / "schedules",
        templates_dir=ROOT / "templates", outbox=tmp_path / "outbox.jsonl", dev_sender="outbox",
        tick_seconds=1.0, lease_seconds=60.0, worker_threads=4, redis_namespace=f"remind-test-{uuid.uuid4().hex}",
        secret_key="test-secret", public_url="https://pay.example",
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def reset_database(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("TRUNCATE deliveries, transactions, suppressions, early_callbacks CASCADE"))
        else:
            for table in ("deliveries", "transactions", "suppressions", "early_callbacks"):
                conn.execute(text(f"DELETE FROM {table}"))
    engine.dispose()




def daytime_schedules(tmp_path: Path) -> Path:
    """The shipped schedules without quiet hours, for tests that run on the wall clock: otherwise a
    reminder due at night in the sample customer's zone would wait for the morning."""
    import re

    folder = tmp_path / "daytime-schedules"
    folder.mkdir(exist_ok=True)
    for path in (ROOT / "schedules").glob("*.yaml"):
        text = re.sub(r"quiet_hours:.*?\n(?=steps:)", "", path.read_text(), flags=re.S)
        (folder / path.name).write_text(text)
    return folder


def folder_digest(folder: Path) -> tuple[str, str | None]:
    """A folder's path and a hash of every file's name and bytes: the key under which a loaded
    configuration may be reused; any edit (even within one mtime tick) makes a new key."""
    import hashlib

    folder = Path(folder)
    if not folder.is_dir():
        return str(folder), None
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return str(folder.resolve()), digest.hexdigest()


def serve_platform(answer):
    """A local platform endpoint: ``answer(body, headers)`` records the webhook and returns the status."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            self.send_response(answer(body, {k.lower(): v for k, v in self.headers.items()}))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/hooks"


#: The Standard Webhooks secret the events tests sign with.
HOOK_SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"


class Platform:
    """The platform's webhook endpoint: verifies each signature; ``down`` answers 503."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.down = False
        self.server, self.url = serve_platform(self.answer)

    def answer(self, body: bytes, headers: dict) -> int:
        if self.down:
            return 503
        payload = Webhook(HOOK_SECRET).verify(body, headers)
        self.received.append({"webhook_id": headers["webhook-id"], **payload})
        return 204

    def types(self) -> list[tuple[str, str | None, str | None]]:
        return [(e["type"], e["data"]["source"], e["data"]["actor"]) for e in self.received]


@contextmanager
def private_database(name: str) -> Iterator[str]:
    """A fresh PostgreSQL database at the head schema, dropped afterwards. A missing PostgreSQL fails under
    CI=true (``unavailable``)."""
    try:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        unavailable("PostgreSQL", exc)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(make_engine(url))
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
