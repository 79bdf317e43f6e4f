"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, wait

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import text

from ..broker import redis_options
from ..service import Remind
from ..store import metrics_snapshot
from .security import check_scope


class StoreCollector:
    """Collects at scrape time from SQL: correct however many scheduler and worker processes run. Every
    figure reads an index or the planner's statistics, never a whole table (see store.metrics_snapshot)."""

    def __init__(self, remind: Remind) -> None:
        self.remind = remind

    def collect(self):
        now = self.remind.store.clock()
        snap = metrics_snapshot(self.remind.store, now)
        tx = GaugeMetricFamily("remind_transactions", "Transactions by status (settled ones estimated on a large "
                               "PostgreSQL table)", labels=["status"])
        for status in ("pending", "confirmed", "cancelled", "escalated"):
            tx.add_metric([status], snap["transactions"].get(status, 0))
        yield tx
        dl = GaugeMetricFamily("remind_deliveries", "Deliveries by channel and outcome (finished ones estimated on a "
                               "large PostgreSQL table)", labels=["channel", "status"])
        for (channel, status), n in sorted(snap["deliveries"].items()):
            dl.add_metric([channel, status], n)
        yield dl
        yield GaugeMetricFamily("remind_due_steps_waiting",
                                "Pending transactions whose next step is due (counted up to 10000)",
                                value=snap["due_waiting"])
        lag = (now - snap["oldest_due"]).total_seconds() if snap["oldest_due"] else 0.0
        yield GaugeMetricFamily("remind_scheduler_lag_seconds", "Now minus the oldest due step", value=lag)
        retries = CounterMetricFamily("remind_retries", "Send attempts beyond the first, by channel",
                                      labels=["channel"])
        for channel, n in sorted(snap["retries"].items()):
            retries.add_metric([channel], n)
        yield retries
        latency = GaugeMetricFamily("remind_provider_latency_seconds",
                                    "Provider call duration over the newest 1000 sends", labels=["channel", "quantile"])
        by_channel: dict[str, list[float]] = {}
        for channel, seconds in snap["latencies"]:
            by_channel.setdefault(channel, []).append(seconds)
        for channel, values in sorted(by_channel.items()):
            values.sort()
            for q in (0.5, 0.95, 0.99):
                latency.add_metric([channel, str(q)], values[min(len(values) - 1, int(q * len(values)))])
        yield latency
        state = self.remind.config_state
        yield CounterMetricFamily("remind_config_reload_failures", "Hot reloads refused (this process)",
                                  value=state["failures"])
        yield GaugeMetricFamily("remind_config_ok", "1 when the last hot reload was accepted (this process)",
                                value=1 if state["ok"] else 0)


#: Seconds /readyz takes at most, whatever is down: its checks run at once, and one that has not answered by then
#: reports it. A probe must answer, not hang, when a dependency drops packets.
READY_TIMEOUT = 3.0
#: Seconds the Redis check waits to connect and for PONG (REMIND_REDIS_TIMEOUT when that is shorter).
REDIS_CHECK_TIMEOUT = 2.0


def _database(remind: Remind) -> str:
    """The database check: bounded by REMIND_DB_CONNECT_TIMEOUT for a new connection, REMIND_DB_TCP_TIMEOUT for a
    pooled one that went silent, and by READY_TIMEOUT for the probe waiting on it."""
    try:
        with remind.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - report, don't crash
        return f"unreachable: {_database_kind(remind)} ({type(exc).__name__})"


def _database_kind(remind: Remind) -> str:
    return {"postgresql": "PostgreSQL", "sqlite": "SQLite"}.get(remind.store.engine.dialect.name, "database")


def _broker(remind: Remind) -> str:
    """Redis answers PING, on a connection of its own (a pooled one could wait for a busy pool)."""
    import redis

    timeout = min(remind.settings.redis_timeout, REDIS_CHECK_TIMEOUT)
    options = {**redis_options(timeout), "retry": None}
    try:
        with redis.Redis.from_url(remind.settings.redis_url, **options) as client:
            client.ping()
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"unreachable: Redis ({type(exc).__name__})"


class Readiness:
    """What this process needs to serve, each ``ok`` or ``unreachable: <what> (<error type>)``: the database, and
    Redis when REDIS_URL is set (registering and confirming enqueue there). The checks run at once, each on a thread
    of its own, and the answer comes within READY_TIMEOUT: a check still waiting then is reported as such. A probe
    that comes while a check is still waiting shares it rather than start another, so a silent dependency never
    holds more than one thread and one connection per check. Error types only: /readyz is public, and an address
    or a driver message is nobody else's business."""

    def __init__(self, remind: Remind, timeout: float = READY_TIMEOUT) -> None:
        self.remind = remind
        self.timeout = timeout
        self._checks: dict[str, Callable[[Remind], str]] = {"database": _database}
        if remind.settings.redis_url:
            self._checks["broker"] = _broker
        self._running: dict[str, Future[str]] = {}
        self._lock = threading.Lock()

    def _start(self) -> dict[str, Future[str]]:
        with self._lock:
            for name, check in self._checks.items():
                running = self._running.get(name)
                if running is None or running.done():
                    self._running[name] = self._spawn(name, check)
            return dict(self._running)

    def _spawn(self, name: str, check: Callable[[Remind], str]) -> Future[str]:
        """``check`` on a daemon thread of its own: one stuck on a silent host never delays the process's exit."""
        future: Future[str] = Future()

        def run() -> None:
            try:
                future.set_result(check(self.remind))
            except BaseException as exc:  # noqa: BLE001 - the probe reports it
                future.set_exception(exc)

        threading.Thread(target=run, name=f"remind-ready-{name}", daemon=True).start()
        return future

    async def __call__(self) -> dict[str, str]:
        futures = self._start()
        done, _ = await run_in_threadpool(wait, futures.values(), self.timeout)
        silent = f"no answer within {self.timeout:g} s"
        checks = {name: _result(future, name) if future in done else None for name, future in futures.items()}
        if checks["database"] is None:
            checks["database"] = f"unreachable: {_database_kind(self.remind)} ({silent})"
        if "broker" not in checks:
            checks["broker"] = "ok (in-process)"
        elif checks["broker"] is None:
            checks["broker"] = f"unreachable: Redis ({silent})"
        state = self.remind.config_state
        # A refused reload does not make the process unready (it runs on the last good files), but it shows.
        checks["config"] = "ok" if state["ok"] else f"ok (last good kept; reload refused: {state['error']})"
        return {name: checks[name] for name in ("database", "broker", "config")}


def _result(future: Future[str], name: str) -> str:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - a check that crashed is not a reason for a 500
        return f"unreachable: {name} check failed ({type(exc).__name__})"


def router(remind: Remind) -> APIRouter:
    health = APIRouter(tags=["health"])
    registry = CollectorRegistry()
    registry.register(StoreCollector(remind))
    ready = Readiness(remind)

    @health.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @health.get("/readyz", summary="The database and the broker (Redis, when REDIS_URL is set) are reachable; "
                "answers within 3 s",
                responses={503: {"description": "A dependency is down: its check says which"}})
    async def readyz():
        checks = await ready()
        ok = all(v.startswith("ok") for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)

    def metrics_auth(request: Request) -> None:
        """Bearer REMIND_METRICS_TOKEN when set; without it open in development, refused in production
        (the counts of a live service are nobody else's business)."""
        if remind.settings.token_lists["metrics"] or remind.settings.production:
            check_scope(request, "metrics", remind.settings.token_lists)

    @health.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
                dependencies=[Depends(metrics_auth)])
    async def metrics():
        body = await run_in_threadpool(generate_latest, registry)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    return health
