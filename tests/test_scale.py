"""What keeps the web process cheap on a large store: the suppression lookup reads the primary key, and
/metrics reads indexes and the planner's statistics instead of counting every row (issue #14)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import event, insert, text
from support import T0, private_database, reset_database

from worker.store import Store, make_engine, metrics_snapshot, repo, upgrade
from worker.store.tables import deliveries, suppressions, transactions


@pytest.fixture(scope="module")
def scale_url() -> Iterator[str]:
    """A database of this module's own: its ANALYZEd statistics must not change the plans other tests see
    on the session's database. A missing PostgreSQL fails under CI=true (support.unavailable)."""
    with private_database(f"remind_test_scale_{os.getpid()}") as url:
        yield url


@pytest.fixture
def pg_store(scale_url):
    """A store on this module's PostgreSQL database, emptied first."""
    reset_database(scale_url)
    engine = make_engine(scale_url)
    yield Store(engine, clock=lambda: T0)
    engine.dispose()


def captured(store: Store, call):
    """Run ``call`` and return the (statement, parameters) it sent."""
    seen = []

    def grab(_conn, _cursor, statement, parameters, _context, _many):
        seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", grab)
    try:
        result = call()
    finally:
        event.remove(store.engine, "before_cursor_execute", grab)
    return result, seen


def test_the_suppression_lookup_reads_the_primary_key_on_postgresql(pg_store):
    """5,000 suppressions and ANALYZE, sequential scans allowed: the plan of the statement exactly as the
    store sends it names the primary key and scans nothing."""
    store = pg_store
    rows = [{"channel": ("sms", "email", "push")[i % 3], "address_hash": store.address_hash(("sms", "email", "push")[
        i % 3], f"addr-{i}"), "customer_id": None, "reason": "test", "created_at": T0} for i in range(5000)]
    with store.begin() as conn:
        conn.execute(insert(suppressions), rows)
        conn.execute(text("ANALYZE suppressions"))
    for extra in (40, 3000):  # a delivery batch's addresses, and a tick batch's
        asked = [("sms", "addr-0"), ("email", "addr-1"), ("email", "addr-0"), ("push", "addr-4999")] + [
            ("sms", f"+1555{i:07d}") for i in range(extra)]
        with store.engine.connect() as conn:
            found, seen = captured(store, lambda asked=asked, conn=conn: store.suppressed(conn, asked))
            assert found == {("sms", "addr-0"), ("email", "addr-1")}  # addr-0 is suppressed for sms, not email
            [(statement, parameters)] = seen
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cur:
                cur.execute("SHOW enable_seqscan")
                assert cur.fetchone()[0] == "on"
                cur.execute("EXPLAIN " + statement, parameters)
                plan = "\n".join(r[0] for r in cur.fetchall())
            raw.rollback()
        assert "suppressions_pkey" in plan and "Seq Scan on suppressions" not in plan, plan


def test_the_suppression_lookup_reads_the_primary_key_on_sqlite(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    upgrade(engine)
    store = Store(engine, clock=lambda: T0)
    store.suppress(None, "sms", "+8613800138000", "c_1", "STOP")
    with engine.connect() as conn:
        found, seen = captured(store, lambda: store.suppressed(conn, [("sms", "+8613800138000"),
                                                                      ("email", "+8613800138000")]))
        assert found == {("sms", "+8613800138000")}
        [(statement, parameters)] = [(s, p) for s, p in seen if s.lstrip().startswith("SELECT")]
        plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters))
    assert "sqlite_autoindex_suppressions_1" in plan or "PRIMARY KEY" in plan, plan
    engine.dispose()


def fill(store: Store, n: int = 3000) -> None:
    """``n`` transactions (70 % confirmed, 20 % cancelled, 5 % escalated, 5 % pending) with 2-3 deliveries
    each in several (channel, status) pairs, a few queued under a lease and a few retried; then ANALYZE."""
    txs, dls = [], []
    for i in range(n):
        status = "confirmed" if i % 20 < 14 else "cancelled" if i % 20 < 18 else "escalated" if i % 20 == 18 \
            else "pending"
        created = T0 - timedelta(minutes=i)
        txs.append({"id": f"s{i:05d}", "status": status, "content": {}, "customer_id": "c", "risk_flag": False,
                    "amount": 1, "currency": "USD", "schedule": "default", "schedule_version": "v",
                    "created_at": created, "deadline": created + timedelta(days=1), "registered_at": created,
                    "next_due_at": T0 + timedelta(minutes=i % 7 - 3) if status == "pending" else None})
        for k, channel in enumerate(("push", "sms", "email")[: 2 + i % 2]):
            dstatus = "queued" if i % 97 == 0 else ("sent", "delivered", "failed")[(i + k) % 3]
            dls.append({"transaction_id": f"s{i:05d}", "step": "nudge", "kind": "reminder", "channel": channel,
                        "variant": "default", "due_at": created, "status": dstatus, "updated_at": created,
                        "attempts": 3 if i % 50 == 0 else 1,
                        "lease_until": T0 + timedelta(minutes=5) if dstatus == "queued" else None,
                        "enqueued_at": T0 if dstatus == "queued" else None,  # enqueued, not held for quiet hours
                        "started_at": created if dstatus != "queued" else None,
                        "sent_at": created + timedelta(seconds=2) if dstatus in ("sent", "delivered") else None})
    with store.begin() as conn:
        conn.execute(insert(transactions), txs)
        conn.execute(insert(deliveries), dls)
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE transactions"))
        conn.execute(text("ANALYZE deliveries"))


def due_by_T0(n: int) -> int:
    """How many of fill(n)'s pending transactions are due at T0."""
    return sum(1 for i in range(n) if i % 20 == 19 and i % 7 - 3 <= 0)


def test_metrics_on_a_large_table_come_from_statistics_and_stay_right(pg_store, monkeypatch):
    """Above EXACT_BELOW rows the settled statuses are estimated from ANALYZE's statistics (exact here: the
    sample is the whole table), the live ones are counted on their indexes; the figures equal exact counts."""
    store = pg_store
    fill(store)
    exact = metrics_snapshot(store, T0)
    assert exact["transactions"] == {"confirmed": 2100, "cancelled": 600, "escalated": 150, "pending": 150}
    assert exact["due_waiting"] == due_by_T0(3000) and exact["oldest_due"] == T0 - timedelta(minutes=3)

    monkeypatch.setattr(repo, "EXACT_BELOW", 1000)
    estimated, seen = captured(store, lambda: metrics_snapshot(store, T0))
    statements = [" ".join(statement.split()) for statement, _ in seen]
    assert any("pg_stats_ext" in st for st in statements)  # the large-table path ran: no count of a whole table
    assert not any("GROUP BY transactions.status" in st for st in statements)
    assert all("lease_until IS NOT NULL" in st for st in statements if "GROUP BY deliveries.channel, " in st)
    assert estimated == exact
    # a delivery queued now is counted at once (exactly, on the lease index), not at the next ANALYZE
    with store.begin() as conn:
        conn.execute(insert(deliveries).values(transaction_id="s00001", step="late", kind="reminder", channel="sms",
                                               variant="default", due_at=T0, status="queued", attempts=0,
                                               updated_at=T0, lease_until=T0 + timedelta(minutes=5),
                                               enqueued_at=T0))
    after = metrics_snapshot(store, T0)["deliveries"]
    assert after[("sms", "queued")] == exact["deliveries"][("sms", "queued")] + 1


def test_due_steps_are_counted_up_to_the_cap_and_latency_reads_the_newest_deliveries(pg_store, monkeypatch):
    store = pg_store
    fill(store, 400)
    assert metrics_snapshot(store, T0)["due_waiting"] == due_by_T0(400) > 5
    monkeypatch.setattr(repo, "DUE_COUNT_CAP", 5)
    assert metrics_snapshot(store, T0)["due_waiting"] == 5
    latencies = metrics_snapshot(store, T0)["latencies"]
    assert latencies and {s for _c, s in latencies} == {2.0}
    monkeypatch.setattr(repo, "LATENCY_WINDOW", 10)  # the newest 10 deliveries (by id), and only those
    assert 0 < len(metrics_snapshot(store, T0)["latencies"]) <= 10
