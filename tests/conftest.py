"""Fixtures per real backend. A missing Redis or PostgreSQL skips on a laptop and fails under CI=true."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from worker.broker import InProcessWorker, bind, make_broker
from worker.service import Remind
from worker.settings import Settings
from worker.store import make_engine, upgrade

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure, not a skip)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    name = f"remind_test_{os.getpid()}"
    try:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        _unavailable("PostgreSQL", exc)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(make_engine(url))
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as exc:  # noqa: BLE001
        _unavailable("Redis", exc)
    return REDIS_URL


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

    def tick(self):
        result = self.remind.tick(self.clock())
        self.drain()
        return result

    def drain(self) -> None:
        if self.worker:
            self.worker.join(self.queue, timeout_ms=30_000)

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


def _reset(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("TRUNCATE deliveries, transactions CASCADE"))
        else:
            conn.execute(text("DELETE FROM deliveries"))
            conn.execute(text("DELETE FROM transactions"))
    engine.dispose()


@pytest.fixture(params=["sqlite+stub", "postgres+redis"])
def backend(request, tmp_path) -> tuple[str, str | None]:
    """(database URL, Redis URL or None): the embedded default, and the production pair."""
    if request.param == "sqlite+stub":
        return f"sqlite:///{tmp_path / 'remind.db'}", None
    pg = request.getfixturevalue("postgres_url")
    _reset(pg)
    return pg, request.getfixturevalue("redis_url")


@pytest.fixture
def make_harness(tmp_path, backend) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []
    database_url, redis = backend

    def build(*, start_worker: bool = True, senders=None, **overrides) -> Harness:
        settings = make_settings(tmp_path, database_url, redis_url=redis, **overrides)
        clock = Clock()
        remind = Remind.from_settings(settings, clock=clock, senders=senders)
        broker = make_broker(settings)
        bind(remind, broker)
        if redis:
            broker.flush_all()
        worker = InProcessWorker(broker, threads=settings.worker_threads).start() if start_worker else None
        h = Harness(remind, clock, settings.outbox, worker, settings.queue_name, [broker])
        made.append(h)
        return h

    yield build
    for h in made:
        if h.worker:
            h.worker.stop()
        else:
            h.extra[0].close()
        h.remind.store.engine.dispose()
