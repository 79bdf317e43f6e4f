"""Engines: PostgreSQL in production, SQLite as the embedded default, each set up for concurrency."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError


def normalize_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs, as Heroku-style settings give them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


#: Seconds a new PostgreSQL connection may take (REMIND_DB_CONNECT_TIMEOUT's default). psycopg waits 130 s
#: for a host that drops packets or accepts and never answers; a process must report the outage instead.
CONNECT_TIMEOUT = 5

#: Seconds an open PostgreSQL connection may go silent before it counts as dropped (REMIND_DB_TCP_TIMEOUT's
#: default). Without it a query on a connection whose packets stop arriving (a failed-over host, a cut link)
#: blocks until the kernel gives up retransmitting, about 15 minutes. It does not limit how long a query may
#: run: the server's kernel acknowledges the query and answers the keepalive probes while the query works.
TCP_TIMEOUT = 30


def tcp_timeouts(seconds: int) -> dict[str, int]:
    """libpq's parameters that drop a silent connection after about ``seconds``: ``tcp_user_timeout`` (Linux; in
    milliseconds) for data sent and not acknowledged (a query or a ping into the void), and keepalives for a
    connection waiting on an answer with nothing unacknowledged (probes from half the time on, every sixth;
    where there is no TCP_USER_TIMEOUT, the third unanswered probe ends it at about ``seconds`` as well)."""
    return {"keepalives": 1, "keepalives_idle": max(1, seconds // 2), "keepalives_interval": max(1, seconds // 6),
            "keepalives_count": 3, "tcp_user_timeout": seconds * 1000}


def make_engine(url: str, *, connect_timeout: int = CONNECT_TIMEOUT, tcp_timeout: int = TCP_TIMEOUT,
                **kwargs) -> Engine:
    """An engine. On PostgreSQL a ``connect_timeout`` (whole seconds, libpq's minimum is 2) and the TCP settings
    of :func:`tcp_timeouts`, each unless the URL sets it: an unreachable host is an outage within seconds, and a
    connection that goes silent in use within ``tcp_timeout`` seconds, not a hang. On SQLite, WAL and ``BEGIN
    IMMEDIATE`` so concurrent writers queue instead of failing."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        if parsed.get_backend_name() == "postgresql":
            libpq = {"connect_timeout": connect_timeout, **tcp_timeouts(tcp_timeout)}
            libpq = {key: value for key, value in libpq.items() if key not in parsed.query}
            kwargs["connect_args"] = {**libpq, **kwargs.get("connect_args", {})}
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        kwargs.setdefault("hide_parameters", True)  # errors must not carry phone numbers into logs
        engine = create_engine(url, **kwargs)
        if not kwargs.get("pool_pre_ping"):
            _ping_when_idle(engine)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("hide_parameters", True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # One writer at a time, decided when the transaction starts: two schedulers on one
        # SQLite file take turns instead of both claiming the same due steps.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


#: A pooled connection idle longer than this is pinged before use (the server may have restarted).
IDLE_PING_SECONDS = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling, but only for connections that sat idle: ``pool_pre_ping``
    pings on every checkout, and the send path checks a connection out twice per delivery (claim,
    then record), so the ping was a third of the worker's database time. A connection in steady use
    is not pinged; one idle past ``IDLE_PING_SECONDS`` is, and a dead one is replaced (SQLAlchemy
    retries the checkout on ``DisconnectionError``)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn, record, _proxy) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure: this connection is not usable
            raise DisconnectionError(f"idle connection failed its ping: {type(exc).__name__}") from exc


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
