#!/usr/bin/env python
"""Scheduler tick at scale, on PostgreSQL; and registration throughput (Python API and HTTP API).

    .venv/bin/python bench/tick.py            # 1,000,000 pending / 10,000 due; 100,000 registrations each way
    .venv/bin/python bench/tick.py --small    # a quick run (CI / smoke test), under a minute

What is measured (the real path, nothing dropped):

* ``Remind.tick(now)`` with the real Redis broker bound (``worker.broker.make_broker`` + ``bind``, a
  fresh namespace): claim (``FOR UPDATE SKIP LOCKED``) + plan + insert deliveries + advance the
  cursors + commit + enqueue the queued deliveries as ``remind.deliver_batch`` messages (up to
  ``REMIND_DELIVERY_BATCH`` ids each), claim batch by claim batch until nothing
  is due. First with only the due rows in the table (``--due`` pending, all due), then with
  ``--pending`` pending rows of which the same ``--due`` are due. Each case: one warm-up tick, then
  ``--runs`` timed ticks (median reported), the due rows reset between runs. Every tick is checked:
  every due transaction claimed, every queued delivery in SQL and in Redis, nothing due left.
* A deadline burst: the same ``--due`` transactions, every reminder handled, all reach their deadline in
  the tick (``deadline_10k_s``): each is cancelled or escalated once, with its audit line, its platform event
  (enqueued as ``remind.send_events``) and the customer's notices. Checked like the others, and: one audit
  line and one event per transaction.
* ``Remind.register`` for ``--register-count`` transactions, sequentially in this process, and
  ``POST /v1/transactions`` against ``remind web`` (uvicorn, a subprocess) from ``--http-connections``
  concurrent keep-alive connections. Every answer is checked (created=True / HTTP 201).

Setup that is *not* measured: the pending rows are bulk-loaded with COPY (a child process) with
exactly the column values ``Remind.register`` writes, computed with the same functions
(``parse_transaction``/``canonical``, ``Registry.choose``, ``Schedule.deadline``, ``slots``); a
random sample is registered through the real ``Remind.register`` first and compared column by
column with what the loader would have written. After loading: ``VACUUM ANALYZE`` of the tables.

The last line is ``key=value`` figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import io
import json
import logging
import multiprocessing
import os
import pstats
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _harness as h  # noqa: E402

#: The moment every tick runs at. Due rows were created 16-30 minutes before it; the others are due
#: between 1 minute and 7 days after it.
T = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)

#: Signs confirmation links in the bench's processes (a long random value, as `remind` requires).
BENCH_SECRET = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex

COLUMNS = ("id", "status", "content", "customer_id", "segment", "risk_flag", "amount", "currency", "schedule",
           "schedule_version", "created_at", "expires_at", "deadline", "registered_at", "handled_until",
           "next_due_at")

# Transaction shapes, weighted (out of 100): which schedule they run on, which channels they can use.
PROTOS = [
    # weight, customer fields, money, risk
    (40, {"name": "Li Wei", "phone": "+8613800138000", "email": True, "push": True, "locale": "zh-CN",
          "timezone": "Asia/Shanghai", "segment": "returning"}, ("1000.00", "CNY", "12.50"), False),
    (20, {"name": "Amelia Jones", "email": True, "push": True, "locale": "en", "timezone": "Europe/London",
          "segment": "returning"}, ("250.00", "GBP", "1.99"), False),
    (20, {"name": "Jonas Weber", "phone": "+4915112345678", "email": True, "push": True, "locale": "en",
          "timezone": "Europe/Berlin", "segment": "new"}, ("80.00", "EUR", "0.90"), False),
    (10, {"name": "Priya Sharma", "phone": "+919812345678", "email": True, "locale": "en",
          "timezone": "Asia/Kolkata", "segment": "returning"}, ("50000.00", "INR", "120.00"), True),
    (10, {"name": "Sam Smith", "phone": "+14155552671", "locale": "en", "timezone": "UTC", "segment": None},
     ("42.00", "USD", "0.50"), False),
]
_WEIGHTS = [i for i, (w, *_rest) in enumerate(PROTOS) for _ in range(w)]


class BenchClock:
    """The service's clock: ``T`` while the rows are loaded and ticked (the sample registered through
    ``Remind.register`` is created minutes before ``T``, so a real clock days later would refuse it as
    past its deadline), the real time once ``at`` is None (the registration phases)."""

    def __init__(self, at: datetime | None = T) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at or datetime.now(UTC)


def label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def mb(kilobytes: int) -> float:
    return round(kilobytes / 1024, 1)


# -- transactions: the payloads the platform sends, and the rows register writes --------------------------

def payload(proto: int, tx_id: str, customer_id: str, created_at: datetime | None) -> dict:
    """A transaction as the platform sends it (the README's contract)."""
    _w, cust, (amount, currency, fee), risk = PROTOS[proto]
    customer = {"id": customer_id, "name": cust["name"], "locale": cust["locale"], "timezone": cust["timezone"],
                "segment": cust["segment"]}
    if cust.get("phone"):
        customer["phone"] = cust["phone"]
    if cust.get("email"):
        customer["email"] = f"{customer_id}@example.com"
    if cust.get("push"):
        customer["push_tokens"] = [f"fcm-{customer_id}"]
    data = {"id": tx_id, "customer": customer, "amount": amount, "currency": currency, "fee": fee,
            "payment_method": "Bank card ending 1234", "expected_arrival": "2026-11-26T10:00:00+08:00",
            "risk_flag": risk, "metadata": {"channel": "app", "bench": True}}
    if created_at is not None:
        data["created_at"] = created_at.isoformat()
    return data


def spec(kind: str, i: int) -> tuple[int, str, str, datetime]:
    """Row i of a kind: (shape, transaction id, customer id, created_at). Deterministic."""
    proto = _WEIGHTS[(i * 37 + (11 if kind == "bg" else 0)) % 100]
    if kind == "due":  # created 16 to 30 minutes before T: the first step (5 or 15 minutes) is due
        created = T - timedelta(minutes=16) - timedelta(seconds=(i * 7919) % (14 * 60))
        return proto, f"tx_due_{i:07d}", f"c_due_{i}", created
    # due 1 minute to 7 days after T (whole minutes, about 100 per minute at 1M)
    created = T + timedelta(minutes=1 + (i * 104729) % (7 * 24 * 60))
    return proto, f"tx_bg_{i:07d}", f"c_bg_{i}", created


class RowMaker:
    """The column values ``Remind.register`` writes, computed with the same functions, fast.

    The shape-dependent parts (validation, canonical form, schedule choice) are computed once per
    shape through ``parse_transaction``; per row only the id, customer id, contacts and created_at
    change, then ``Schedule.deadline`` and ``slots`` give the deadline and first due time, exactly as
    in ``Remind.register`` (``slots`` cached per (shape, created_at))."""

    def __init__(self, registry) -> None:
        from worker.ingest import parse_transaction

        self.registry = registry
        self.protos = []
        for p in range(len(PROTOS)):
            tx = parse_transaction(payload(p, "tx_proto", "c_proto", T))
            schedule = registry.choose(segment=tx.customer.segment, risk_flag=tx.risk_flag, amount=tx.amount,
                                       currency=tx.currency)
            self.protos.append((tx, tx.canonical(), schedule))

    @lru_cache(maxsize=200_000)  # noqa: B019 (one instance per process)
    def _due(self, proto: int, created_at: datetime) -> tuple[datetime, datetime]:
        from worker.ladder import slots

        tx, _content, schedule = self.protos[proto]
        deadline = schedule.deadline(created_at, tx.expires_at)
        first = [s.at for s in slots(schedule, created_at, deadline, tx.customer.timezone)]
        return deadline, first[0] if first else deadline

    def row(self, kind: str, i: int, registered_at: datetime) -> tuple:
        proto, tx_id, customer_id, created_at = spec(kind, i)
        tx, canonical, schedule = self.protos[proto]
        content = dict(canonical)
        customer = content["customer"] = dict(canonical["customer"])
        content["id"] = tx_id
        customer["id"] = customer_id
        if customer.get("email"):
            customer["email"] = f"{customer_id}@example.com"
        if customer.get("push_tokens"):
            customer["push_tokens"] = [f"fcm-{customer_id}"]
        content["created_at"] = created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        deadline, next_due = self._due(proto, created_at)
        return (tx_id, "pending", json.dumps(content), customer_id, tx.customer.segment, tx.risk_flag, tx.amount,
                tx.currency, schedule.name, schedule.version, created_at, tx.expires_at, deadline, registered_at,
                None, next_due)


def _bench_settings(args, db_url: str, tmp: Path, namespace: str):
    from worker.settings import Settings

    return Settings(_env_file=None, database_url=db_url, redis_url=args.redis_url, redis_namespace=namespace,
                    schedules_dir=ROOT / "schedules", templates_dir=ROOT / "templates", outbox=tmp / "outbox.jsonl",
                    dev_sender="outbox", reload_seconds=0, secret_key=BENCH_SECRET,
                    public_url="https://pay.example", batch_size=args.batch_size, api_tokens="bench-token",
                    platform_webhook_url="https://platform.example/remind-events",
                    webhook_secret="whsec_" + base64.b64encode(os.urandom(32)).decode())


def _copy_text(value) -> str:
    """One value in COPY's text format (what psycopg's write_row would send, done in bulk)."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def load_rows(pg_dsn: str, kind: str, start: int, stop: int, skip: frozenset[int], schedules_dir: str,
              templates_dir: str) -> int:
    """Child process: COPY rows ``start``..``stop`` of ``kind`` (minus ``skip``, registered for real)."""
    import psycopg

    from worker.service import load_config
    from worker.settings import Settings

    registry, _templates = load_config(Settings(_env_file=None, schedules_dir=Path(schedules_dir),
                                                templates_dir=Path(templates_dir)))
    maker = RowMaker(registry)
    registered_at = datetime.now(UTC)
    written = 0
    with psycopg.connect(pg_dsn) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY transactions ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            chunk: list[str] = []
            for i in range(start, stop):
                if i in skip:
                    continue
                row = maker.row(kind, i, registered_at)
                if kind == "due":
                    assert row[-1] <= T, f"{row[0]} should be due at {T}: next_due_at {row[-1]}"
                else:
                    assert row[-1] > T, f"{row[0]} should not be due at {T}: next_due_at {row[-1]}"
                chunk.append("\t".join(map(_copy_text, row)))
                written += 1
                if len(chunk) == 2000:
                    copy.write("\n".join(chunk) + "\n")
                    chunk.clear()
            if chunk:
                copy.write("\n".join(chunk) + "\n")
    return written


# -- database and broker plumbing -------------------------------------------------------------------------

def admin(args):
    import psycopg

    return psycopg.connect(args.pg_admin_dsn, autocommit=True)


def pg_dsn(args, db: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(args.pg_admin_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    return url.set(drivername="postgresql", database=db).render_as_string(hide_password=False)


def redis_keys(client, namespace: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{namespace}:*", count=1000))


class Bench:
    def __init__(self, args, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.db = args.db_name
        self.dsn = pg_dsn(args, self.db)
        self.namespace = f"remind-bench-{uuid.uuid4().hex[:12]}"
        self.figures: dict[str, object] = {}
        self.remind = None
        self.redis = None
        self.web: subprocess.Popen | None = None
        self.deadline_case = False  # reset() puts the due rows at their deadline instead of a reminder

    def say(self, *parts) -> None:
        print(*parts, flush=True)

    # -- setup ----------------------------------------------------------------------------------------

    def create(self) -> None:
        import redis

        from worker.broker import bind, make_broker
        from worker.logs import setup
        from worker.service import Remind

        with admin(self.args) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.db}"')
        # Log like a `remind` process does (INFO, text), to a file: formatting costs what it costs.
        setup("text")
        self.log_path = self.tmp / "bench.log"
        logging.getLogger().handlers[0].setStream(open(self.log_path, "a"))  # noqa: SIM115
        settings = _bench_settings(self.args, self.dsn.replace("postgresql://", "postgresql+psycopg://", 1),
                                   self.tmp, self.namespace)
        self.settings = settings
        self.clock = BenchClock()
        self.remind = Remind.from_settings(settings, clock=self.clock)  # the Alembic migrations: the real schema
        self.broker = make_broker(settings)
        self.actors = bind(self.remind, self.broker)
        self.redis = redis.Redis.from_url(self.args.redis_url)
        self.queue_key = f"{self.namespace}:{self.actors.queue_name}"
        self.maker = RowMaker(self.remind.registry)
        self.say(f"database {self.db} (PostgreSQL {self.sql_one('SHOW server_version')}, shared_buffers "
                 f"{self.sql_one('SHOW shared_buffers')}), redis namespace {self.namespace}, "
                 f"batch size {settings.batch_size}")

    def sql(self, statement: str, *params):
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(statement, params or None)
            return cur.fetchall() if cur.description else None

    def sql_one(self, statement: str, *params):
        return self.sql(statement, *params)[0][0]

    def load(self, kind: str, count: int) -> None:
        """Register a sample through Remind.register, COPY the rest, check the sample matches the loader."""
        rng = random.Random(f"{kind}:{count}")
        sample = frozenset(rng.sample(range(count), min(count, self.args.verify_sample)))
        for i in sorted(sample):
            proto, tx_id, customer_id, created_at = spec(kind, i)
            reg = self.remind.register(payload(proto, tx_id, customer_id, created_at))
            assert reg.created, reg
        started = time.perf_counter()
        procs = max(1, min(self.args.load_procs, count // 10_000))
        bounds = [count * k // procs for k in range(procs + 1)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(procs) as pool:
            written = sum(pool.starmap(load_rows, [
                (self.dsn, kind, bounds[k], bounds[k + 1], sample, str(self.settings.schedules_dir),
                 str(self.settings.templates_dir)) for k in range(procs)]))
        copy_s = time.perf_counter() - started
        # The sample went through the real register: the loader must produce the same columns.
        cols = [c for c in COLUMNS if c != "registered_at"]
        select = ", ".join(c if c != "content" else "content::text" for c in cols)
        stored = {r[0]: r for r in self.sql(f"SELECT {select} FROM transactions WHERE id = ANY(%s)",
                                            [spec(kind, i)[1] for i in sample])}
        mismatches = []
        for i in sample:
            made = self.maker.row(kind, i, T)
            want = dict(zip(COLUMNS, made, strict=True))
            got = dict(zip(cols, stored[made[0]], strict=True))
            for c in cols:
                w, g = want[c], got[c]
                if c == "amount":
                    w, g = Decimal(w), Decimal(g)
                if w != g:
                    mismatches.append((made[0], c, w, g))
        if mismatches:
            raise SystemExit(f"the loader does not write what Remind.register writes: {mismatches[:5]}")
        started_v = time.perf_counter()
        self.sql("VACUUM (ANALYZE) transactions")
        vacuum_s = time.perf_counter() - started_v
        self.say(f"loaded {count:,} {kind} rows: {len(sample)} through Remind.register (checked: the loader "
                 f"writes the same {len(cols)} columns), {written:,} by COPY in {copy_s:.1f}s ({procs} "
                 f"process{'es' if procs > 1 else ''}); "
                 f"VACUUM ANALYZE transactions {vacuum_s:.1f}s")

    def add_suppressions(self) -> None:
        """1% of the due customers have opted out of push: those steps fall back to another channel."""
        from worker.store import Store
        from worker.store.tables import suppressions

        rows = []
        for i in range(0, self.args.due, 100):
            proto, _tx_id, customer_id, _ = spec("due", i)
            if PROTOS[proto][1].get("push"):
                rows.append({"channel": "push", "address_hash": Store.address_hash("push", f"fcm-{customer_id}"),
                             "customer_id": customer_id, "reason": "bench: token unregistered", "created_at": T})
        if rows:
            with self.remind.store.begin() as conn:
                conn.execute(suppressions.insert(), rows)
        self.say(f"{len(rows)} push tokens of due customers suppressed (their push falls back)")

    def remember_due(self) -> None:
        self.sql("CREATE TABLE bench_due AS SELECT id, next_due_at, deadline FROM transactions "
                 f"WHERE next_due_at <= '{T.isoformat()}'::timestamptz AND status = 'pending'")
        self.sql("ALTER TABLE bench_due ADD PRIMARY KEY (id)")

    def reset(self) -> None:
        """Undo a tick: no deliveries, events, audit lines or roll-up, the due rows' cursors back to what
        register wrote (or, in the deadline case, every reminder handled and the deadline a minute ago),
        Redis emptied."""
        self.sql("TRUNCATE deliveries, events, audit, funnel_units, funnel_rolled, funnel_rollup_state")
        if self.deadline_case:
            self.sql("UPDATE transactions t SET handled_until = %s, next_due_at = %s, deadline = %s, "
                     "status = 'pending', cancelled_at = NULL, escalated_at = NULL, status_reason = NULL, "
                     "settled_source = NULL FROM bench_due d WHERE t.id = d.id",
                     T - timedelta(minutes=1, seconds=1), T - timedelta(minutes=1), T - timedelta(minutes=1))
        else:
            self.sql("UPDATE transactions t SET handled_until = NULL, next_due_at = d.next_due_at, "
                     "deadline = d.deadline, status = 'pending', cancelled_at = NULL, escalated_at = NULL, "
                     "status_reason = NULL, settled_source = NULL FROM bench_due d WHERE t.id = d.id")
        self.sql("VACUUM (ANALYZE) transactions, deliveries")
        keys = redis_keys(self.redis, self.namespace)
        if keys:
            self.redis.delete(*keys)
        assert self.sql_one("SELECT count(*) FROM transactions WHERE next_due_at <= %s AND status = 'pending'",
                            T) == self.args.due

    # -- the tick -------------------------------------------------------------------------------------

    @contextmanager
    def instrumented(self):
        """Time the tick's parts by wrapping the store's methods and the enqueue (nothing skipped)."""
        store = self.remind.store
        spent: Counter = Counter()
        originals: list = []

        def wrap(obj, name, key):
            original = getattr(obj, name)
            originals.append((obj, name, name in vars(obj), original))

            def timed(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    spent[key] += time.perf_counter() - t0
            setattr(obj, name, timed)

        for name, key in (("claim_due", "claim (SELECT ... FOR UPDATE SKIP LOCKED)"),
                          ("suppressed", "suppressions lookup"),
                          ("advance", "advance cursors (UPDATE ... FROM unnest)"),
                          ("add_deliveries", "insert deliveries (INSERT ... SELECT unnest ... RETURNING)"),
                          ("claim_expired", "expired-lease check")):
            wrap(store, name, key)
        wrap(store.events, "add_many", "platform events (INSERT ... RETURNING)")
        wrap(store.events, "note_many", "audit lines (INSERT)")
        wrap(self.remind, "enqueue", "enqueue to Redis (one message per batch of ids)")
        original_begin = store.begin

        @contextmanager
        def begin():
            t0 = time.perf_counter()
            with original_begin() as conn:
                spent["connect + BEGIN"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                yield conn
                spent["(inside the transaction)"] += time.perf_counter() - t1
                t2 = time.perf_counter()
            spent["commit"] += time.perf_counter() - t2
        originals.append((store, "begin", False, original_begin))
        store.begin = begin
        try:
            yield spent
        finally:
            for obj, name, own, original in reversed(originals):
                if own:
                    setattr(obj, name, original)  # bind's enqueue closure
                else:
                    delattr(obj, name)  # back to the class's method

    def checked_tick(self) -> tuple[float, object, int]:
        started = time.perf_counter()
        result = self.remind.tick(T)
        elapsed = time.perf_counter() - started
        queued = self.sql_one("SELECT count(*) FROM deliveries WHERE status = 'queued'")
        messages = self.redis.llen(self.queue_key)
        assert messages == self.redis.hlen(self.queue_key + ".msgs"), messages
        # Each message carries a batch of delivery ids: every queued delivery must be in exactly one.
        sent = [json.loads(raw) for raw in self.redis.hvals(self.queue_key + ".msgs")]
        in_redis = [i for m in sent if m["actor_name"] == "remind.deliver_batch" for i in m["args"][0]]
        if self.deadline_case:  # and the platform's events, in messages of their own
            events = [i for m in sent if m["actor_name"] == "remind.send_events" for i in m["args"][0]]
            assert len(events) == len(set(events)) == self.args.due, (len(events), self.args.due)
        left = self.sql_one("SELECT count(*) FROM transactions WHERE next_due_at <= %s AND status = 'pending'", T)
        assert result.claimed == self.args.due, (result.claimed, self.args.due)
        if self.deadline_case:  # each settled once: its status, its audit line and its platform event
            assert result.settled == self.args.due, (result.settled, self.args.due)
            assert self.sql_one("SELECT count(*) FROM transactions WHERE status IN ('cancelled', 'escalated')") \
                == self.sql_one("SELECT count(DISTINCT transaction_id) FROM audit") \
                == self.sql_one("SELECT count(*) FROM events") == self.args.due
        assert len(result.enqueued) == queued == len(in_redis) == len(set(in_redis)), (
            len(result.enqueued), queued, len(in_redis))
        assert set(in_redis) == set(result.enqueued)
        assert left == 0, left
        return elapsed, result, messages

    def explain(self) -> str:
        """EXPLAIN (ANALYZE, BUFFERS) of the claim query exactly as the store sends it (rolled back)."""
        from sqlalchemy import event

        captured = []

        def grab(_conn, _cursor, statement, parameters, _context, _many):
            if "FOR UPDATE SKIP LOCKED" in statement and "FROM transactions" in statement and not captured:
                captured.append((statement, parameters))

        engine = self.remind.store.engine
        event.listen(engine, "before_cursor_execute", grab)
        try:
            with engine.connect() as conn:
                trans = conn.begin()
                try:
                    self.remind.store.claim_due(conn, T, self.settings.batch_size)
                finally:
                    trans.rollback()
        finally:
            event.remove(engine, "before_cursor_execute", grab)
        statement, parameters = captured[0]
        with engine.connect() as conn:
            plan = [r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)]
            conn.rollback()
        return statement, "\n".join(plan)

    def tick_case(self, name: str, pending: int) -> dict:
        self.reset()
        statement, plan = self.explain()
        what = "reach their deadline (all reminders sent)" if self.deadline_case else "due"
        self.say(f"\n== tick: {pending:,} pending, {self.args.due:,} {what} ==")
        self.say(f"claim query:\n  {' '.join(statement.split())}")
        self.say("EXPLAIN (ANALYZE, BUFFERS), first batch:\n  " + plan.replace("\n", "\n  "))
        warm, _, _ = self.checked_tick()
        self.reset()
        self.say(f"warm-up tick {warm:.3f}s (not counted)")
        times, breakdowns = [], []
        for run in range(self.args.runs):
            with self.instrumented() as spent:
                elapsed, result, messages = self.checked_tick()
            times.append(elapsed)
            breakdowns.append((elapsed, dict(spent)))
            self.say(f"run {run + 1}: {elapsed:.3f}s  claimed {result.claimed:,}, enqueued {len(result.enqueued):,}"
                     f" deliveries in {messages:,} messages, skipped {result.skipped:,} "
                     f"({result.claimed / elapsed:,.0f} due transactions/s, "
                     f"{len(result.enqueued) / elapsed:,.0f} deliveries/s)")
            self.reset()
        median = statistics.median(times)
        elapsed, spent = sorted(breakdowns, key=lambda b: b[0])[len(breakdowns) // 2]
        self.say(f"median {median:.3f}s of {self.args.runs}: {', '.join(f'{t:.3f}' for t in times)}")
        self.say(f"where the median run's {elapsed:.3f}s went (wall time, summed over "
                 f"{-(-self.args.due // self.settings.batch_size) + 1} batches):")
        inside = spent.pop("(inside the transaction)", 0.0)
        sql_inside = sum(v for k, v in spent.items() if k not in ("connect + BEGIN", "commit",
                                                                    "enqueue to Redis (one message per batch of ids)"))
        spent["planning in Python (plan_transaction, _schedule_for, choose; residual)"] = inside - sql_inside
        spent["other (loop, result)"] = elapsed - sum(spent.values())
        for key, value in sorted(spent.items(), key=lambda kv: -kv[1]):
            self.say(f"  {value:7.3f}s {100 * value / elapsed:5.1f}%  {key}")
        # One more tick under cProfile, for the function-level view (slower than the timed runs).
        profiler = cProfile.Profile()
        profiler.enable()
        p_elapsed, _, _ = self.checked_tick()
        profiler.disable()
        self.reset()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(self.args.profile_top)
        stats.sort_stats("tottime").print_stats(self.args.profile_top)
        self.say(f"cProfile of one more tick ({p_elapsed:.3f}s under the profiler), top {self.args.profile_top} "
                 "by cumulative then by own time:")
        self.say(_trim_pstats(out.getvalue()))
        return {"median": median, "times": times}

    # -- registration -------------------------------------------------------------------------------------

    def register_python(self) -> float:
        count = self.args.register_count
        store = self.remind.store
        original = store.insert_transaction
        spent = Counter()

        def timed(tx):
            t0 = time.perf_counter()
            try:
                return original(tx)
            finally:
                spent["insert"] += time.perf_counter() - t0
        for i in range(min(200, count)):  # warm-up, not counted
            proto = _WEIGHTS[(i * 37) % 100]
            self.remind.register(payload(proto, f"tx_pyw_{i:07d}", f"c_pyw_{i}", datetime.now(UTC)))
        store.insert_transaction = timed
        try:
            started = time.perf_counter()
            for i in range(count):
                proto = _WEIGHTS[(i * 37) % 100]
                reg = self.remind.register(payload(proto, f"tx_py_{i:07d}", f"c_py_{i}", datetime.now(UTC)))
                if not reg.created:
                    raise AssertionError(reg)
            elapsed = time.perf_counter() - started
        finally:
            del store.insert_transaction
        rate = count / elapsed
        profiler = cProfile.Profile()
        n_prof = min(max(count // 4, 100), 500)
        profiler.enable()
        for i in range(n_prof):
            proto = _WEIGHTS[(i * 37) % 100]
            self.remind.register(payload(proto, f"tx_pyp_{i:07d}", f"c_pyp_{i}", datetime.now(UTC)))
        profiler.disable()
        self.say(f"\n== registration, Python API: {count:,} x Remind.register, sequential ==")
        self.say(f"{elapsed:.1f}s, {rate:,.0f}/s, {1000 * elapsed / count:.2f} ms each: "
                 f"{1000 * spent['insert'] / count:.2f} ms in Store.insert_transaction (connect, INSERT, commit), "
                 f"{1000 * (elapsed - spent['insert']) / count:.2f} ms validating, choosing the schedule, "
                 "computing slots (and building the payload)")
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(self.args.profile_top)
        self.say(f"cProfile of {n_prof} more registrations, top {self.args.profile_top} by cumulative time:")
        self.say(_trim_pstats(out.getvalue()))
        return rate

    def start_web(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        remind_bin = Path(sys.executable).parent / "remind"
        cmd = ([str(remind_bin)] if remind_bin.exists()
               else [sys.executable, "-c", "from worker.cli import main; main()"])
        env = {**os.environ, "DATABASE_URL": self.settings.database_url, "REDIS_URL": self.args.redis_url,
               "REMIND_REDIS_NAMESPACE": self.namespace, "REMIND_API_TOKEN": "bench-token",
               "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"), "REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
               "REMIND_OUTBOX": str(self.tmp / "web-outbox.jsonl"), "REMIND_DEV_SENDER": "outbox",
               "REMIND_SECRET_KEY": BENCH_SECRET, "REMIND_PUBLIC_URL": "https://pay.example",
               "REMIND_HOST": "127.0.0.1", "PORT": str(port)}
        self.web_log = open(self.tmp / "web.log", "w")  # noqa: SIM115
        self.web = subprocess.Popen([*cmd, "web", "--port", str(port)], cwd=self.tmp, env=env,
                                    stdout=self.web_log, stderr=subprocess.STDOUT)
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if self.web.poll() is not None:
                raise SystemExit(f"remind web exited: {(self.tmp / 'web.log').read_text()[-2000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("remind web did not answer /healthz within 60s")
            time.sleep(0.2)

    def stop_web(self) -> int | None:
        """Stop the server; return its peak RSS in KiB (VmHWM: the high-water mark since its exec)."""
        if self.web is None:
            return None
        peak = None
        try:
            for line in Path(f"/proc/{self.web.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1])
        except OSError:
            pass
        self.web.terminate()
        try:
            self.web.wait(20)
        except subprocess.TimeoutExpired:
            self.web.kill()
            self.web.wait(10)
        self.web = None
        self.web_log.close()
        return peak

    def register_http(self) -> float:
        import httpx

        count, conns = self.args.register_count, self.args.http_connections
        base = self.start_web()

        async def run(prefix: str, n: int) -> tuple[float, Counter]:
            codes: Counter = Counter()
            limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
            headers = {"authorization": "Bearer bench-token", "content-type": "application/json"}
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120, headers=headers) as client:
                todo = iter(range(n))

                async def worker() -> None:
                    for i in todo:
                        proto = _WEIGHTS[(i * 37) % 100]
                        body = json.dumps(payload(proto, f"{prefix}_{i:07d}", f"c_{prefix}_{i}", datetime.now(UTC)))
                        response = await client.post("/v1/transactions", content=body)
                        codes[response.status_code] += 1
                        if response.status_code != 201:
                            raise AssertionError(f"{response.status_code}: {response.text[:300]}")

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(conns)))
                return time.perf_counter() - started, codes

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        asyncio.run(run("tx_httpw", min(200, count)))  # warm-up, not counted
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed, codes = asyncio.run(run("tx_http", count))
        cpu2 = resource.getrusage(resource.RUSAGE_SELF)
        del cpu0
        client_cpu = (cpu2.ru_utime + cpu2.ru_stime) - (cpu1.ru_utime + cpu1.ru_stime)
        profile = self.profile_web(lambda: asyncio.run(run("tx_httpp", min(max(count // 4, 250), 3000))))
        peak = self.stop_web()
        self.figures["web_peak_rss_mb"] = mb(peak) if peak else "n/a"
        rate = count / elapsed
        self.say(f"\n== registration, HTTP API: {count:,} x POST /v1/transactions, {conns} connections, "
                 "remind web (uvicorn, 1 process) ==")
        self.say(f"{elapsed:.1f}s, {rate:,.0f}/s; answers {dict(codes)}; the load generator (httpx, this process) "
                 f"used {client_cpu:.1f}s CPU of the {2 * elapsed:.0f} core-seconds on this machine; "
                 f"web peak RSS {self.figures['web_peak_rss_mb']} MB")
        self.say(profile)
        return rate

    def profile_web(self, load) -> str:
        """py-spy on the web server while ``load`` runs again (not part of the figure): 100 samples a second
        of the thread holding the GIL, i.e. where the server's Python CPU time goes."""
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if not py_spy or self.args.no_py_spy:
            load()
            return "(py-spy not available: no profile of the web server)"
        out = self.tmp / "web.pyspy"
        spy = subprocess.Popen([py_spy, "record", "--gil", "-r", "100", "-f", "raw", "-o", str(out),
                                "-p", str(self.web.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        started = time.perf_counter()
        load()
        elapsed = time.perf_counter() - started
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            return "(py-spy did not stop)"
        if not out.exists():
            return f"(py-spy failed: {err.strip()[-300:]})"
        return summarize_py_spy(out.read_text(), f"py-spy of the web server over {elapsed:.1f}s of the same load",
                                self.args.profile_top)

    # -- teardown -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Every step runs even when an earlier one fails (e.g. Redis went away mid-run)."""
        steps = [self.stop_web]
        if self.remind is not None:
            steps.append(self.remind.store.engine.dispose)
        if self.redis is not None:
            def drop_keys() -> None:
                keys = redis_keys(self.redis, self.namespace)
                if keys:
                    self.redis.delete(*keys)
            steps.append(drop_keys)
        if not self.args.keep_db:
            def drop_db() -> None:
                with admin(self.args) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            steps.append(drop_db)
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (report, and go on cleaning up)
                print(f"cleanup: {getattr(step, '__name__', step)} failed: {exc}", file=sys.stderr, flush=True)


def summarize_py_spy(raw: str, title: str, top: int) -> str:
    """From py-spy's collapsed stacks: own time by package, inclusive time of worker/ functions, top own frames."""
    import re

    inclusive: Counter = Counter()
    own: Counter = Counter()
    by_package: Counter = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f).replace(sys.prefix + "/lib/python3.11/site-packages/", "")
                  .replace(str(ROOT) + "/", "") for f in stack.split(";")]
        for f in set(frames):
            if "(worker/" in f:
                inclusive[f] += n
        own[frames[-1]] += n
        path = frames[-1].rpartition("(")[2].rstrip(")")
        package = path.split("/")[0] if "/" in path else path.removesuffix(".py")
        by_package[package if not path.startswith("/") else "stdlib"] += n
    if not total:
        return "(py-spy recorded no samples)"
    pct = lambda n: f"{100 * n / total:5.1f}%"  # noqa: E731
    lines = [f"{title}: {total} samples of the thread holding the GIL",
             "  own time by package: " + ", ".join(f"{k} {100 * n / total:.0f}%"
                                                   for k, n in by_package.most_common(12)),
             "  inclusive, worker/ functions:"]
    lines += [f"    {pct(n)}  {f[:140]}" for f, n in inclusive.most_common(top)]
    lines.append("  own time, top frames:")
    lines += [f"    {pct(n)}  {f[:140]}" for f, n in own.most_common(top // 2)]
    return "\n".join(lines)


def _trim_pstats(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    keep = [line.replace(str(ROOT) + "/", "").replace(sys.prefix + "/lib/python3.11/site-packages/", "")
            for line in lines if not line.lstrip().startswith(("Ordered by", "List reduced", "Random listing"))]
    return "\n".join("  " + line[:160] for line in keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="quick run: 20,000 pending, 1,000 due, 1,000 registrations each way (under a minute)")
    parser.add_argument("--pending", type=int, help="pending transactions in the large case (default 1,000,000)")
    parser.add_argument("--due", type=int, help="due transactions in both cases (default 10,000)")
    parser.add_argument("--register-count", type=int, help="registrations per API (default 100,000; --small 1,000)")
    parser.add_argument("--runs", type=int, default=3, help="timed ticks per case; the median is reported (3)")
    parser.add_argument("--batch-size", type=int, default=None, help="REMIND_BATCH_SIZE (default: the setting's)")
    parser.add_argument("--http-connections", type=int, default=12, help="concurrent HTTP connections (12)")
    parser.add_argument("--load-procs", type=int, default=2, help="processes bulk-loading the pending rows (2)")
    parser.add_argument("--no-py-spy", action="store_true", help="do not profile the web server with py-spy")
    parser.add_argument("--skip-register", action="store_true", help="tick only")
    parser.add_argument("--profile-top", type=int, default=22, help="cProfile lines shown per sort (22)")
    parser.add_argument("--verify-sample", type=int, default=100,
                        help="rows per kind registered through Remind.register and compared with the loader (100)")
    parser.add_argument("--pg-admin-dsn", default=os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--db-name", default="remind_bench", help="created, and dropped at the end (remind_bench)")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    args = parser.parse_args()
    args.pending = args.pending or (20_000 if args.small else 1_000_000)
    args.due = args.due or (1_000 if args.small else 10_000)
    args.register_count = args.register_count or (1_000 if args.small else 100_000)
    if args.batch_size is None:
        from worker.settings import Settings

        args.batch_size = Settings(_env_file=None).batch_size
    if args.pending <= args.due:
        parser.error("--pending must be larger than --due")

    tmp = Path(tempfile.mkdtemp(prefix="remind-bench-"))
    bench = Bench(args, tmp)
    figures: dict[str, object] = {}
    try:
        wall = time.perf_counter()
        busy_before = h.busy_before() / 100
        calibration = h.calibration_ms()
        bench.say(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
                  f"{100 * busy_before:.0f}% of the CPU busy before the bench started"
                  + (" (other processes are running: figures are pessimistic)" if busy_before > 0.15 else ""))
        bench.create()
        bench.load("due", args.due)
        bench.add_suppressions()
        bench.remember_due()
        base = bench.tick_case("base", args.due)
        bench.load("bg", args.pending - args.due)
        large = bench.tick_case("large", args.pending)
        # A deadline burst: the same due transactions all reach their deadline in this tick (a morning's
        # registrations expiring together): each is cancelled or escalated once, with its audit line, its
        # platform event and the customer's notices.
        bench.deadline_case = True
        deadline = bench.tick_case("deadline", args.pending)
        bench.deadline_case = False
        peak_tick = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ratio = large["median"] / base["median"]
        bench.say(f"\ntick with {args.pending:,} pending / with {args.due:,} pending: {large['median']:.3f}s / "
                  f"{base['median']:.3f}s = {ratio:.2f}x (target within 1.5x); {args.due:,} due claimed and "
                  f"enqueued in {large['median']:.3f}s (target well under 1s)")
        bench.say(f"{args.due:,} transactions settled at their deadline in one tick: {deadline['median']:.3f}s")
        bench.say(f"scheduler (this process) peak RSS after the ticks: {mb(peak_tick)} MB "
                  "(the bulk load ran in a child process)")
        figures = {f"tick_{label(args.due)}_pending_s": f"{base['median']:.3f}",
                   f"tick_{label(args.pending)}_pending_s": f"{large['median']:.3f}",
                   "ratio": f"{ratio:.2f}", "due": args.due,
                   "due_per_s": f"{args.due / large['median']:.0f}",
                   f"deadline_{label(args.due)}_s": f"{deadline['median']:.3f}", "batch_size": args.batch_size}
        if not args.skip_register:
            bench.clock.at = None  # registrations are created now, on the real clock
            figures["register_python_per_s"] = f"{bench.register_python():.0f}"
            figures["register_http_per_s"] = f"{bench.register_http():.0f}"
            figures["http_connections"] = args.http_connections
            figures["web_peak_rss_mb"] = bench.figures["web_peak_rss_mb"]
        figures["scheduler_peak_rss_mb"] = mb(peak_tick)
        figures["bench_peak_rss_mb"] = mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        figures["wall_s"] = f"{time.perf_counter() - wall:.0f}"
        figures["cpu_busy_before_pct"] = f"{100 * busy_before:.0f}"
        figures["calibration_ms"] = f"{calibration:.0f}"
    finally:
        bench.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(" ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
