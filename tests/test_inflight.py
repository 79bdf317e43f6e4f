"""The providers' in-flight limits: shared by every worker process through Redis, and never lost to a
worker that dies holding a slot."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import redis

from worker.inflight import LocalSlots, RedisSlots, SendPool

#: One worker process: 16 threads each take a slot 15 times, count themselves in flight in Redis while
#: they hold it, and print the most they saw in flight at once (across every process).
_HAMMER = """
import json, sys, threading, time, redis
from worker.inflight import RedisSlots
url, namespace, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = redis.Redis.from_url(url)
slots = RedisSlots(client, namespace, {"sms": limit}, lease=30)
seen, refused = [0], [0]
def run():
    for _ in range(15):
        slot = slots.acquire("sms", wait=10)
        if slot is None:
            refused[0] += 1
            continue
        now = client.incr(namespace + ":count")
        seen[0] = max(seen[0], now)
        time.sleep(0.01)
        client.decr(namespace + ":count")
        slots.release("sms", slot)
threads = [threading.Thread(target=run) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"max": seen[0], "refused": refused[0]}))
"""


def test_the_limit_holds_across_two_worker_processes(redis_url):
    namespace = f"remind-test-{uuid.uuid4().hex}"
    procs = [subprocess.Popen([sys.executable, "-c", _HAMMER, redis_url, namespace, "5"], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    most = max(r["max"] for r in results)
    assert most == 5  # 32 threads in two processes wanted more; the limit let exactly 5 through at once
    assert sum(r["refused"] for r in results) == 0  # everyone got a turn within the wait
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(f"{namespace}:inflight:sms") == 0  # every slot was given back
    client.delete(f"{namespace}:inflight:sms", f"{namespace}:count")


def test_a_dead_holders_slots_come_back_after_the_lease(redis_url):
    client = redis.Redis.from_url(redis_url)
    namespace = f"remind-test-{uuid.uuid4().hex}"
    dead = RedisSlots(client, namespace, {"sms": 2}, lease=0.5)
    assert dead.try_acquire("sms") and dead.try_acquire("sms")  # then the process is killed
    alive = RedisSlots(client, namespace, {"sms": 2}, lease=0.5)
    assert alive.acquire("sms", wait=0.1) is None
    started = time.monotonic()
    slot = alive.acquire("sms", wait=3)
    assert slot is not None and 0.2 < time.monotonic() - started < 2
    assert alive.try_acquire("email") == "-"  # a channel without a limit is never held back
    alive.release("sms", slot)
    client.delete(f"{namespace}:inflight:sms")


def test_local_slots_and_the_send_pool_overlap_calls_up_to_the_limit():
    slots = LocalSlots({"sms": 3, "push": 0})
    pool = SendPool(12)
    lock, now, most = threading.Lock(), [0], [0]

    def send(channel: str) -> str:
        slot = slots.acquire(channel, wait=5)
        assert slot is not None
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0]) if channel == "sms" else most[0]
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        slots.release(channel, slot)
        return channel

    started = time.monotonic()
    assert pool.run(send, ["sms"] * 12) == ["sms"] * 12
    assert most[0] == 3  # never more than the limit in flight
    assert time.monotonic() - started >= 0.2  # 12 calls, 3 at a time: at least 4 rounds of 50 ms
    started = time.monotonic()
    pool.run(send, ["push"] * 12)
    assert time.monotonic() - started < 0.5  # no limit on push: all 12 overlap (one round, not 12)
    pool.close()


def test_gather_runs_many_threads_calls_as_few_bulk_calls_and_hands_each_its_own_result():
    from worker.inflight import Gather

    calls: list[int] = []

    def bulk(items: list[int]) -> list[int]:
        calls.append(len(items))
        time.sleep(0.01)  # a database round trip
        if 13 in items:
            raise ValueError("13")
        return [i * 2 for i in items]

    gather = Gather(bulk)
    pool = SendPool(40)

    def one(i: int):
        try:
            return gather(i)
        except ValueError as exc:
            return f"error {exc}"

    results = pool.run(one, range(40))
    wrong = [r for i, r in enumerate(results) if r not in (i * 2, "error 13")]
    assert not wrong and "error 13" in results  # each its own answer; the failing call's callers get its error
    assert sum(calls) == 40 and len(calls) < 20  # 40 calls travelled in far fewer round trips
    later = gather.submit(5)
    gather.flush()
    assert later.done() and later.result() == 10
    pool.close()
