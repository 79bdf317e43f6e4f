"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import text

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


#: Seconds the Redis check waits to connect and for PONG: a probe must answer, not hang, when Redis drops packets.
REDIS_CHECK_TIMEOUT = 2.0


def _ready(remind: Remind) -> dict[str, str]:
    """What this process needs to serve, each ``ok`` or ``unreachable: <what> (<error type>)``: the database
    (bounded by REMIND_DB_CONNECT_TIMEOUT), and Redis when REDIS_URL is set (registering and confirming enqueue
    there). Error types only: /readyz is public, and an address or a driver message is nobody else's business."""
    checks = {}
    try:
        with remind.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, don't crash
        kind = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}.get(remind.store.engine.dialect.name, "database")
        checks["database"] = f"unreachable: {kind} ({type(exc).__name__})"
    if remind.settings.redis_url:
        try:
            import redis

            with redis.Redis.from_url(remind.settings.redis_url, socket_timeout=REDIS_CHECK_TIMEOUT,
                                      socket_connect_timeout=REDIS_CHECK_TIMEOUT) as client:
                client.ping()
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["broker"] = f"unreachable: Redis ({type(exc).__name__})"
    else:
        checks["broker"] = "ok (in-process)"
    state = remind.config_state
    # A refused reload does not make the process unready (it runs on the last good files), but it shows.
    checks["config"] = "ok" if state["ok"] else f"ok (last good kept; reload refused: {state['error']})"
    return checks


def router(remind: Remind) -> APIRouter:
    health = APIRouter(tags=["health"])
    registry = CollectorRegistry()
    registry.register(StoreCollector(remind))

    @health.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @health.get("/readyz", summary="The database and the broker (Redis, when REDIS_URL is set) are reachable",
                responses={503: {"description": "A dependency is down: its check says which"}})
    async def readyz():
        checks = await run_in_threadpool(_ready, remind)
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
