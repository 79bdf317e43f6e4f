"""Local fakes of the delivery providers: real HTTP servers on 127.0.0.1 that check each request the way
the provider does, answer with the provider's own success and error bodies, and fail when told to.

    with TwilioFake() as fake:
        sender = TwilioSender(fake.account_sid, fake.auth_token,
                              messaging_service_sid=fake.messaging_service_sid, base_url=fake.base_url)
        fake.fail_next(1, "20429")      # the next valid request is answered 429 / code 20429
        ...
        fake.messages[-1].to            # every accepted message, parsed

Every fake has:

- ``start()`` / ``stop()``, or ``with``; ``base_url`` (``http://127.0.0.1:<port>``, a free port).
- ``messages``: the accepted messages (a dataclass per provider), ``rejected``: ``(status, reason)`` of every
  refused request, ``requests``: how many requests reached the send endpoint, ``errors``: bugs in the fake.
- ``fail_next(n, kind, retry_after=None)``: answer the next ``n`` valid send requests with the failure
  ``kind`` (each fake's ``KINDS``; every fake has ``"timeout"``, which holds the request ``hang_seconds``
  and closes it unanswered, ``"lost_response"``, the same after accepting the message (the provider has
  it, the client never hears), and ``"disconnect"``, which closes the connection at once).
- ``fail_rate(p_5xx, p_timeout, seed=0)``: after the planned failures, fail each valid request at random
  with the fake's 5xx kind or ``"timeout"``; ``fail_rate(0, 0)`` turns it off.
- ``reset()``: forget messages, counters (``in_flight`` and ``max_in_flight`` too), plans and rates.
- ``latency=(lo, hi)`` (a keyword of every fake, or the ``latency`` attribute): each valid send request waits
  ``uniform(lo, hi)`` seconds before it is answered (accepted or failed), as a provider's API takes ~100-300 ms;
  default ``(0, 0)``, no wait. ``in_flight``: the requests being handled at the send endpoint now;
  ``max_in_flight``: the most at once since the start or the last ``reset()``.

Invalid requests are always refused with the provider's error, and never use up a planned failure.
"""

from __future__ import annotations

import functools
import json
import random
import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

__all__ = ["FakeRequest", "FakeResponse", "FakeServer", "FcmFake", "SendGridFake", "TwilioFake"]

#: Answers that are not HTTP responses: hold the request past the client's timeout, or drop the connection.
HANG = object()
DISCONNECT = object()
#: From ``_injected``: accept the message, then answer HANG.
LOST_RESPONSE = object()


@dataclass(frozen=True)
class FakeRequest:
    method: str
    path: str
    query: str
    headers: Message
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name, "") or ""


@dataclass
class FakeResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> FakeResponse:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # the listen backlog: hundreds of clients may connect at once
    fake: FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away (a stopped worker): no news
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect
    server: _Server

    def setup(self) -> None:
        # headers and body go out in two writes: without TCP_NODELAY, Nagle and delayed ACKs add 40 ms each
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # the tests' output stays quiet
        pass

    def _serve(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        path, _, query = self.path.partition("?")
        try:
            self._answer(fake, fake._dispatch(FakeRequest(self.command, path, query, self.headers, body)))
        finally:
            fake._request_done()

    def _answer(self, fake: FakeServer, answer: FakeResponse | object) -> None:
        if answer is HANG:
            fake._stopping.wait(fake.hang_seconds)
            self.close_connection = True
            return
        if answer is DISCONNECT:
            self.close_connection = True
            return
        assert isinstance(answer, FakeResponse)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


class FakeServer:
    """The server, the recording and the failure plan shared by every provider fake."""

    #: The failure kinds ``fail_next`` accepts; each fake adds its own to these two.
    KINDS: ClassVar[frozenset[str]] = frozenset({"timeout", "lost_response", "disconnect"})
    #: The kind ``fail_rate`` uses for its 5xx share.
    SERVER_ERROR_KIND: ClassVar[str] = "500"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every provider fake takes ``latency=(lo, hi)`` as a keyword, whatever its own ``__init__`` takes."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args: Any, latency: tuple[float, float] | None = None, **kw: Any) -> None:
            init(self, *args, **kw)
            if latency is not None:
                self.latency = latency

        cls.__init__ = __init__

    def __init__(self, *, hang_seconds: float = 5.0, latency: tuple[float, float] = (0.0, 0.0)) -> None:
        self.hang_seconds = hang_seconds
        self.latency = latency
        self.in_flight = 0
        self.max_in_flight = 0
        self._local = threading.local()
        self._latency_rng = random.Random()
        self.messages: list[Any] = []
        self.rejected: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._plan: deque[tuple[str, float | None]] = deque()
        self._rate: tuple[float, float, random.Random] | None = None
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> FakeServer:
        self._stopping.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases requests held by "timeout"
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def latency(self) -> tuple[float, float]:
        return self._latency

    @latency.setter
    def latency(self, value: tuple[float, float] | float) -> None:
        lo, hi = (value, value) if isinstance(value, int | float) else value
        if not 0 <= lo <= hi:
            raise ValueError(f"latency must be (lo, hi) seconds with 0 <= lo <= hi, not {value!r}")
        self._latency = (float(lo), float(hi))

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # failure programming

    def fail_next(self, n: int = 1, kind: str | None = None, *, retry_after: float | None = None) -> None:
        """Answer the next ``n`` valid send requests with ``kind`` (default: the fake's 5xx kind)."""
        kind = kind or self.SERVER_ERROR_KIND
        if kind not in self.KINDS:
            raise ValueError(f"{type(self).__name__} has no failure kind {kind!r}; kinds: {sorted(self.KINDS)}")
        with self._lock:
            self._plan.extend([(kind, retry_after)] * n)

    def fail_rate(self, p_5xx: float = 0.0, p_timeout: float = 0.0, seed: int | None = 0) -> None:
        """Fail each valid send request with probability ``p_5xx`` (5xx) or ``p_timeout`` (held past the
        client's timeout), drawn from a generator seeded with ``seed``."""
        if p_5xx < 0 or p_timeout < 0 or p_5xx + p_timeout > 1:
            raise ValueError("p_5xx and p_timeout must be probabilities that add up to at most 1")
        with self._lock:
            self._rate = (p_5xx, p_timeout, random.Random(seed)) if p_5xx or p_timeout else None

    def reset(self) -> None:
        with self._lock:
            self.messages.clear()
            self.rejected.clear()
            self.errors.clear()
            self.requests = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self._plan.clear()
            self._rate = None

    # for the subclasses

    def _count_request(self) -> None:
        """Called once a request reached the send endpoint: counted, and in flight until it is answered."""
        with self._lock:
            self.requests += 1
            if not getattr(self._local, "in_flight", False):
                self._local.in_flight = True
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _request_done(self) -> None:
        """The handler has answered (or dropped) its request."""
        if getattr(self._local, "in_flight", False):
            self._local.in_flight = False
            with self._lock:
                self.in_flight = max(0, self.in_flight - 1)

    def _wait_latency(self) -> None:
        lo, hi = self._latency
        if hi > 0:
            with self._lock:
                delay = self._latency_rng.uniform(lo, hi)
            self._stopping.wait(delay)

    def _record(self, message: Any) -> None:
        with self._lock:
            self.messages.append(message)

    def _reject(self, response: FakeResponse, reason: str) -> FakeResponse:
        with self._lock:
            self.rejected.append((response.status, reason))
        return response

    def _draw_failure(self) -> tuple[str, float | None] | None:
        with self._lock:
            if self._plan:
                return self._plan.popleft()
            if self._rate is not None:
                p_5xx, p_timeout, rng = self._rate
                x = rng.random()
                if x < p_5xx:
                    return self.SERVER_ERROR_KIND, None
                if x < p_5xx + p_timeout:
                    return "timeout", None
        return None

    def _injected(self, context: dict[str, Any]) -> FakeResponse | object | None:
        """The planned or random failure for this (valid) request, if any; every fake calls it once a send
        request is found valid, so the latency is spent here, before the request is accepted or failed."""
        self._wait_latency()
        failure = self._draw_failure()
        if failure is None:
            return None
        kind, retry_after = failure
        with self._lock:
            self.rejected.append((0, f"injected {kind}"))
        if kind == "timeout":
            return HANG
        if kind == "lost_response":
            return LOST_RESPONSE
        if kind == "disconnect":
            return DISCONNECT
        return self._failure(kind, retry_after, context)

    def _failure(self, kind: str, retry_after: float | None, context: dict[str, Any]) -> FakeResponse:
        raise NotImplementedError

    def _handle(self, request: FakeRequest) -> FakeResponse | object:
        raise NotImplementedError

    def _dispatch(self, request: FakeRequest) -> FakeResponse | object:
        try:
            return self._handle(request)
        except Exception as exc:  # noqa: BLE001 - a bug in the fake must show up in the test, not hang it
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            return FakeResponse(500, b"fake server error", {"Content-Type": "text/plain"})


# The provider fakes import FakeServer from this package, so they come last.
from .fcm import FcmFake  # noqa: E402
from .sendgrid import SendGridFake  # noqa: E402
from .twilio import TwilioFake  # noqa: E402
