"""What the sender tests need on top of the provider fakes: a count of the TCP connections a fake accepted,
some latency on its answers, and a way to call one sender from many threads at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fakes import FakeServer


class Connections:
    """Counts the TCP connections a running fake accepts, from now on."""

    def __init__(self, fake: FakeServer) -> None:
        self.opened = 0
        self._lock = threading.Lock()
        httpd = fake._httpd  # the ThreadingHTTPServer: process_request runs once per accepted connection
        if httpd is None:
            raise RuntimeError("start the fake first")
        accept = httpd.process_request

        def counted(request: Any, client_address: Any) -> None:
            with self._lock:
                self.opened += 1
            accept(request, client_address)

        httpd.process_request = counted


def slow_down(fake: FakeServer, seconds: float) -> None:
    """Make the fake take ``seconds`` over every answer, so that concurrent sends really overlap."""
    handle = fake._handle

    def slowly(request: Any) -> Any:
        time.sleep(seconds)
        return handle(request)

    fake._handle = slowly  # _dispatch calls self._handle


def all_at_once(send: Callable[[int], Any], n: int) -> list[Any]:
    """Call ``send(i)`` for i in 0..n-1 from ``n`` threads released together; each result or exception."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait(timeout=10)
        try:
            return send(i)
        except Exception as exc:  # noqa: BLE001 - the test looks at every outcome
            return exc

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


@pytest.fixture
def connections() -> Callable[[FakeServer], Connections]:
    """``connections(fake)``: start counting the fake's TCP connections."""
    return Connections


@pytest.fixture
def slow() -> Callable[[FakeServer, float], None]:
    """``slow(fake, seconds)``: the fake takes that long over every answer."""
    return slow_down


@pytest.fixture
def at_once() -> Callable[[Callable[[int], Any], int], list[Any]]:
    """``at_once(send, n)``: ``send(i)`` from n threads released together."""
    return all_at_once


@pytest.fixture
def pool_full(caplog) -> Callable[[], list[str]]:
    """``pool_full()``: urllib3's "Connection pool is full, discarding connection" warnings so far."""
    caplog.set_level("WARNING", logger="urllib3.connectionpool")
    return lambda: [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()]
