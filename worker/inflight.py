"""How many provider calls are in flight, and who limits them: the one place that decides it.

Two limits apply to every send:

- **per process**, :class:`SendPool`: a bounded pool of threads that runs the sends of a batch at once,
  so a worker process keeps ``REMIND_SEND_CONCURRENCY`` calls in flight and its rate is set by CPU and
  by the providers, not by latency x worker threads;
- **per provider, across every process on every machine**, :class:`ProviderSlots`: at most
  ``REMIND_INFLIGHT_SMS`` / ``_EMAIL`` / ``_PUSH`` requests in flight to that provider (Twilio allows an
  account 100 at once and answers 429 / 20429 beyond). :class:`RedisSlots` shares the limit through
  Redis; :class:`LocalSlots` is the in-process version for the embedded broker.

Why not dramatiq's ``ConcurrentRateLimiter``: it keeps a bare counter whose TTL every acquire renews,
so the slots of a worker killed mid-send are never given back while traffic flows (the chaos run kills
workers on purpose), and its WATCH/MULTI increment retries under contention from hundreds of senders.
:class:`RedisSlots` is a leased semaphore instead: each slot is a member of a sorted set scored by its
expiry, taken and given back by one Lua script each, so a dead holder's slot expires by itself.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("remind.inflight")

T = TypeVar("T")
R = TypeVar("R")


class SendPool:
    """Runs the sends of a batch concurrently on one thread pool per process.

    Parameters:
      concurrency: the most calls this process has in flight; size the senders' connection pools to it.

    Examples:
      >>> pool = SendPool(4)
      >>> pool.run(lambda n: n * 2, [1, 2, 3])
      [2, 4, 6]
    """

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="remind-send")

    def run(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items``, many at once; results in order. ``fn`` must not raise: one failed send
        is that delivery's outcome, never its batch's."""
        items = list(items)
        if len(items) <= 1:  # no thread hop for a lone retry
            return [fn(item) for item in items]
        return list(self._executor.map(fn, items))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


#: Passes through a Gather's queue to tell when what came before it is done (``Gather.flush``).
_MARK = object()


class Gather(Generic[T, R]):
    """Gathers the single calls many send threads make at the same moment into one bulk call, made by
    a thread of its own: the send pool's claims and records cost a database round trip per batch of
    calls instead of one each, while each delivery is still claimed right before its own send.

    Parameters:
      bulk: called with a list of items, returns one result per item, in order.
      most: the most items in one bulk call.

    Examples:
      >>> double = Gather(lambda items: [2 * i for i in items])
      >>> double(21)
      42
    """

    def __init__(self, bulk: Callable[[list[T]], list[R]], *, most: int = 100) -> None:
        self.bulk = bulk
        self.most = most
        self._queue: queue.SimpleQueue[tuple[T, Future[R]]] = queue.SimpleQueue()
        self._started = False
        self._start_lock = threading.Lock()

    def __call__(self, item: T) -> R:
        """The result for ``item``, once its bulk call has run; its exception if that call raised."""
        return self.submit(item).result()

    def submit(self, item: T) -> Future[R]:
        """``item`` on its way, without waiting: the caller collects the future when it needs to."""
        if not self._started:
            self._start()
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    def _start(self) -> None:
        with self._start_lock:
            if not self._started:
                threading.Thread(target=self._run, name="remind-gather", daemon=True).start()
                self._started = True

    def _run(self) -> None:
        while True:
            waiting = [self._queue.get()]
            while len(waiting) < self.most:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            marks = [future for item, future in waiting if item is _MARK]
            waiting = [(item, future) for item, future in waiting if item is not _MARK]
            try:
                results = self.bulk([item for item, _ in waiting]) if waiting else []
                if len(results) != len(waiting):
                    raise RuntimeError(f"bulk call gave {len(results)} results for {len(waiting)} items")
            except BaseException as exc:  # noqa: BLE001 - each caller gets it, and this thread lives on
                for _, future in waiting:
                    future.set_exception(exc)
            else:
                for (_, future), result in zip(waiting, results, strict=False):
                    future.set_result(result)
            for future in marks:
                future.set_result(None)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything submitted before now has been through its bulk call (at exit: a
        slot's return that nobody waits for still reaches Redis)."""
        if self._started:
            self._queue.put((_MARK, mark := Future()))
            mark.result(timeout)


class ProviderSlots(Protocol):
    """A limit on requests in flight per channel's provider, shared by whoever holds this object."""

    def acquire(self, channel: str, wait: float) -> str | None:
        """A slot for one request, waiting up to ``wait`` seconds; None when none came free (the
        delivery is then handed back as throttled, without using one of its attempts)."""
        ...

    def release(self, channel: str, slot: str) -> None:
        """Give the slot back as soon as the provider has answered."""
        ...


class Unlimited:
    """No limit: channels without one (webhooks) and settings of 0."""

    def acquire(self, channel: str, wait: float) -> str | None:
        return "-"

    def release(self, channel: str, slot: str) -> None:
        return None


class LocalSlots:
    """Per-channel semaphores in this process: the embedded broker, where one process is everything."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self.limits = {c: n for c, n in limits.items() if n}
        self._semaphores = {c: threading.BoundedSemaphore(n) for c, n in self.limits.items()}

    def acquire(self, channel: str, wait: float) -> str | None:
        semaphore = self._semaphores.get(channel)
        if semaphore is None:
            return "-"
        return "local" if semaphore.acquire(timeout=wait) else None

    def release(self, channel: str, slot: str) -> None:
        semaphore = self._semaphores.get(channel)
        if semaphore is not None and slot == "local":
            semaphore.release()


#: Drop expired slots, then grant each request in order while its channel has room. One call for
#: many requests (``Gather``): KEYS the channels' sets, ARGV the lease, each key's limit, then pairs of
#: (key index, slot id). Redis's own clock, so machines whose clocks differ agree on expiry.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local room = {}
for j = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[j], '-inf', now)
  room[j] = tonumber(ARGV[1 + j]) - redis.call('ZCARD', KEYS[j])
end
local taken = {}
for i = 2 + #KEYS, #ARGV, 2 do
  local j = tonumber(ARGV[i])
  if room[j] > 0 then
    redis.call('ZADD', KEYS[j], now + lease, ARGV[i + 1])
    room[j] = room[j] - 1
    taken[#taken + 1] = 1
  else
    taken[#taken + 1] = 0
  end
end
for j = 1, #KEYS do
  redis.call('PEXPIRE', KEYS[j], lease)
end
return taken
"""


def _warn_if_failed(future: Future) -> None:
    """Nobody waits for a slot's return: a failure is only logged, and the slot expires with its lease."""
    if future.exception() is not None:
        log.warning("an in-flight slot was not given back (%s); it expires with its lease",
                    type(future.exception()).__name__)


class RedisSlots:
    """Per-channel leased semaphores on Redis, shared by every worker process on every machine.

    The slots the send threads take and give back at the same moment travel together (``Gather``):
    one script call grants many, one pipeline gives many back, so a delivery costs a fraction of a
    Redis round trip instead of two.

    Parameters:
      client: a ``redis.Redis`` (thread-safe).
      namespace: the key prefix (``REMIND_REDIS_NAMESPACE``).
      limits: the most requests in flight per channel; channels absent or 0 are unlimited.
      lease: seconds after which a slot whose holder never gave it back (a killed worker) is free again;
        longer than any send can take.
    """

    def __init__(self, client, namespace: str, limits: Mapping[str, int], *, lease: float) -> None:
        self.client = client
        self.limits = {c: n for c, n in limits.items() if n}
        self.keys = {c: f"{namespace}:inflight:{c}" for c in self.limits}
        self.lease_ms = int(lease * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        # slot ids: unique across processes by the prefix, within this one by the counter (a uuid4 per slot
        # cost 2 % of a delivery's CPU); the counter's next() is atomic under the GIL
        self._prefix = uuid.uuid4().hex[:16]
        self._serial = itertools.count()
        self._take = Gather(self._take_many)
        self._give = Gather(self._give_many)
        atexit.register(self._give.flush)  # slots given back just before the process ends reach Redis

    def try_acquire(self, channel: str) -> str | None:
        """A slot now, or None when the channel's limit is reached."""
        if channel not in self.limits:
            return "-"
        return self._take(channel)

    def _take_many(self, channels: list[str]) -> list[str | None]:
        keys = sorted(set(channels))
        index = {c: i + 1 for i, c in enumerate(keys)}
        slots = [f"{self._prefix}{next(self._serial):x}" for _ in channels]
        args: list[object] = [self.lease_ms, *(self.limits[c] for c in keys)]
        for channel, slot in zip(channels, slots, strict=True):
            args += [index[channel], slot]
        taken = self._acquire(keys=[self.keys[c] for c in keys], args=args)
        return [slot if ok else None for slot, ok in zip(slots, taken, strict=True)]

    def _give_many(self, held: list[tuple[str, str]]) -> list[None]:
        by_key: dict[str, list[str]] = {}
        for channel, slot in held:
            by_key.setdefault(self.keys[channel], []).append(slot)
        pipe = self.client.pipeline(transaction=False)
        for key, slots in by_key.items():
            pipe.zrem(key, *slots)
        pipe.execute()
        return [None] * len(held)

    def acquire(self, channel: str, wait: float) -> str | None:
        deadline = time.monotonic() + wait
        pause = 0.005
        while True:
            slot = self.try_acquire(channel)
            if slot is not None:
                return slot
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(left, pause * (0.5 + random.random())))  # jitter: waiters do not poll in step
            pause = min(pause * 2, 0.05)

    def release(self, channel: str, slot: str) -> None:
        """Never raises: the send is over whatever Redis says, and a slot not given back expires."""
        if channel in self.keys:
            self._give.submit((channel, slot)).add_done_callback(_warn_if_failed)
