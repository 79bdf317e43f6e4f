"""The PostgreSQL pool: a connection the server dropped while it sat idle is replaced, not used."""

from __future__ import annotations

from sqlalchemy import text

from worker.store import db


def test_an_idle_connection_the_server_killed_is_replaced_before_use(postgres_url, monkeypatch):
    engine = db.make_engine(postgres_url, pool_size=1, max_overflow=0)
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    killer = db.make_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with killer.connect() as admin:  # a server restart, or an idle timeout on the server side
        assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)  # it has been idle long enough to be checked
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    engine.dispose()
    killer.dispose()


def test_a_connection_in_steady_use_is_not_pinged(postgres_url, monkeypatch):
    engine = db.make_engine(postgres_url, pool_size=1, max_overflow=0)
    pings: list[object] = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda dbapi_conn: pings.append(dbapi_conn) or ping(dbapi_conn))
    for _ in range(5):
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 42")).scalar() == 42
    assert pings == []  # pool_pre_ping would have pinged on each of the 4 checkouts after the first
    engine.dispose()
