"""Issue #14, the silent kind: a connection in use whose packets stop arriving (a failed-over database host, a cut
link). Nothing refuses and nothing resets, so without timeouts a query or a Redis command waits for the kernel to
give up retransmitting, about 15 minutes, and the tick, the worker thread or the request with it.

Here the servers are private (tests/servers.py) and listen inside a network namespace of their own, reached through
a veth pair; ``LossyLink.drop()`` makes the pair lose every packet. While it does, each operation fails within its
setting (REMIND_DB_TCP_TIMEOUT, REMIND_REDIS_TIMEOUT; short ones here) as an outage: the API answers 503, /readyz
503 naming what is down, the scheduler's tick logs the outage once. Once the link carries packets again the same
objects work again, without a restart. Needs root (namespaces, veth, tc): under CI=true its absence is a failure."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from servers import LossyLink, PrivatePostgres, PrivateRedis, running
from sqlalchemy import text
from starlette.testclient import TestClient
from support import Clock, make_settings, transaction, unavailable

from worker import runner
from worker.broker import RedisRestarts, bind, make_broker
from worker.errors import Unavailable
from worker.service import Remind
from worker.web.app import create_app
from worker.web.health import READY_TIMEOUT

#: REMIND_DB_TCP_TIMEOUT and REMIND_REDIS_TIMEOUT here (30 s and 5 s by default), and REMIND_DB_CONNECT_TIMEOUT.
TCP_TIMEOUT = 2
REDIS_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2
#: Time on top of a bound for a loaded 2-core machine; far below the ~15 minutes an unbounded wait takes.
MARGIN = 3
API_TOKEN = "platform-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="module")
def link() -> Iterator[LossyLink]:
    try:
        lossy = LossyLink()
    except (RuntimeError, OSError) as exc:
        unavailable("a lossy link (a network namespace behind a veth pair: root, iproute2, tc)", exc)
    try:
        yield lossy
    finally:
        lossy.close()  # kills what still runs inside, removes the pair and the namespace


@pytest.fixture
def healed(link) -> Iterator[LossyLink]:
    """The link, carrying packets again when the test ends, whatever happened in it."""
    try:
        yield link
    finally:
        link.restore()


@pytest.fixture(scope="module")
def postgres_behind_link(link) -> Iterator[PrivatePostgres]:
    with running("a private PostgreSQL in a network namespace", lambda: PrivatePostgres(link)) as server:
        yield server


@pytest.fixture
def redis_behind_link(link, tmp_path) -> Iterator[PrivateRedis]:
    with running("a private redis-server in a network namespace", lambda: PrivateRedis(tmp_path, link)) as server:
        yield server


def timed(call: Callable[[], object]) -> tuple[object, float]:
    """``call``'s result, or the exception it raised, and the seconds it took."""
    started = time.monotonic()
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        result = exc
    return result, time.monotonic() - started


def first(what: str, call: Callable[[], object], seconds: float) -> tuple[object, float]:
    """Repeat ``call`` until it neither raises nor returns a falsy value; the value and when it came."""
    started = time.monotonic()
    while True:
        value, _ = timed(call)
        if value and not isinstance(value, Exception):
            return value, time.monotonic() - started
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: still {value!r} after {seconds}s")
        time.sleep(0.2)


def outages_logged(caplog, job: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{job}: the ")]


@pytest.mark.timeout(180)
def test_a_database_connection_that_goes_silent_fails_within_the_tcp_timeout_and_everything_recovers(
        tmp_path, postgres_behind_link, healed, monkeypatch, caplog):
    url = postgres_behind_link.create_database(f"remind_silent_{uuid.uuid4().hex[:8]}")
    settings = make_settings(tmp_path, url, db_tcp_timeout=TCP_TIMEOUT, db_connect_timeout=CONNECT_TIMEOUT,
                             api_tokens=API_TOKEN)
    remind = Remind.from_settings(settings, clock=Clock())
    monkeypatch.setattr(runner, "_outages", runner._Outages())  # this test's outage, not an earlier test's
    caplog.set_level(logging.INFO, logger="remind")
    engine = remind.store.engine
    try:
        # The timeout bounds silence, not work: a query longer than it, on a link that carries packets, finishes.
        with engine.connect() as conn:
            slept, took = timed(lambda: conn.execute(text(f"SELECT pg_sleep({TCP_TIMEOUT + 1.5})")).all())
        assert not isinstance(slept, Exception), slept
        assert took >= TCP_TIMEOUT + 1.5

        with TestClient(create_app(remind)) as client:
            created = client.post("/v1/transactions", json=transaction("tx_before"), headers=AUTH)
            assert created.status_code == 201, created.text
            assert client.get("/readyz").status_code == 200

            # A query waiting for its answer when the link goes silent (nothing unacknowledged: the keepalives).
            waiting: dict[str, object] = {}

            def long_query() -> None:
                with engine.connect() as conn:
                    waiting["result"], _ = timed(lambda: conn.execute(text("SELECT pg_sleep(600)")).all())
                waiting["at"] = time.monotonic()

            with engine.connect() as one, engine.connect() as two:  # two pooled connections, both just used
                one.execute(text("SELECT 1")), two.execute(text("SELECT 1"))
            query = threading.Thread(target=long_query, daemon=True)
            query.start()
            time.sleep(0.5)
            healed.drop()
            dropped = time.monotonic()

            # A Store call on the other pooled connection: its query goes out and is never acknowledged.
            shown, took = timed(lambda: remind.show("tx_before"))
            assert isinstance(shown, Exception) and Unavailable.of(shown) is not None, shown
            assert TCP_TIMEOUT - 0.5 <= took < TCP_TIMEOUT + CONNECT_TIMEOUT + MARGIN, took

            # The API answers 503 with Retry-After; /readyz 503 naming the database, within its own bound.
            response, took = timed(lambda: client.post("/v1/transactions", json=transaction("tx_during"),
                                                       headers=AUTH))
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0 and response.json()["error"] == "unavailable"
            assert took < TCP_TIMEOUT + CONNECT_TIMEOUT + MARGIN, took
            ready, took = timed(lambda: client.get("/readyz"))
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith(
                "unreachable: PostgreSQL ("), ready.text
            assert took < READY_TIMEOUT + MARGIN, took
            assert client.get("/healthz").status_code == 200

            # The scheduler's tick: each one ends within the bound, and the outage is logged once.
            for _ in range(2):
                _, took = timed(lambda: runner._tick(remind))
                assert took < TCP_TIMEOUT + CONNECT_TIMEOUT + MARGIN, took
            assert len(outages_logged(caplog, "tick")) == 1, outages_logged(caplog, "tick")
            assert "Traceback" not in caplog.text

            query.join(TCP_TIMEOUT + MARGIN)
            assert not query.is_alive(), "the query waiting for its answer still hangs"
            assert isinstance(waiting["result"], Exception) and Unavailable.of(waiting["result"]), waiting
            assert waiting["at"] - dropped < TCP_TIMEOUT + MARGIN

            # -- the link carries packets again: the same engine, app and scheduler work again by themselves ----
            healed.restore()
            again, took = first("registration after the link is back", lambda: client.post(
                "/v1/transactions", json=transaction("tx_during"), headers=AUTH).status_code == 201,
                TCP_TIMEOUT + CONNECT_TIMEOUT + MARGIN)
            ready, _ = first("/readyz after the link is back", lambda: client.get("/readyz").status_code == 200,
                             READY_TIMEOUT + MARGIN)
            assert remind.show("tx_before")["status"] == "pending" and remind.show("tx_during")["status"] == "pending"
            runner._tick(remind)
            assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("tick: working again after")]
    finally:
        healed.restore()
        engine.dispose()


@pytest.mark.timeout(120)
def test_a_redis_connection_that_goes_silent_fails_within_the_redis_timeout_and_everything_recovers(
        tmp_path, redis_behind_link, healed, monkeypatch, caplog):
    """The broker's client (enqueue), the providers' in-flight slots and rate limits (the send path) and the
    scheduler's Redis check each give up within REMIND_REDIS_TIMEOUT, as an outage; the same clients work again
    once the link does."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'remind.db'}", redis_url=redis_behind_link.url,
                             redis_timeout=REDIS_TIMEOUT, rate_sms="100/1s", api_tokens=API_TOKEN)
    remind = Remind.from_settings(settings, clock=Clock())
    broker = make_broker(settings)
    actors = bind(remind, broker)
    slots, throttle = remind.deliverer.slots, remind.deliverer.throttle
    restarts = RedisRestarts(settings, remind)
    monkeypatch.setattr(runner, "_outages", runner._Outages())
    caplog.set_level(logging.INFO, logger="remind")
    uses: dict[str, Callable[[], object]] = {
        "enqueue": lambda: actors.deliver_batch.send([1, 2]),
        "in-flight slot": lambda: slots.try_acquire("sms"),
        "rate limit": lambda: throttle("sms"),
        "restart check": restarts,
    }
    try:
        for name, use in uses.items():  # each client has a connection open
            value, _ = timed(use)
            assert not isinstance(value, Exception), (name, value)

        healed.drop()
        for name, use in uses.items():
            value, took = timed(use)
            assert isinstance(value, Exception) and Unavailable.of(value) is not None, (name, value)
            assert REDIS_TIMEOUT - 0.5 <= took < REDIS_TIMEOUT + MARGIN, (name, took)

        with TestClient(create_app(remind)) as client:
            ready, took = timed(lambda: client.get("/readyz"))
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["broker"].startswith("unreachable: Redis (") and \
                ready.json()["checks"]["database"] == "ok", ready.text
            assert took < READY_TIMEOUT + MARGIN, took

            for _ in range(2):  # the tick goes on in SQL; the Redis check's outage is logged once
                _, took = timed(lambda: runner._tick(remind, restarts))
                assert took < REDIS_TIMEOUT + MARGIN, took
            assert len(outages_logged(caplog, "Redis check")) == 1, outages_logged(caplog, "Redis check")

            healed.restore()
            for name, use in uses.items():
                first(f"{name} after the link is back", lambda use=use: use() is not False, REDIS_TIMEOUT + MARGIN)
            first("/readyz after the link is back", lambda: client.get("/readyz").status_code == 200,
                  READY_TIMEOUT + MARGIN)
        runner._tick(remind, restarts)
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Redis check: working again")]
        assert "Traceback" not in caplog.text
    finally:
        healed.restore()
        broker.close()
        remind.store.engine.dispose()
