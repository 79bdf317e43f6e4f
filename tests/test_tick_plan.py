"""The tick plans each distinct (schedule, zone, deadline offset, created-at cell) once (``SlotCache``):
what it decides must be exactly what planning each transaction alone decides, in every zone, at every
quiet-hour boundary and DST change; and the store's bulk statements must write and read what the
row-by-row ones did."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from support import ROOT, T0, transaction

from worker.ingest import parse_transaction
from worker.ladder import Final, Match, QuietHours, Schedule, SlotCache, Step, Variant, decide, load_file, slots
from worker.ladder.loader import min_final_gap
from worker.scheduler import plan_transaction
from worker.store import NewDelivery, NewTransaction

SHIPPED = [load_file(ROOT / "schedules" / f"{name}.yaml") for name in ("default", "new_customer", "risk_review")]
NIGHT = QuietHours(time(22), time(8))
#: Ladders the shipped files do not have: offsets in seconds (with a final-gap rule in whole minutes or not),
#: quiet hours that do not cross midnight or hold only sms, a short ladder whose final-gap rule is not whole
#: minutes (15m -> 3m45s), no quiet hours at all.
CRAFTED = [
    Schedule(name="seconds", match=Match(), priority=1, version="v1", quiet_hours=NIGHT,
             steps=(Step("a", timedelta(seconds=90), ("push", "email"), "nudge"),
                    Step("b", timedelta(minutes=47, seconds=13), ("sms",), "reminder"),
                    Step("c", timedelta(hours=5, seconds=7), ("sms", "email", "push"), "final_warning")),
             final=Final("cancel", timedelta(hours=6), "cancelled", "not_confirmed", ("sms", "email"))),
    Schedule(name="odd_first", match=Match(), priority=1, version="v1", quiet_hours=NIGHT,
             steps=(Step("a", timedelta(seconds=90), ("push",), "nudge"),
                    Step("b", timedelta(hours=2), ("sms", "push"), "final_warning")),
             final=Final("cancel", timedelta(hours=4), "cancelled", "not_confirmed", ("sms",))),
    Schedule(name="early_morning", match=Match(), priority=2, version="v1",
             quiet_hours=QuietHours(time(1, 30), time(5, 45), ("sms",)),
             steps=(Step("a", timedelta(minutes=5), ("sms", "push"), "nudge"),
                    Step("b", timedelta(hours=3), ("sms",), "reminder"),
                    Step("c", timedelta(hours=7), ("sms", "email"), "final_warning")),
             final=Final("escalate", timedelta(hours=8), "escalated", "risk_review", ("sms",))),
    Schedule(name="short", match=Match(), priority=3, version="v1", quiet_hours=QuietHours(time(0), time(7)),
             steps=(Step("a", timedelta(minutes=2), ("push",), "nudge"),
                    Step("b", timedelta(minutes=15), ("sms", "push"), "final_warning")),
             final=Final("cancel", timedelta(minutes=30), "cancelled", "not_confirmed", ("sms",))),
    Schedule(name="daylight", match=Match(), priority=4, version="v1",
             steps=(Step("a", timedelta(minutes=15), ("push",), "nudge"),
                    Step("b", timedelta(hours=2), ("sms",), "reminder")),
             final=Final("cancel", timedelta(hours=4), "cancelled", "not_confirmed", ("sms",))),
]
#: DST in both hemispheres, a 30-minute DST change (Lord Howe), offsets of :30 and :45, and a zone in 1935,
#: when Amsterdam's offset had seconds in it (+00:19:32): the cache must plan that one alone.
ZONES = ["UTC", "Asia/Shanghai", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata",
         "Asia/Kathmandu", "Pacific/Chatham", "America/Sao_Paulo"]
#: Nights when the clocks change (local dates), where quiet hours are 9, 10 or 11 hours long.
DST_DAYS = [("Europe/Berlin", "2026-03-29"), ("Europe/Berlin", "2026-10-25"), ("America/New_York", "2026-03-08"),
            ("America/New_York", "2026-11-01"), ("Australia/Lord_Howe", "2026-04-05"),
            ("Australia/Lord_Howe", "2026-10-04"), ("Pacific/Chatham", "2026-04-05")]


def created_times(rng: random.Random, schedule: Schedule, zone: str) -> list[datetime]:
    """A few transactions created in the same minute, placed so that one of their steps falls near a
    quiet-hour boundary, a DST change or anywhere; some exactly on the minute."""
    tz = ZoneInfo(zone)
    kind = rng.random()
    quiet = schedule.quiet_hours or NIGHT
    if kind < 0.5:  # a step due within two minutes of a quiet period's start or end
        day = datetime(2026, 1, 1) + timedelta(days=rng.randrange(365))
        edge = rng.choice([quiet.start, quiet.end])
        local = datetime.combine(day.date(), edge).replace(tzinfo=tz).astimezone(UTC)
        step = rng.choice(schedule.steps)
        base = local - step.after + timedelta(seconds=rng.randrange(-120, 121))
        if rng.random() < 0.4:  # where the final-gap rule tips: quiet hours end just too late for the deadline
            base = local + min_final_gap(schedule.steps[-1].after) - schedule.final.after
            base += timedelta(seconds=rng.randrange(-120, 121))
    elif kind < 0.75:  # around a DST change
        dst_zone, day = rng.choice(DST_DAYS)
        base = datetime.fromisoformat(day).replace(tzinfo=ZoneInfo(dst_zone)).astimezone(UTC)
        base += timedelta(minutes=rng.randrange(-24 * 60, 24 * 60))
    else:
        base = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(365 * 24 * 60))
    minute = base.replace(second=0, microsecond=0)
    out = [minute]
    for _ in range(rng.randrange(2, 9)):
        out.append(minute + timedelta(seconds=rng.randrange(60), microseconds=rng.choice([0, rng.randrange(10**6)])))
    return out


def cases(seed: int, count: int):
    """(schedule, zone, created_at, deadline, handled_until, now), deterministic from ``seed``."""
    rng = random.Random(seed)
    schedules = SHIPPED + CRAFTED
    made = 0
    while made < count:
        schedule, zone = rng.choice(schedules), rng.choice(ZONES)
        if rng.random() < 0.2:
            zone = rng.choice(DST_DAYS)[0]
        for created in created_times(rng, schedule, zone):
            deadline = created + schedule.final.after
            if rng.random() < 0.2:  # an expires_at before the schedule's own deadline, at any second
                deadline = created + timedelta(seconds=rng.randrange(60, int(schedule.final.after.total_seconds())))
            if rng.random() < 0.15:  # an expires_at within seconds of a quiet period's end or start
                held = [s.at for s in slots(schedule, created, deadline, zone) if s.note]
                if held:
                    deadline = max(created + timedelta(seconds=1),
                                   rng.choice(held) + timedelta(seconds=rng.randrange(-90, 91)))
            alone = slots(schedule, created, deadline, zone)
            times = [s.at for s in alone] + [deadline]
            handled = rng.choice([None, None, *times[:-1]]) if alone else None
            pick = rng.random()
            if pick < 0.4:  # exactly at a slot's time (the late-step rule's <=)
                now = rng.choice(times)
            elif pick < 0.6:
                now = rng.choice(times) + timedelta(microseconds=rng.choice([-1, 1]))
            else:
                now = created + timedelta(seconds=rng.randrange(int((deadline - created).total_seconds()) + 7200))
            yield schedule, zone, created, deadline, handled, now
            made += 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planning_from_the_cache_decides_as_planning_each_transaction_alone(seed):
    cache = SlotCache()
    checked = 0
    for schedule, zone, created, deadline, handled, now in cases(seed, 4000):
        alone = decide(schedule, created_at=created, deadline=deadline, handled_until=handled, now=now, zone=zone)
        shared = cache.decide(schedule, created_at=created, deadline=deadline, handled_until=handled, now=now,
                              zone=zone)
        assert shared == alone, (schedule.name, zone, created, deadline, handled, now)
        checked += 1
    assert checked >= 4000 and cache.made < checked * 0.75  # and transactions did share plans


@pytest.mark.parametrize("zone,day", [("Europe/Amsterdam", "1935-06-01"), ("Africa/Monrovia", "1960-03-01")])
def test_a_zone_whose_offset_has_seconds_is_planned_alone_and_the_same(zone, day):
    """Amsterdam was +01:19:32 in the summer of 1935, Monrovia -00:44:30 in 1960: quiet hours there begin
    and end at odd seconds in UTC, inside any minute."""
    tz = ZoneInfo(zone)
    evening = datetime.fromisoformat(f"{day}T22:00").replace(tzinfo=tz).astimezone(UTC)
    if not evening.second:
        pytest.skip(f"this tzdata has no seconds in {zone}'s offset in {day[:4]}")
    schedule, cache = SHIPPED[0], SlotCache()
    for step in schedule.steps:
        for seconds in range(-60, 61, 3):
            at = evening - step.after + timedelta(seconds=seconds)  # the step is due around 22:00 local
            for now in (at + step.after, at + timedelta(hours=21), at + timedelta(hours=25)):
                kwargs = dict(created_at=at, deadline=at + schedule.final.after, handled_until=None, now=now,
                              zone=zone)
                assert cache.decide(schedule, **kwargs) == decide(schedule, **kwargs), (step.id, seconds, now)


def test_a_zone_that_does_not_exist_still_cannot_be_planned():
    with pytest.raises(KeyError):  # ZoneInfoNotFoundError: the tick sets such a transaction aside
        SlotCache().decide(SHIPPED[0], created_at=T0, deadline=T0 + timedelta(hours=24), handled_until=None,
                           now=T0 + timedelta(minutes=16), zone="Mars/Olympus_Mons")


def claimed_row(tx_id: str, created: datetime, schedule: Schedule, **customer) -> dict:
    """A claimed row as the tick sees it; a customer field set to None or [] is left out."""
    content = parse_transaction(transaction(tx_id, created_at=created.isoformat()), now=created).canonical()
    for key, value in customer.items():
        if value:
            content["customer"][key] = value
        else:
            content["customer"].pop(key, None)
    return {"id": tx_id, "content": content, "created_at": created, "deadline": created + schedule.final.after,
            "handled_until": None, "schedule_version": "old"}


def test_the_tick_writes_the_same_deliveries_with_the_cache_variants_and_contacts_per_transaction():
    """Each transaction keeps its own A/B variant (a hash of its id) and its own reachable channels, though
    the slots are planned once for all of them."""
    rng = random.Random(7)
    default = SHIPPED[0]
    variants = (Variant("short", "reminder_short", 1), Variant("long", "reminder", 1))
    schedule = replace(default, steps=tuple(replace(s, variants=variants) if s.id == "reminder" else s
                                           for s in default.steps))
    contacts = [{}, {"phone": None}, {"push_tokens": []}, {"email": None, "push_tokens": []},
                {"timezone": "Europe/Berlin"}, {"timezone": "America/New_York", "phone": None}]
    suppressed = {("push", "fcm-token-1")}
    cache = SlotCache()
    minute = datetime(2026, 11, 25, 13, 40, tzinfo=UTC)  # 21:40 in Shanghai: the later steps meet the night
    picked = set()
    for i in range(300):
        created = minute + timedelta(seconds=rng.randrange(60))
        row = claimed_row(f"tx_{i:03}", created, schedule, **rng.choice(contacts))
        if rng.random() < 0.3:
            row["handled_until"] = created + timedelta(minutes=15)
        now = created + rng.choice([timedelta(minutes=16), timedelta(hours=2, seconds=30), timedelta(hours=21),
                                    timedelta(hours=25)])
        for supp in (frozenset(), suppressed):
            shared = plan_transaction(row, schedule, now, suppressed=supp, cache=cache)
            alone = plan_transaction(row, schedule, now, suppressed=supp)
            assert shared == alone, row["id"]
            picked |= {d.variant for d in shared[2] if d.step == "reminder"}
    assert picked == {"short", "long"}
    assert cache.made < 30  # 300 transactions created in one minute, in three zones


# -- the store's bulk statements (PostgreSQL: binary arrays; SQLite: row by row) -----------------------


def insert(store, tx_id: str, created: datetime, *, next_due_at: datetime) -> None:
    tx = parse_transaction(transaction(tx_id, created_at=created.isoformat()), now=created)
    store.insert_transaction(NewTransaction(
        id=tx.id, content=tx.canonical(), customer_id=tx.customer.id, segment=tx.customer.segment,
        risk_flag=tx.risk_flag, amount=tx.amount, currency=tx.currency, schedule="default",
        schedule_version="v", created_at=created, expires_at=None, deadline=created + timedelta(hours=24),
        next_due_at=next_due_at))


def test_the_claim_reads_each_row_as_the_store_reads_it(make_harness):
    h = make_harness(start_worker=False)
    store = h.remind.store
    for i in range(5):
        insert(store, f"tx_{i}", T0 + timedelta(seconds=i, microseconds=17), next_due_at=T0 + timedelta(minutes=i))
    insert(store, "tx_later", T0, next_due_at=T0 + timedelta(hours=1))
    with store.begin() as conn:
        claimed = store.claim_due(conn, T0 + timedelta(minutes=3), 10)
    assert [r["id"] for r in claimed] == ["tx_0", "tx_1", "tx_2", "tx_3"]  # due ones, oldest first
    for row in claimed:
        assert row == store.get_transaction(row["id"])
        assert row["created_at"].utcoffset() == timedelta(0) and row["registered_at"].tzinfo is not None


def test_bulk_delivery_rows_keep_their_states_and_only_those_sent_now_are_enqueued(make_harness):
    h = make_harness(start_worker=False)
    store = h.remind.store
    insert(store, "tx_1", T0, next_due_at=T0)
    now, morning = T0 + timedelta(minutes=16), T0 + timedelta(hours=10)
    rows = [NewDelivery("tx_1", "nudge", "reminder", "push", "nudge", now, "queued"),
            NewDelivery("tx_1", "nudge", "reminder", "email", "nudge", now, "skipped", "no email address on file"),
            NewDelivery("tx_1", "reminder", "reminder", "sms", "reminder", morning, "queued",
                        "held for quiet hours until 08:00 (Asia/Shanghai)", "short", held=True)]
    with store.begin() as conn:
        ids = store.add_deliveries(conn, rows, now, timedelta(minutes=5))
        again = store.add_deliveries(conn, rows[:1], now, timedelta(minutes=5))  # exists already: kept
        none_reason = store.add_deliveries(conn, [NewDelivery("tx_1", "final", "notice", "sms", None, now, "queued")],
                                           now, timedelta(minutes=5))
    got = {(d["step"], d["channel"]): d for d in store.deliveries_of("tx_1")}
    assert ids == [got["nudge", "push"]["id"]] and again == [] and none_reason == [got["final", "sms"]["id"]]
    push, email, sms = got["nudge", "push"], got["nudge", "email"], got["reminder", "sms"]
    assert (push["status"], push["enqueued_at"], push["lease_until"]) == ("queued", now, now + timedelta(minutes=5))
    assert (email["status"], email["reason"], email["lease_until"]) == ("skipped", "no email address on file", None)
    assert (sms["status"], sms["enqueued_at"], sms["lease_until"], sms["variant"]) == ("queued", None, morning,
                                                                                     "short")
    assert got["final", "sms"]["template"] is None and got["final", "sms"]["reason"] is None
