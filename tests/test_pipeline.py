"""The whole pipeline (register → tick → broker → actor → render → send → record), on SQLite with the
in-process broker and on PostgreSQL with the real Redis broker."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from support import T0, transaction

from worker.errors import AlreadySettled


def steps_sent(h, tx_id):
    return [(line["step"], line["channel"]) for line in h.lines(tx_id)]


def test_reminders_arrive_in_order_with_full_transparency_then_cancel(make_harness):
    h = make_harness()
    h.remind.register(transaction("tx_1"))
    for minutes in (1, 15, 60, 120, 600, 1200, 1439, 1440, 1500):
        h.at(minutes=minutes).tick()
    # Channels of one step go out in parallel; steps themselves arrive in ladder order.
    assert sorted(steps_sent(h, "tx_1")) == sorted([
        ("nudge", "push"), ("reminder", "sms"), ("reminder", "push"), ("final_warning", "sms"),
        ("final_warning", "email"), ("final_warning", "push"), ("cancel", "sms"), ("cancel", "email"),
        ("cancel", "push")])
    order = [line["step"] for line in h.lines("tx_1")]
    assert order == sorted(order, key=["nudge", "reminder", "final_warning", "cancel"].index)
    sms = next(line for line in h.lines("tx_1") if line["step"] == "reminder" and line["channel"] == "sms")
    assert sms["recipient"] == "+8613800138000"
    for shown in ("1,000.00", "12.50", "1,012.50", "Bank card ending 1234", "https://pay.example/c/"):
        assert shown in sms["body"], shown
    assert "2026年11月26日 17:00" in sms["body"]  # the deadline, in Asia/Shanghai
    email = next(line for line in h.lines("tx_1") if line["channel"] == "email" and line["step"] == "final_warning")
    assert email["subject"] and "<a" in email["html"] and "https://pay.example/c/" in email["html"]
    view = h.remind.show("tx_1")
    assert view["status"] == "cancelled" and view["status_reason"] == "not_confirmed"
    assert view["cancelled_at"] == (T0 + timedelta(minutes=1440)).isoformat().replace("+00:00", "Z")
    assert [e["status"] for e in view["timeline"]] == ["sent"] * 9


def test_confirmation_stops_the_remaining_reminders(make_harness):
    h = make_harness()
    h.remind.register(transaction("tx_1"))
    h.at(minutes=16).tick()
    assert steps_sent(h, "tx_1") == [("nudge", "push")]
    h.remind.confirm("tx_1")
    for minutes in (130, 1300, 1500):
        h.at(minutes=minutes).tick()
    assert steps_sent(h, "tx_1") == [("nudge", "push")]
    view = h.remind.show("tx_1")
    assert view["status"] == "confirmed" and view["cancelled_at"] is None
    assert h.remind.confirm("tx_1")["status"] == "confirmed"  # repeating is fine


def test_confirmation_wins_over_a_message_already_queued(make_harness):
    h = make_harness(start_worker=False)
    h.remind.register(transaction("tx_1"))
    result = h.remind.tick(T0 + timedelta(minutes=16))  # enqueued, not yet consumed
    assert len(result.enqueued) == 1
    h.remind.confirm("tx_1")
    for delivery_id in result.enqueued:  # the actor runs now, after the confirmation
        assert h.remind.deliver(delivery_id) == "skipped"
    assert h.lines() == []
    [entry] = [e for e in h.remind.show("tx_1")["timeline"] if e["step"] == "nudge"]
    assert entry["status"] == "skipped" and "confirmed" in entry["reason"]


def test_late_registration_sends_only_the_latest_due_reminder(make_harness):
    h = make_harness()
    h.remind.register(transaction("tx_1"))
    h.at(hours=21).tick()  # nudge, reminder and final_warning are all due at once
    assert sorted(steps_sent(h, "tx_1")) == [
        ("final_warning", "email"), ("final_warning", "push"), ("final_warning", "sms")]
    skipped = [e for e in h.remind.show("tx_1")["timeline"] if e["status"] == "skipped"]
    assert {e["step"] for e in skipped} == {"nudge", "reminder"}
    assert all("superseded" in e["reason"] for e in skipped)


def test_a_passed_deadline_cancels_at_once_and_exactly_once(make_harness):
    h = make_harness()
    h.remind.register(transaction("tx_1", expires_at=(T0 + timedelta(hours=3)).isoformat()))
    h.at(hours=4).tick()  # 21:00 in Shanghai: late, but before quiet hours
    h.at(hours=4, minutes=30).tick()
    assert sorted(steps_sent(h, "tx_1")) == [("cancel", "email"), ("cancel", "push"), ("cancel", "sms")]
    view = h.remind.show("tx_1")
    assert view["status"] == "cancelled" and view["deadline"].startswith("2026-11-25T12:00")
    with pytest.raises(AlreadySettled):
        h.remind.confirm("tx_1")


def test_a_dropped_broker_message_is_recovered_after_its_lease(make_harness):
    h = make_harness(lease_seconds=30)
    real_enqueue = h.remind.enqueue
    h.remind.enqueue = lambda ids: None  # the broker loses every message of this tick
    h.remind.register(transaction("tx_1"))
    h.at(minutes=16).tick(settle=False)
    assert h.lines() == []
    h.remind.enqueue = real_enqueue
    h.at(minutes=16, seconds=10).tick(settle=False)  # lease not yet expired: nothing again
    assert h.lines() == []
    result = h.at(minutes=17).tick()
    assert result.recovered == 1
    assert steps_sent(h, "tx_1") == [("nudge", "push")]


def test_a_duplicate_message_sends_nothing_twice(make_harness):
    h = make_harness()
    real_enqueue = h.remind.enqueue
    h.remind.enqueue = lambda ids: real_enqueue(ids + ids + ids)
    for i in range(5):
        h.remind.register(transaction(f"tx_{i}"))
    h.at(minutes=130).tick()  # late: only "reminder" (sms + push) for each
    lines = h.lines()
    assert len(lines) == 10
    assert len({(r["transaction_id"], r["step"], r["channel"]) for r in lines}) == 10


def test_two_schedulers_never_double_send(make_harness):
    a = make_harness()
    b = make_harness(start_worker=False)
    b.remind.enqueue = a.remind.enqueue  # both feed the same workers
    for i in range(60):
        a.remind.register(transaction(f"tx_{i:03}", created_at=(T0 + timedelta(seconds=i)).isoformat()))
    for minutes in (16, 125, 1201, 1441):
        now = T0 + timedelta(minutes=minutes)
        a.clock.set(now)
        b.clock.set(now)
        barrier = threading.Barrier(2)

        def run(h, barrier=barrier, now=now):
            barrier.wait()
            h.remind.tick(now)

        threads = [threading.Thread(target=run, args=(h,)) for h in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.drain()
    lines = a.lines()
    keys = [(r["transaction_id"], r["step"], r["channel"]) for r in lines]
    assert len(keys) == len(set(keys)) == 60 * 9


def test_confirm_and_deadline_race_settles_each_transaction_once(make_harness):
    """Customers confirm while the tick settles the passed deadlines, batch after batch. The race is
    forced: the confirmations start while the tick holds its first batch, and the tick's later batches
    wait until one confirmation got in first, so both outcomes happen on every run."""
    h = make_harness(batch_size=10)
    ids = [f"tx_{i:03}" for i in range(40)]
    for tx_id in ids:
        h.remind.register(transaction(tx_id, expires_at=(T0 + timedelta(hours=1)).isoformat()))
    h.clock.set(T0 + timedelta(hours=2))
    outcomes = {}
    holding, one_confirmed = threading.Event(), threading.Event()
    store, real_advance, real_enqueue = h.remind.store, h.remind.store.advance, h.remind.enqueue

    def advance(conn, cursors, now):  # inside the tick's database transaction: its rows are claimed
        holding.set()
        time.sleep(0.1)  # let the confirmations run into the claim
        return real_advance(conn, cursors, now)

    def enqueue(ids_):  # after a batch committed: the next batch waits for a confirmation to land first
        assert one_confirmed.wait(10), "no confirmation got in between two batches"
        real_enqueue(ids_)

    store.advance, h.remind.enqueue = advance, enqueue

    def confirm_all():
        assert holding.wait(10)
        for tx_id in ids:
            try:
                h.remind.confirm(tx_id)
                outcomes[tx_id] = "confirmed"
                one_confirmed.set()
            except AlreadySettled:
                outcomes[tx_id] = "cancelled"

    t = threading.Thread(target=confirm_all)
    t.start()
    result = h.remind.tick(h.clock())
    t.join()
    h.drain()
    assert set(outcomes.values()) == {"confirmed", "cancelled"}, outcomes  # the race happened both ways
    assert result.settled == list(outcomes.values()).count("cancelled")
    for tx_id in ids:
        view = h.remind.show(tx_id)
        assert view["status"] == outcomes[tx_id]
        notices = [line for line in h.lines(tx_id) if line["step"] == "cancel"]
        assert len(notices) == (3 if view["status"] == "cancelled" else 0)


def test_quiet_hours_and_variants_through_the_scheduler(make_harness, tmp_path):
    import shutil

    from support import ROOT

    folder = tmp_path / "sched"
    folder.mkdir()
    shutil.copy(ROOT / "schedules" / "default.yaml", folder / "default.yaml")
    text = (folder / "default.yaml").read_text().replace(
        "    template: reminder\n",
        "    template: reminder\n    variants:\n      - {name: plain, template: reminder, weight: 1}\n"
        "      - {name: nudgy, template: nudge, weight: 1}\n")
    (folder / "default.yaml").write_text(text)
    h = make_harness(schedules_dir=folder)
    # 13:30 UTC is 21:30 in Shanghai: the 2h reminder (23:30) waits for 08:00; the nudge (21:45) does not
    start = T0 + timedelta(hours=4, minutes=30)
    for i in range(20):
        h.remind.register(transaction(f"tx_{i:02}", created_at=start.isoformat()))
    h.clock.set(start + timedelta(hours=2, minutes=5))
    h.tick()
    assert {line["step"] for line in h.lines()} == {"nudge"}
    planned = [e for e in h.remind.show("tx_00")["timeline"] if e["step"] == "reminder"]
    assert planned[0]["due_at"] == "2026-11-26T00:00:00Z" and "quiet hours" in planned[0]["reason"]
    h.clock.set(T0 + timedelta(hours=15, minutes=1))  # 08:01 in Shanghai
    h.tick()
    reminders = [line for line in h.lines() if line["step"] == "reminder"]
    assert len(reminders) == 40  # SMS + push for each, now
    variants = {line["transaction_id"]: line["variant"] for line in reminders}
    assert set(variants.values()) == {"plain", "nudgy"}
    again = {e["step"]: e["variant"] for e in h.remind.show("tx_03")["timeline"]}
    assert again["reminder"] == variants["tx_03"]
