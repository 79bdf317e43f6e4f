"""The funnel's and the costs' roll-up (worker/store/rollup.py): the funnel and the priced cost figures read
from rolled-up units are exactly the ones computed live, after the roll-up, and after every late change to a
rolled-up transaction (an ops approval or decline of an escalated one with its notice, a review contact's
notice, the customer confirming one after it, a sent reminder reported failed later, a sent notice reported
failed and its fallback sent, an erasure that masks a phone an older SMS is priced by), on both backends,
before the next roll-up and after it."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from support import T0, private_database, transaction, write_files

from worker.export import cost_report, cost_totals, export
from worker.stats import assemble, funnel, summarize
from worker.store import funnel_figures, funnel_rows, make_engine, rollup, upgrade
from worker.store.export import cost_figures
from worker.store.repo import NewDelivery, Store
from worker.store.rollup import forget, forget_all, roll_up, roll_up_all
from worker.store.tables import deliveries, transactions

SCHEDULES = {
    "ab.yaml": """
name: ab
match: {}
priority: 100
steps:
  - after: 15m
    id: nudge
    channels: [push]
    variants:
      - {name: plain, template: nudge, weight: 1}
      - {name: short, template: reminder, weight: 1}
  - {after: 2h, channels: [sms, push], template: reminder}
  - {after: 20h, channels: [sms, email, push], template: final_warning}
cancel: {after: 24h, template: cancelled, reason: not_confirmed, channels: [sms, email, push]}
""",
    "review.yaml": """
name: review
match: {risk_flag: true}
priority: 10
steps:
  - {after: 5m, channels: [sms, push], template: verify}
  - {after: 1h, channels: [sms, email, push], template: final_warning}
escalate: {after: 2h, template: escalated, reason: risk_review, channels: [sms, email]}
""",
}
PRICES = """\
currency: EUR
sms: {default: 0.10, 1: 0.01, 44: 0.05, 86: 0.04}
email: 0.002
push: 0.0005
"""
#: The customers' phones: c_0 in China, c_1 in the US, c_2 in the UK; the others (c_erase, c_review) Chinese.
PHONES = {"c_0": "+8613800138000", "c_1": "+12127365000", "c_2": "+447911123456"}
#: Transactions whose SMS are made older than migration 0008 (no calling code: priced by the phone's prefix).
BEFORE_0008 = ("a4", "a7", "a8", "r3")
#: Windows the figures are compared over: all of it, one that starts between transactions, one schedule.
WINDOWS = ((T0 - timedelta(days=30), None), (T0 - timedelta(minutes=7), None), (T0 - timedelta(days=30), "review"))


def build_history(make_harness, tmp_path):
    """16 transactions on ``ab`` (created a minute apart; customers confirm after the nudge, after the
    reminder, before any step, or never) and 4 risk-flagged ones on ``review`` that escalate; a day later
    everything is settled but ``p0``, registered late in the day (customer ``c_erase``, like ``a4``)."""
    folder = write_files(tmp_path / "schedules", SCHEDULES)
    prices = write_files(tmp_path, {"pricing.yaml": PRICES}) / "pricing.yaml"
    h = make_harness(schedules_dir=folder, ops_tokens="ops-token", pricing_file=prices)
    r = h.remind
    for i in range(16):
        customer = {"id": "c_erase" if i == 4 else f"c_{i % 3}", "phone": PHONES.get(f"c_{i % 3}")}
        r.register(transaction(f"a{i}", created_at=(T0 - timedelta(minutes=i)).isoformat(), customer=customer))
    for i in range(4):
        r.register(transaction(f"r{i}", risk_flag=True, customer={"id": "c_review"}))
    h.at(minutes=2)
    r.confirm("a15", by_customer=True)  # before any step
    h.at(minutes=5).tick()
    h.at(minutes=15).tick()
    for tx_id in ("a0", "a1", "a2"):
        h.at(minutes=25)
        r.confirm(tx_id, by_customer=True)
    h.at(hours=1).tick()
    h.at(hours=2).tick()  # reminders; the review transactions escalate
    h.at(hours=2, minutes=30)
    r.confirm("a3", by_customer=True)
    r.confirm("a5")  # the platform's API
    r.cancel("a6", "customer_request")
    h.at(hours=20).tick()
    h.at(hours=23)
    r.register(transaction("p0", customer={"id": "c_erase"}, created_at=(T0 + timedelta(hours=23)).isoformat()))
    h.at(hours=24).tick()
    h.at(hours=24, minutes=30).tick()
    with r.store.begin() as conn:  # some SMS as sent before 0008 (those transactions' roll-up: as it was then)
        conn.execute(text("UPDATE deliveries SET country_code = NULL WHERE channel = 'sms' AND transaction_id IN "
                          f"({', '.join(repr(x) for x in BEFORE_0008)})"))
        forget(conn, list(BEFORE_0008))
    return h


def same_figures(store) -> list[dict]:
    """The funnel and the costs from the roll-up, equal to the ones computed live and to the Python references
    on every window; returns the first window's funnel."""
    first = None
    for since, schedule in WINDOWS:
        rolled = assemble(funnel_figures(store, since, schedule))
        assert rolled == assemble(funnel_figures(store, since, schedule, rolled=False)), (since, schedule)
        assert rolled == summarize(*funnel_rows(store, since, schedule)), (since, schedule)
        same_costs(store, since, schedule)
        first = first if first is not None else rolled
    return first


def same_costs(store, since, schedule) -> None:
    """The cost figures from the roll-up: the same groups (calling code, or the phone's prefix) as computed
    live, and the same money and customer confirmations per step as the row-by-row export's."""
    def ordered(figures):
        return [sorted(part, key=lambda row: [str(row[k]) for k in sorted(row)]) for part in figures]

    live = ordered(cost_figures(store, since=since, schedule=schedule, rolled=False))
    assert ordered(cost_figures(store, since=since, schedule=schedule)) == live, (since, schedule)
    pricing = store_pricing(store)
    totals, rows = cost_totals(store, pricing, since=since, schedule=schedule), cost_report(
        store, pricing, since=since, schedule=schedule)
    assert totals.by_step == rows.by_step, (since, schedule)
    assert {name: {k: v for k, v in s.items() if k != "cost_per_transaction"}
            for name, s in totals.by_schedule.items()} == rows.by_schedule, (since, schedule)
    confirmed: dict[tuple, int] = {}
    for row in export(store, pricing, since=since, schedule=schedule)["rows"]:
        key = (row["schedule"], row["step"], row["variant"])
        confirmed[key] = confirmed.get(key, 0) + row["confirmed_after"]
    assert totals.customer_confirmations == {k: n for k, n in confirmed.items() if n}, (since, schedule)


def store_pricing(store):
    from worker.pricing import parse_pricing

    return parse_pricing(Path("pricing.yaml"), PRICES)


def costs_of(store) -> dict:
    """What /ops shows of the costs over the first window: per schedule, and per (schedule, step, variant)."""
    totals = cost_totals(store, store_pricing(store), since=WINDOWS[0][0])
    return {**{name: s["cost"] for name, s in totals.by_schedule.items()}, **totals.by_step}


def rolled_ids(store) -> set[str]:
    with store.engine.connect() as conn:
        return {row[0] for row in conn.execute(text("SELECT transaction_id FROM funnel_rolled WHERE NOT stale"))}


def by_name(figures: list[dict]) -> dict[str, dict]:
    return {s["schedule"]: s for s in figures}


def test_rolled_up_figures_equal_the_live_ones_through_every_late_change(make_harness, tmp_path):
    h = build_history(make_harness, tmp_path)
    r, store = h.remind, h.remind.store
    roll_up_all(store)
    rolled = rolled_ids(store)
    # every settled transaction is rolled up (the tick did part of it already); the pending one is not
    assert rolled == {f"a{i}" for i in range(16)} | {f"r{i}" for i in range(4)}
    before = same_figures(store)
    ab, review = by_name(before)["ab"], by_name(before)["review"]
    assert (review["escalated"], review["approved"], ab["pending"], ab["confirmed_before_first_step"]) == (4, 0, 1, 1)

    # ops approve one escalated transaction and decline another: counted at once, before any roll-up, with the
    # notices that tell their customers
    cost = costs_of(store)
    r.review("r0", "approve", actor="ana")
    r.review("r1", "decline", actor="ana", reason="risk_declined")
    h.drain()
    after = by_name(same_figures(store))["review"]
    assert costs_of(store)["review"] > cost["review"]
    assert (after["escalated"], after["approved"], after["cancelled"]) == (2, 1, 1)
    last_step = {s["step"]: s for s in after["steps"]}["final_warning"]
    assert (last_step["escalated"], last_step["cancelled"]) == (2, 1)
    assert {"r0", "r1"}.isdisjoint(rolled_ids(store))  # computed live until rolled up again

    # the customer confirms an escalated transaction after ops asked them to verify it (a notice: billed)
    cost = costs_of(store)
    r.review("r2", "contact", actor="ana")
    h.drain()
    same_figures(store)
    assert costs_of(store)["review"] > cost["review"] and "r2" not in rolled_ids(store)
    r.confirm("r2", by_customer=True)
    after = by_name(same_figures(store))["review"]
    assert (after["escalated"], after["confirmed"]) == (1, 1)

    # a provider reports a sent reminder undelivered after all: the only step a0 got no longer counts
    nudge = next(d for d in store.deliveries_of("a0") if d["kind"] == "reminder")
    assert nudge["status"] in ("sent", "delivered")
    r.outcomes.failed(nudge["id"], "twilio reported undelivered (error 30005)")
    ab_after = by_name(same_figures(store))["ab"]
    assert ab_after["confirmed_before_first_step"] == 2
    assert sum(s["reached"] for s in ab_after["steps"] if s["step"] == "nudge") == sum(
        s["reached"] for s in ab["steps"] if s["step"] == "nudge") - 1

    # a sent notice reported failed after all: billed all the same, and its fallback (push) is billed too
    notice = next(d for d in store.deliveries_of("r3") if d["kind"] == "notice" and d["channel"] == "sms")
    assert notice["status"] in ("sent", "delivered") and "r3" in rolled_ids(store)
    cost = costs_of(store)
    assert r.outcomes.failed(notice["id"], "twilio reported undelivered (error 30005)") == "push"
    h.drain()
    same_figures(store)
    assert costs_of(store)["review"] == cost["review"] + Decimal("0.0005")

    # an erasure: the pending transaction is cancelled, the settled one of the same customer only scrubbed; its
    # SMS sent before 0008 (a4, to +1) are priced by the masked phone now: the default price
    cost = costs_of(store)
    r.erase_customer("c_erase")
    ab_after = by_name(same_figures(store))["ab"]
    assert (ab_after["pending"], ab_after["cancelled"]) == (0, ab["cancelled"] + 1)
    assert costs_of(store)["ab"] > cost["ab"]

    changed = same_figures(store)
    roll_up_all(store)  # rolled up again, with the changes
    assert rolled_ids(store) == rolled | {"p0"}
    assert same_figures(store) == changed


def test_the_funnel_reads_the_rolled_up_units(make_harness, tmp_path):
    """Once rolled up, a settled transaction's units are read from the roll-up, not from its deliveries."""
    h = build_history(make_harness, tmp_path)
    store = h.remind.store
    roll_up_all(store)
    live = funnel(store, since=T0 - timedelta(days=1))
    with store.begin() as conn:
        conn.execute(text("UPDATE funnel_units SET push = push + 100 "
                          "WHERE transaction_id = 'a10' AND step = 'reminder'"))
    read = funnel(store, since=T0 - timedelta(days=1))
    push = [{(s["step"], s["variant"]): s["messages"].get("push", 0) for s in x["schedules"][0]["steps"]}
            for x in (live, read)]
    assert push[1][("reminder", "default")] == push[0][("reminder", "default")] + 100


def test_the_costs_read_the_rolled_up_units(make_harness, tmp_path):
    """Once rolled up, a settled transaction's billed messages and its customer confirmation are read from the
    roll-up, not from its deliveries."""
    h = build_history(make_harness, tmp_path)
    store = h.remind.store
    roll_up_all(store)
    pricing = store_pricing(store)
    live = cost_totals(store, pricing, since=WINDOWS[0][0])
    with store.begin() as conn:
        conn.execute(text("UPDATE cost_units SET push = push + 100 "
                          "WHERE transaction_id = 'a10' AND kind = 'reminder' AND step = 'reminder'"))
        variant = conn.execute(text("SELECT variant FROM funnel_units WHERE transaction_id = 'a0' "
                                    "AND by_customer")).scalar_one()
        conn.execute(text("UPDATE funnel_units SET by_customer = false WHERE transaction_id = 'a0'"))
    read = cost_totals(store, pricing, since=WINDOWS[0][0])
    key = ("ab", "reminder", "default")
    assert read.by_step[key] == live.by_step[key] + 100 * Decimal("0.0005")
    assert read.by_schedule["ab"]["cost"] == live.by_schedule["ab"]["cost"] + 100 * Decimal("0.0005")
    nudge = ("ab", "nudge", variant)
    assert read.customer_confirmations.get(nudge, 0) == live.customer_confirmations[nudge] - 1


def test_pending_transactions_and_reminders_in_flight_are_left_live(make_harness, tmp_path):
    h = build_history(make_harness, tmp_path)
    store = h.remind.store
    h.remind.register(transaction("p1", created_at=(T0 + timedelta(hours=24)).isoformat()))
    h.at(hours=24, minutes=45).tick(settle=False)  # p1's nudge is due: queued, not sent yet
    h.remind.cancel("p1", "customer_request")
    with store.engine.connect() as conn:  # settled, but a reminder or the cancellation notice is still queued:
        # its units and its cost could change
        queued = conn.execute(text("SELECT count(*) FROM deliveries WHERE transaction_id = 'p1' "
                                   "AND kind IN ('reminder', 'notice') AND status IN ('queued', 'sending')")).scalar()
    roll_up_all(store)
    assert "p0" not in rolled_ids(store)
    assert ("p1" in rolled_ids(store)) == (queued == 0)
    h.drain()  # what was in flight goes out: p1's figures change, live
    same_figures(store)
    roll_up_all(store)
    assert "p1" in rolled_ids(store) and "p0" not in rolled_ids(store)
    same_figures(store)


def test_the_previous_releases_roll_up_cannot_mark_a_transaction_rolled_on_postgresql(make_harness, tmp_path):
    """During a deploy a scheduler of the previous release may still be rolling up: it would mark transactions
    rolled with funnel units and no cost units, and the costs would read them as zero. Its insert (no version)
    is refused by the schema."""
    h = build_history(make_harness, tmp_path)
    store = h.remind.store
    if not store.pg:
        return  # SQLite runs one process: no two releases at once (its column has a default)
    with store.begin() as conn:  # a0 as if never rolled up
        for table in ("funnel_rolled", "funnel_units", "cost_units"):
            conn.execute(text(f"DELETE FROM {table} WHERE transaction_id = 'a0'"))
    previous = ("INSERT INTO funnel_rolled (transaction_id, created_at, stale) SELECT t.id, t.created_at, false "
                "FROM transactions AS t WHERE t.id = 'a0' ON CONFLICT (transaction_id) DO UPDATE SET stale = false")
    with pytest.raises(IntegrityError, match="version"), store.begin() as conn:
        conn.execute(text(previous))
    assert "a0" not in rolled_ids(store)
    same_figures(store)  # a0 is computed live: slower, never wrong


def test_the_tick_rolls_up_a_step_at_a_time_and_a_failure_never_stops_it(make_harness, tmp_path, monkeypatch,
                                                                         caplog):
    h = build_history(make_harness, tmp_path)  # its ticks rolled up what had settled
    store = h.remind.store
    assert {"a0", "a1", "a2", "a15"} <= rolled_ids(store)
    same_figures(store)

    import worker.scheduler as scheduler

    def broken(_store, **_kw):
        raise RuntimeError("roll-up broke")

    monkeypatch.setattr(scheduler, "roll_up", broken)
    h.remind.register(transaction("n1", created_at=(T0 + timedelta(hours=25)).isoformat()))
    with caplog.at_level(logging.ERROR, logger="remind.scheduler"):
        h.at(hours=25, minutes=20).tick()
    nudge = [d["status"] for d in store.deliveries_of("n1") if d["kind"] == "reminder"]
    assert nudge and set(nudge) <= {"sent", "delivered"}  # n1's nudge went out all the same
    assert "funnel roll-up step failed" in caplog.text
    same_figures(store)


def test_the_sweep_goes_round_in_small_steps(make_harness, tmp_path):
    """A step rolls up at most ``limit`` transactions; the sweep comes back for the ones it had to leave."""
    h = build_history(make_harness, tmp_path)
    store = h.remind.store
    forget_all(store)
    steps = []
    while True:
        step = roll_up(store, limit=3)
        assert step.rolled <= 3 + 3 and step.examined <= 3
        steps.append(step)
        if step.caught_up:
            break
    assert len(steps) >= 7 and rolled_ids(store) == {f"a{i}" for i in range(16)} | {f"r{i}" for i in range(4)}
    # p0 settles: the next round starts at it (the oldest transaction left behind) and rolls it up
    h.remind.cancel("p0", "customer_request")
    h.drain()
    for _ in range(10):
        roll_up(store, limit=3)
    assert "p0" in rolled_ids(store)
    same_figures(store)


def remind_db(h, tmp_path: Path, monkeypatch, *args: str):
    """``remind db ARGS`` on the harness's database, as ops would run it."""
    from click.testing import CliRunner

    from worker.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", h.remind.settings.database_url)
    monkeypatch.delenv("REDIS_URL", raising=False)
    return CliRunner().invoke(main, ["db", *args])


def test_remind_db_rollup_rolls_up_everything_at_once(make_harness, tmp_path, monkeypatch):
    h = build_history(make_harness, tmp_path)
    store = h.remind.store
    forget_all(store)
    result = remind_db(h, tmp_path, monkeypatch, "rollup")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("funnel roll-up: 20 transactions rolled up in ")
    assert rolled_ids(store) == {f"a{i}" for i in range(16)} | {f"r{i}" for i in range(4)}
    same_figures(store)


def test_remind_db_rollup_again_mends_what_writers_of_the_previous_release_left_behind(make_harness, tmp_path,
                                                                                        monkeypatch):
    """During a deploy, processes of the previous release may change rolled-up transactions: their ``forget``
    knows only the funnel units (the cost units stay, counted twice while live), and their notices forget
    nothing (a cost missing for good). ``remind db rollup --again`` writes the roll-up anew."""
    h = build_history(make_harness, tmp_path)
    store = h.remind.store
    roll_up_all(store)
    same_figures(store)
    at = T0 + timedelta(hours=30)
    with store.begin() as conn:  # the previous release: an approval's forget, then a decline's notice
        conn.execute(text("UPDATE funnel_rolled SET stale = true WHERE transaction_id = 'a0'"))
        conn.execute(text("DELETE FROM funnel_units WHERE transaction_id = 'a0'"))
        conn.execute(insert(deliveries).values(
            transaction_id="a1", step="declined", kind="notice", channel="email", template="cancelled",
            variant="default", due_at=at, status="sent", sent_at=at, updated_at=at, attempts=1))
    with pytest.raises(AssertionError):
        same_figures(store)
    result = remind_db(h, tmp_path, monkeypatch, "rollup", "--again")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("funnel roll-up: 20 transactions rolled up in ")
    same_figures(store)


def test_a_notice_committed_while_the_roll_up_waits_keeps_the_transaction_live_on_postgresql(monkeypatch):
    """A review contact commits its notice and lets go of the transaction while the roll-up's statement is
    running, just before that statement locks the row: under READ COMMITTED the locking statement would still
    judge "nothing in flight" on its older snapshot and roll the transaction up without the notice, whose
    cost would then be missing for good. The check runs after the locks, on a snapshot that has the notice."""
    with private_database(f"remind_race_{uuid.uuid4().hex[:8]}") as url:
        engine = make_engine(url)
        store = Store(engine)
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(insert(transactions).values(
                id="T", status="escalated", content={"customer": {"id": "c", "phone": "+4915112345678"},
                                                     "amount": "10.00"},
                customer_id="c", risk_flag=True, amount=10, currency="EUR", schedule="s", schedule_version="1",
                created_at=now - timedelta(hours=1), deadline=now - timedelta(minutes=1), registered_at=now,
                escalated_at=now - timedelta(minutes=1), settled_source="deadline"))
            conn.execute(insert(deliveries).values(
                transaction_id="T", step="r1", kind="reminder", channel="sms", variant="default", due_at=now,
                status="sent", sent_at=now - timedelta(minutes=30), updated_at=now, segments=1, country_code=49,
                attempts=1))
        original = rollup._of_ids

        def slowed(pg: bool):  # the window, made wide: the locking statement sleeps before it reaches the row
            statement = original(pg)
            return lambda sql: statement(sql.replace("WHERE t.id", "WHERE pg_sleep(1.5) IS NOT NULL AND t.id", 1)
                                         if "FOR SHARE OF t SKIP LOCKED" in sql else sql)

        monkeypatch.setattr(rollup, "_of_ids", slowed)
        contact = engine.connect()
        writing = contact.begin()
        store.lock_transaction(contact, "T")  # Decisions.contact: the row lock, a notice, the review state
        rolling = threading.Thread(target=rollup.roll_up, args=(store,))
        rolling.start()
        time.sleep(0.5)  # the roll-up's statement has its snapshot, and sleeps
        store.add_deliveries(contact, [NewDelivery("T", "contact", "notice", "sms", "contact", now, "queued")], now,
                             timedelta(minutes=5))
        store.set_review_state(contact, "T", "contacted")
        writing.commit()
        contact.close()
        rolling.join(30)
        monkeypatch.setattr(rollup, "_of_ids", original)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM funnel_rolled WHERE NOT stale")).scalar_one() == 0
            conn.execute(update(deliveries).where(deliveries.c.kind == "notice").values(  # the notice goes out
                status="sent", sent_at=now, segments=1, country_code=49))
        roll_up_all(store)
        assert cost_figures(store, rolled=True)[1] == cost_figures(store, rolled=False)[1]
        with engine.begin() as conn:
            assert conn.execute(text("SELECT kind FROM cost_units ORDER BY kind")).scalars().all() == [
                "notice", "reminder"]
        engine.dispose()


def test_an_upgrade_to_0010_cut_short_in_its_index_builds_runs_again_on_postgresql():
    """The concurrent index builds wait for every older snapshot (a long export, a pg_dump); a deploy that gives up
    on them cancels the build after the revision's first steps were committed: running the upgrade again must
    finish it, not fail on a column it finds already there."""
    from alembic import command
    from alembic.config import Config

    from worker.store.migrate import MIGRATIONS

    with private_database(f"remind_rerun_{uuid.uuid4().hex[:8]}") as url:
        engine = make_engine(url)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.connect() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0009")
            conn.commit()
        engine.dispose()
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        old = psycopg.connect(dsn)  # an older snapshot, held: CREATE INDEX CONCURRENTLY waits for it
        old.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        old.execute("SELECT count(*) FROM transactions").fetchone()

        def cancel_the_build() -> None:
            with psycopg.connect(dsn, autocommit=True) as admin:
                for _ in range(300):
                    building = admin.execute("SELECT pid FROM pg_stat_activity WHERE query ILIKE "
                                             "'CREATE INDEX CONCURRENTLY%'").fetchall()
                    if building:
                        admin.execute("SELECT pg_cancel_backend(%s)", building[0])
                        return
                    time.sleep(0.05)

        canceller = threading.Thread(target=cancel_the_build)
        canceller.start()
        engine = make_engine(url)
        with pytest.raises(OperationalError, match="cancel"):
            upgrade(engine)
        canceller.join()
        old.rollback()
        old.close()
        engine.dispose()
        engine = make_engine(url)
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0010"
            valid = dict(conn.execute(text(
                "SELECT c.relname, i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
                "WHERE c.relname IN ('ix_cost_units_created_at', 'ix_funnel_units_attributed')")).all())
        assert valid == {"ix_cost_units_created_at": True, "ix_funnel_units_attributed": True}
        engine.dispose()
