"""The late-step rule and durations: pure functions, no store, no broker."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from worker.ladder import (
    Final,
    Match,
    QuietHours,
    Schedule,
    Step,
    Variant,
    choose_variant,
    decide,
    format_duration,
    parse_duration,
    slots,
)

T0 = datetime(2026, 11, 25, 9, tzinfo=UTC)
LADDER = Schedule(
    name="t", match=Match(), priority=1, version="v",
    steps=(Step("a", timedelta(minutes=15), ("push",), "nudge"),
           Step("b", timedelta(hours=2), ("sms",), "reminder"),
           Step("c", timedelta(hours=20), ("sms",), "final_warning")),
    final=Final("cancel", timedelta(hours=24), "cancelled", "not_confirmed", ("sms",)),
)


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400),
                                          ("1h30m", 5400), ("1d2h3m4s", 93784)])
def test_durations_parse_and_print_back(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize("bad", ["", "5", "5x", "m5", "30m1h", "1h1h", "-5m", "1.5h", "5 m"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def at(**kw):
    return T0 + timedelta(**kw)


def test_nothing_due_before_the_first_step():
    d = decide(LADDER, created_at=T0, deadline=at(hours=24), handled_until=None, now=at(minutes=14))
    assert not d.send and not d.skip and not d.settle and d.next_due_at == at(minutes=15)


def test_one_due_step_is_sent_and_the_cursor_moves_to_the_next():
    d = decide(LADDER, created_at=T0, deadline=at(hours=24), handled_until=None, now=at(minutes=16))
    assert [x.step.id for x in d.send] == ["a"] and d.handled_until == at(minutes=15) and d.next_due_at == at(hours=2)


def test_several_due_steps_send_only_the_latest_and_skip_the_rest():
    d = decide(LADDER, created_at=T0, deadline=at(hours=24), handled_until=None, now=at(hours=21))
    assert [x.step.id for x in d.send] == ["c"] and [x.step.id for x in d.skip] == ["a", "b"]
    assert "superseded" in d.skip_reason
    assert d.next_due_at == at(hours=24)


def test_a_passed_deadline_settles_and_skips_what_was_waiting():
    d = decide(LADDER, created_at=T0, deadline=at(hours=24), handled_until=at(minutes=15), now=at(hours=25))
    assert d.settle and not d.send and [x.step.id for x in d.skip] == ["b", "c"] and d.next_due_at is None


def test_an_earlier_expires_at_drops_steps_after_it():
    deadline = LADDER.deadline(T0, at(hours=3))
    assert deadline == at(hours=3)
    d = decide(LADDER, created_at=T0, deadline=deadline, handled_until=at(hours=2), now=at(hours=2, minutes=1))
    assert not d.send and d.next_due_at == at(hours=3)


# -- quiet hours ------------------------------------------------------------------------------------

QUIET = QuietHours(time(22), time(8))
NIGHT = replace(LADDER, quiet_hours=QUIET,
                steps=(Step("a", timedelta(minutes=15), ("push", "email"), "nudge"),
                       Step("b", timedelta(hours=2), ("sms",), "reminder"),
                       Step("c", timedelta(hours=6), ("sms", "email"), "final_warning")),
                final=Final("cancel", timedelta(hours=7), "cancelled", "not_confirmed", ("sms",)))


def local(text: str, zone: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


def test_sms_and_push_inside_quiet_hours_wait_for_the_morning_across_midnight_email_does_not():
    created = local("2026-11-25T21:50", "Asia/Shanghai")  # the nudge falls at 22:05, inside
    got = {(x.step.id, x.channels): x.at for x in slots(NIGHT, created, created + timedelta(hours=30),
                                                         "Asia/Shanghai")}
    morning = local("2026-11-26T08:00", "Asia/Shanghai")
    assert got == {("a", ("email",)): created + timedelta(minutes=15),  # email is not held
                   ("a", ("push",)): morning, ("b", ("sms",)): morning,
                   ("c", ("email",)): created + timedelta(hours=6), ("c", ("sms",)): morning}


def test_quiet_hours_follow_a_dst_change_in_the_customers_zone():
    # Europe/Berlin leaves summer time in the night of 2026-10-25: 08:00 local is 07:00 UTC, not 06:00.
    created = local("2026-10-24T23:00", "Europe/Berlin")
    held = next(x for x in slots(NIGHT, created, created + timedelta(hours=30), "Europe/Berlin") if x.step.id == "b")
    assert held.at == datetime(2026, 10, 25, 7, 0, tzinfo=UTC)
    # and the night it enters summer time (2026-03-29): 08:00 CEST is 06:00 UTC
    created = local("2026-03-28T23:00", "Europe/Berlin")
    held = next(x for x in slots(NIGHT, created, created + timedelta(hours=30), "Europe/Berlin") if x.step.id == "b")
    assert held.at == datetime(2026, 3, 29, 6, 0, tzinfo=UTC)


def test_a_final_warning_is_never_held_past_the_deadline_it_goes_before_quiet_hours():
    created = local("2026-11-25T16:30", "Asia/Shanghai")  # final warning at 22:30, deadline 23:30
    deadline = created + timedelta(hours=7)
    final = [x for x in slots(NIGHT, created, deadline, "Asia/Shanghai") if x.step.id == "c"]
    assert {x.channels: x.at for x in final} == {
        ("sms",): local("2026-11-25T21:59", "Asia/Shanghai"),  # the last moment before 22:00
        ("email",): created + timedelta(hours=6)}
    assert "before quiet hours" in next(x.note for x in final if x.channels == ("sms",))


def test_a_final_warning_already_inside_quiet_hours_goes_at_once():
    created = local("2026-11-25T22:10", "Asia/Shanghai")  # the whole ladder runs inside the night
    ladder = replace(NIGHT, steps=(Step("c", timedelta(hours=1, minutes=30), ("sms",), "final_warning"),),
                     final=Final("cancel", timedelta(hours=2), "cancelled", "x", ("sms",)))
    [final] = slots(ladder, created, created + timedelta(hours=2), "Asia/Shanghai")
    assert final.at == created + timedelta(hours=1, minutes=30) and "not held" in final.note


# -- A/B variants ------------------------------------------------------------------------------------

def test_variants_are_chosen_deterministically_and_by_weight():
    step = Step("b", timedelta(hours=2), ("sms",), "reminder",
                variants=(Variant("short", "reminder_short", 1), Variant("long", "reminder", 3)))
    picks = [choose_variant(step, f"tx_{i}") for i in range(4000)]
    assert picks == [choose_variant(step, f"tx_{i}") for i in range(4000)]  # stable
    share = sum(1 for name, _ in picks if name == "short") / len(picks)
    assert 0.22 < share < 0.28
    assert dict(picks)["short"] == "reminder_short"
    assert choose_variant(LADDER.steps[0], "tx_1") == ("default", "nudge")


def shipped(name: str) -> Schedule:
    from support import ROOT

    from worker.ladder import load_file

    return load_file(ROOT / "schedules" / f"{name}.yaml")


def test_a_final_warning_is_not_held_until_minutes_before_the_deadline():
    default = shipped("default")
    created = datetime(2026, 11, 25, 8, 10, tzinfo=UTC)  # final warning 04:10 UTC, inside 22:00-08:00
    final = [x for x in slots(default, created, created + timedelta(hours=24), "UTC") if x.step.id == "final_warning"]
    held = [x for x in final if "sms" in x.channels]
    assert held[0].at == datetime(2026, 11, 25, 21, 59, tzinfo=UTC)  # not 08:00, ten minutes before the cancel


def test_with_an_early_deadline_the_last_reminder_before_it_is_the_final_warning():
    default = shipped("default")
    created = datetime(2026, 11, 25, 20, 30, tzinfo=UTC)
    got = slots(default, created, created + timedelta(hours=5), "UTC")
    assert [(x.step.id, x.at) for x in got] == [
        ("nudge", created + timedelta(minutes=15)), ("reminder", datetime(2026, 11, 25, 21, 59, tzinfo=UTC))]
