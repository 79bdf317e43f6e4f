"""The broker wiring: the only module that configures dramatiq.

Redis when ``REDIS_URL`` is set (scale out by running more ``remind worker`` processes anywhere);
otherwise dramatiq's in-memory broker, consumed by worker threads in the same process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import dramatiq
from dramatiq import Broker, Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import compute_backoff
from dramatiq.middleware import Retries
from dramatiq.rate_limits import WindowRateLimiter

from .errors import TransientSendError, Unavailable
from .inflight import RedisSlots
from .service import Remind
from .settings import Settings, parse_rate

log = logging.getLogger("remind.broker")

MAX_BACKOFF_MS = 5 * 60_000


def make_broker(settings: Settings) -> Broker:
    """A broker with retries sized to our own attempt limits (the delivery row also counts them)."""
    retries = Retries(max_retries=settings.max_attempts + 5,
                      min_backoff=settings.min_backoff_ms, max_backoff=MAX_BACKOFF_MS)
    if settings.redis_url:
        from dramatiq.brokers.redis import RedisBroker

        # A client of our own: given a URL, RedisBroker builds its pool with no timeouts of ours.
        client = redis_client(settings, send_path=False, answer=max(BROKER_ANSWER_SECONDS, settings.redis_timeout))
        broker: Broker = RedisBroker(client=client, namespace=settings.redis_namespace)
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

        backend = RedisBackend(client=redis_client(settings))
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


#: How long the broker's client waits for an answer from a Redis that is alive (its packets acknowledged): a
#: fork or fsync stall, dramatiq's maintenance pass in its dispatch script may take seconds, and a timeout there
#: restarts dramatiq's consumer and strands the messages it had fetched until the lease. A silent Redis is still
#: found within REMIND_REDIS_TIMEOUT by TCP_USER_TIMEOUT and the keepalives.
BROKER_ANSWER_SECONDS = 30.0


def redis_options(timeout: float, *, answer: float | None = None) -> dict:
    """Connection options that make a silent Redis (its packets lost: a failed-over host, a cut link) an outage
    within about ``timeout`` seconds instead of a command blocked for the kernel's ~15 minutes: the time to connect
    and to wait for each answer, and keepalives with TCP_USER_TIMEOUT (Linux) so that a pooled connection that
    died while idle is found dead by the kernel. An idle connection is pinged before use (``health_check_interval``)
    and one that turns out dropped is replaced at once, once (a ConnectionError is retried on a new connection);
    a timeout is not retried, so a silent Redis costs ``timeout``, not a multiple. Options in REDIS_URL's query
    string win (redis-py's rule). Safe for dramatiq: its consumer polls with short scripts, nothing blocks."""
    import socket

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    whole = max(1, int(timeout))
    keepalive = {getattr(socket, name): value for name, value in (
        ("TCP_KEEPIDLE", max(1, whole // 2)), ("TCP_KEEPINTVL", max(1, whole // 6)), ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(timeout * 1000))) if hasattr(socket, name)}
    return {"socket_timeout": answer or timeout, "socket_connect_timeout": timeout, "socket_keepalive": True,
            "socket_keepalive_options": keepalive, "health_check_interval": whole,
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))}


def redis_client(settings: Settings, *, send_path: bool = True, answer: float | None = None):
    """A client with :func:`redis_options` (REMIND_REDIS_TIMEOUT; ``answer``: a longer wait for an answer, the
    broker's). For the send path's limits its pool is sized for every send thread at once: redis-py's default
    pool refuses the 101st connection (MaxConnectionsError), a blocking pool waits instead."""
    import redis

    options = redis_options(settings.redis_timeout, answer=answer)
    if not send_path:
        pool = redis.ConnectionPool.from_url(settings.redis_url, **options)
    else:
        pool = redis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=settings.send_concurrency + 8,
                                                     timeout=settings.provider_timeout, **options)
    return redis.Redis(connection_pool=pool)


def make_slots(settings: Settings) -> RedisSlots:
    """The providers' in-flight limits, shared through Redis by every worker process on every machine.
    A slot outlives any send (three provider timeouts: a push to several devices), so the slots of a
    killed worker come back by themselves."""
    return RedisSlots(redis_client(settings), settings.redis_namespace, settings.inflight_limits,
                      lease=3 * settings.provider_timeout + 5)


@dataclass
class Actors:
    broker: Broker
    deliver: dramatiq.Actor
    deliver_batch: dramatiq.Actor
    queue_name: str


#: A tick's deliveries are spread over at least this many messages before batches grow, so a small
#: tick still keeps a worker process's threads (8 by default) sending in parallel.
SPREAD = 8


def chunks(ids: list[int], largest: int, spread: int = SPREAD) -> list[list[int]]:
    """Split ``ids`` into batches of at most ``largest``, and into at least ``spread`` batches when
    there are that many ids; order is kept (a transaction's channels stay together)."""
    size = max(1, min(largest, math.ceil(len(ids) / spread)))
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def bind(remind: Remind, broker: Broker) -> Actors:
    """Declare the actors on ``broker`` and point the service's enqueue at them.

    First attempts travel in batches (``remind.deliver_batch``: the database round trips are shared by
    the batch); a retry travels alone (``remind.deliver``), with dramatiq's backoff."""
    queue = remind.settings.queue_name
    remind.deliverer.throttle = make_throttle(remind.settings)
    if remind.settings.redis_url:
        remind.deliverer.slots = make_slots(remind.settings)

    def again_later(delivery_id: int, exc: TransientSendError) -> None:
        """A fresh message: a throttled delivery (and a batch member's retry) starts with none of
        dramatiq's retries used. Recorded already: if this send is lost, the lease sends it."""
        delay = _delay_ms(exc) or _first_backoff_ms(remind.settings)
        deliver_actor.send_with_options(args=(delivery_id,), delay=delay)

    def deliver(delivery_id: int) -> None:
        result = remind.deliverer.deliver_many([delivery_id])
        if delivery_id in result.throttled:
            again_later(delivery_id, result.throttled[delivery_id])
        elif delivery_id in result.retry:
            exc = result.retry[delivery_id]
            raise dramatiq.Retry(exc.reason, delay=_delay_ms(exc))

    deliver_actor = dramatiq.Actor(deliver, broker=broker, actor_name="remind.deliver", queue_name=queue,
                                   priority=0, options={})

    def deliver_batch(delivery_ids: list[int]) -> None:
        result = remind.deliverer.deliver_many(delivery_ids)
        for delivery_id, exc in {**result.retry, **result.throttled}.items():
            again_later(delivery_id, exc)

    batch_actor = dramatiq.Actor(deliver_batch, broker=broker, actor_name="remind.deliver_batch",
                                 queue_name=queue, priority=0, options={})
    largest = remind.settings.delivery_batch

    def enqueue(ids: list[int]) -> None:
        _send_or_leave_to_tick(batch_actor, chunks(list(ids), largest), remind, "deliveries")

    remind.enqueue = enqueue

    def send_events(event_ids: list[int]) -> None:
        remind.send_events(event_ids)

    # No dramatiq retries: an event's next attempt is planned in SQL and handed back by the tick.
    events_actor = dramatiq.Actor(send_events, broker=broker, actor_name="remind.send_events", queue_name=queue,
                                  priority=0, options={"max_retries": 0})

    def enqueue_events(ids: list[int]) -> None:
        _send_or_leave_to_tick(events_actor, chunks(list(ids), largest), remind, "events")

    remind.enqueue_events = enqueue_events
    return Actors(broker, deliver_actor, batch_actor, queue)


class RedisRestarts:
    """Notices that Redis lost what it held (restarted without persistence, flushed, failed over to an empty
    replica): a key this service keeps there is gone. The queued deliveries' messages went with it, so
    their leases end at once and the next tick enqueues them again, instead of after REMIND_LEASE_SECONDS.
    Messages that did survive (in a worker's memory) become duplicates, which the claim makes harmless."""

    def __init__(self, settings: Settings, remind: Remind) -> None:
        self.client = redis_client(settings, send_path=False)
        self.key = f"{settings.redis_namespace}:alive"
        self.store = remind.store
        self._known = False  # this process has seen the key (or set it) since it started

    def __call__(self) -> int:
        """Check (one round trip); returns how many deliveries are enqueued again."""
        if self.client.exists(self.key):
            self._known = True
            return 0
        expired = self.store.expire_leases(self.store.clock())
        self.store.events.expire(self.store.clock())  # events waiting in the lost messages too
        self.client.set(self.key, "1")
        if self._known and expired:
            log.warning("Redis lost its queued messages (restarted empty?): %d queued deliveries are enqueued "
                        "again", expired)
        self._known = True
        return expired


def _send_or_leave_to_tick(actor: dramatiq.Actor, batches: list[list[int]], remind: Remind, what: str) -> None:
    """Send each batch; when Redis is down, the rows are committed with a lease: end it, so the next tick
    that reaches Redis enqueues them again instead of after REMIND_LEASE_SECONDS. Then raise."""
    for n, batch in enumerate(batches):
        try:
            actor.send(batch)
        except Exception as exc:
            if Unavailable.of(exc) is None:
                raise
            left = [i for b in batches[n:] for i in b]
            try:
                remind.store.leave_to_tick(**{what: left})
            except Exception:  # noqa: BLE001 - the database too: the lease still sends them
                log.warning("%d %s not enqueued; they go out when their lease ends", len(left), what)
            raise


def _delay_ms(exc: TransientSendError) -> int | None:
    return int(exc.retry_after * 1000) if exc.retry_after is not None else None


def _first_backoff_ms(settings: Settings) -> int:
    """What dramatiq's Retries would wait before a first retry: the minimum backoff, with jitter."""
    return compute_backoff(0, factor=settings.min_backoff_ms, max_backoff=MAX_BACKOFF_MS)[1]


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
