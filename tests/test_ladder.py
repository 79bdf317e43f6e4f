"""The late-step rule and durations: pure functions, no store, no broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.ladder import Final, Match, Schedule, Step, decide, format_duration, parse_duration

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
    assert d.send is None and not d.skip and not d.settle and d.next_due_at == at(minutes=15)


def test_one_due_step_is_sent_and_the_cursor_moves_to_the_next():
    d = decide(LADDER, created_at=T0, deadline=at(hours=24), handled_until=None, now=at(minutes=16))
    assert d.send.id == "a" and d.handled_until == at(minutes=15) and d.next_due_at == at(hours=2)


def test_several_due_steps_send_only_the_latest_and_skip_the_rest():
    d = decide(LADDER, created_at=T0, deadline=at(hours=24), handled_until=None, now=at(hours=21))
    assert d.send.id == "c" and [s.id for s in d.skip] == ["a", "b"] and "superseded" in d.skip_reason
    assert d.next_due_at == at(hours=24)


def test_a_passed_deadline_settles_and_skips_what_was_waiting():
    d = decide(LADDER, created_at=T0, deadline=at(hours=24), handled_until=at(minutes=15), now=at(hours=25))
    assert d.settle and d.send is None and [s.id for s in d.skip] == ["b", "c"] and d.next_due_at is None


def test_an_earlier_expires_at_drops_steps_after_it():
    deadline = LADDER.deadline(T0, at(hours=3))
    assert deadline == at(hours=3)
    d = decide(LADDER, created_at=T0, deadline=deadline, handled_until=at(hours=2), now=at(hours=2, minutes=1))
    assert d.send is None and d.next_due_at == at(hours=3)
