"""The broker wiring: the only module that configures dramatiq.

Redis when ``REDIS_URL`` is set (scale out by running more ``remind worker`` processes anywhere);
otherwise dramatiq's in-memory broker, consumed by worker threads in the same process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import dramatiq
from dramatiq import Broker, Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries
from dramatiq.rate_limits import WindowRateLimiter

from .errors import TransientSendError
from .service import Remind
from .settings import Settings, parse_rate

log = logging.getLogger("remind.broker")

MIN_BACKOFF_MS = 1_000
MAX_BACKOFF_MS = 5 * 60_000


def make_broker(settings: Settings) -> Broker:
    """A broker with retries sized to our own attempt limits (the delivery row also counts them)."""
    retries = Retries(max_retries=max(settings.max_attempts, settings.webhook_max_attempts) + 5,
                      min_backoff=MIN_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS)
    if settings.redis_url:
        from dramatiq.brokers.redis import RedisBroker

        broker: Broker = RedisBroker(url=settings.redis_url, namespace=settings.redis_namespace)
    else:
        broker = StubBroker()
    for middleware in list(broker.middleware):
        if isinstance(middleware, Retries):
            broker.middleware.remove(middleware)
    broker.add_middleware(retries)
    return broker


def make_throttle(settings: Settings) -> Callable[[str], bool] | None:
    """Provider rate limits shared by every worker process (dramatiq's WindowRateLimiter on Redis)."""
    rates = {"sms": settings.rate_sms, "email": settings.rate_email, "push": settings.rate_push}
    if not any(rates.values()):
        return None
    if settings.redis_url:
        from dramatiq.rate_limits.backends import RedisBackend

        backend = RedisBackend(url=settings.redis_url)
    else:
        from dramatiq.rate_limits.backends import StubBackend

        backend = StubBackend()
    limiters = {}
    for channel, rate in rates.items():
        if rate:
            limit, window = parse_rate(rate)
            key = f"{settings.redis_namespace}:rate:{channel}"
            limiters[channel] = WindowRateLimiter(backend, key, limit=limit, window=window)

    def throttle(channel: str) -> bool:
        limiter = limiters.get(channel)
        if limiter is None:
            return True
        with limiter.acquire(raise_on_failure=False) as acquired:
            return acquired

    return throttle


@dataclass
class Actors:
    broker: Broker
    deliver: dramatiq.Actor
    queue_name: str


def bind(remind: Remind, broker: Broker) -> Actors:
    """Declare the actors on ``broker`` and point the service's enqueue at them."""
    queue = remind.settings.queue_name
    remind.deliverer.throttle = make_throttle(remind.settings)

    def deliver(delivery_id: int) -> None:
        try:
            remind.deliver(delivery_id)
        except TransientSendError as exc:
            delay = int(exc.retry_after * 1000) if exc.retry_after is not None else None
            raise dramatiq.Retry(exc.reason, delay=delay) from None

    deliver_actor = dramatiq.Actor(deliver, broker=broker, actor_name="remind.deliver", queue_name=queue,
                                   priority=0, options={})

    def enqueue(ids: list[int]) -> None:
        for delivery_id in ids:
            deliver_actor.send(delivery_id)

    remind.enqueue = enqueue
    return Actors(broker, deliver_actor, queue)


class InProcessWorker:
    """Dramatiq worker threads inside this process: the embedded default and the tests."""

    def __init__(self, broker: Broker, threads: int = 8) -> None:
        self.broker = broker
        broker.emit_after("process_boot")
        self.worker = Worker(broker, worker_timeout=100, worker_threads=threads)

    def start(self) -> InProcessWorker:
        self.worker.start()
        return self

    def join(self, queue_name: str, timeout_ms: int | None = None) -> None:
        """Wait until the queue is empty and every message in flight is done."""
        self.broker.join(queue_name, timeout=timeout_ms)
        self.worker.join()

    def stop(self) -> None:
        self.worker.stop()
        self.broker.close()
