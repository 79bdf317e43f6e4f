"""When is each step sent, and what does a tick do now. The late-step rule, quiet hours and A/B
variants are decided here, and only here.

Pure functions of the ladder and the clock: no SQL, no broker, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from .loader import min_final_gap
from .model import Schedule, Step

#: How long before quiet hours a final warning goes out when holding it would pass the deadline.
BEFORE_QUIET = timedelta(minutes=1)


@dataclass(frozen=True)
class Slot:
    """Some channels of one step, and when they go out (after any quiet-hours shift)."""

    step: Step
    index: int  # the step's place in the ladder
    channels: tuple[str, ...]
    at: datetime
    note: str | None = None  # why ``at`` differs from the ladder's own time


@dataclass(frozen=True)
class Decision:
    """What one tick does for one pending transaction."""

    send: tuple[Slot, ...]  # what goes out now: slots of one step
    skip: tuple[Slot, ...]  # due slots recorded as skipped (late-step rule)
    skip_reason: str
    settle: bool  # the deadline has passed: cancel or escalate now
    handled_until: datetime | None  # time of the newest slot handled so far
    next_due_at: datetime | None  # when this transaction next needs the scheduler


def choose_variant(step: Step, transaction_id: str) -> tuple[str, str]:
    """(variant name, template): deterministic from the transaction id, weighted."""
    if not step.variants:
        return "default", step.template
    total = sum(v.weight for v in step.variants)
    point = int.from_bytes(hashlib.sha256(f"{step.id}:{transaction_id}".encode()).digest()[:8], "big") % total
    for variant in step.variants:
        if point < variant.weight:
            return variant.name, variant.template
        point -= variant.weight
    raise AssertionError("unreachable: weights are positive")


def slots(schedule: Schedule, created_at: datetime, deadline: datetime, zone: str | ZoneInfo = "UTC") -> list[Slot]:
    """Every reminder slot before the deadline, in sending order.

    Quiet hours hold the schedule's quiet channels to the end of the quiet period. The last reminder
    before the deadline (the final warning) is never held so late that it leaves less than the
    final-gap rule's room before the deadline: it goes out just before quiet hours begin instead, or
    at its own time when that moment has already passed."""
    return [slot for slot, _relative in placed_slots(schedule, created_at, deadline, zone)]


def placed_slots(schedule: Schedule, created_at: datetime, deadline: datetime,
                 zone: str | ZoneInfo = "UTC") -> list[tuple[Slot, bool]]:
    """``slots``, each with whether its time is the step's own (``created_at`` + ``after``: True) or a
    moment of the quiet hours (their end, or a minute before their start: False).

    ``SlotCache`` shifts the first kind to another ``created_at`` and keeps the second."""
    tz = zone if isinstance(zone, ZoneInfo) else ZoneInfo(zone)
    quiet = schedule.quiet_hours
    out: list[tuple[Slot, bool]] = []
    # The final warning is the last reminder that comes before this transaction's deadline.
    last = max((i for i, s in enumerate(schedule.steps) if created_at + s.after < deadline), default=-1)
    for index, step in enumerate(schedule.steps):
        due = created_at + step.after
        period = quiet.period(due, tz) if quiet else None
        held = tuple(c for c in step.channels if quiet and c in quiet.channels)
        if period is None or not held:
            out.append((Slot(step, index, step.channels, due), True))
            continue
        start, end = period
        local_end = end.astimezone(tz).strftime("%H:%M")
        at, own, note = end, False, f"held for quiet hours until {local_end} ({tz.key})"
        if index == last and end + min_final_gap(step.after) > deadline:  # too late to read it in time
            earlier = start - BEFORE_QUIET
            previous = out[-1][0].at if out else created_at
            if earlier > previous and earlier > created_at:
                at, note = earlier, f"final warning sent before quiet hours begin ({tz.key})"
            else:
                at, own, note = due, True, "final warning not held: quiet hours would pass the deadline"
        free = tuple(c for c in step.channels if c not in held)
        if free:
            out.append((Slot(step, index, free, due), True))
        out.append((Slot(step, index, held, at, note), own))
    out = [p for p in out if p[0].at < deadline]
    return sorted(out, key=lambda p: (p[0].at, p[0].index))


def quiet_until(schedule: Schedule, channel: str, at: datetime, zone: str | ZoneInfo = "UTC") -> tuple[
        datetime, str] | None:
    """When a message on ``channel`` that would go out at ``at`` falls in the customer's quiet hours:
    (the end of that quiet period, why it waits). None when it may go out at ``at``."""
    quiet = schedule.quiet_hours
    if quiet is None or channel not in quiet.channels:
        return None
    tz = zone if isinstance(zone, ZoneInfo) else ZoneInfo(zone)
    period = quiet.period(at, tz)
    if period is None:
        return None
    end = period[1]
    return end, f"held for quiet hours until {end.astimezone(tz).strftime('%H:%M')} ({tz.key})"


def notice_times(schedule: Schedule, at: datetime, zone: str | ZoneInfo = "UTC") -> list[
        tuple[tuple[str, ...], datetime, str | None]]:
    """When the final step's notice goes out when the transaction settles at ``at``: (channels, when,
    why it waits). The status changes at ``at``; the channels quiet hours hold wait for their end."""
    groups: dict[tuple[datetime, str | None], list[str]] = {}
    for channel in schedule.final.channels:
        groups.setdefault(quiet_until(schedule, channel, at, zone) or (at, None), []).append(channel)
    return sorted(((tuple(channels), when, note) for (when, note), channels in groups.items()), key=lambda g: g[1])


def fallback_time(schedule: Schedule, step_id: str, channel: str, now: datetime, *, created_at: datetime,
                  deadline: datetime, zone: str | ZoneInfo = "UTC") -> tuple[datetime | None, str | None]:
    """When a reminder's fallback on ``channel``, decided at ``now``, goes out: (when, why it waits).

    Like ``slots``: inside quiet hours it waits for their end; the final warning's fallback is never held
    so late that it leaves less than the final-gap rule's room before the deadline (then it goes now:
    the moment before quiet hours began is behind us); any other reminder that would wait until the
    deadline is dropped: (None, why)."""
    held = quiet_until(schedule, channel, now, zone)
    if held is None:
        return now, None
    end, note = held
    steps = schedule.steps
    last = max((i for i, s in enumerate(steps) if created_at + s.after < deadline), default=-1)
    index = next((i for i, s in enumerate(steps) if s.id == step_id), -1)
    if index == last and index >= 0 and end + min_final_gap(steps[index].after) > deadline:
        return now, "final warning not held: quiet hours would pass the deadline"
    if end >= deadline:
        return None, "quiet hours last until the deadline"
    return end, note


def step_times(schedule: Schedule, created_at: datetime, deadline: datetime) -> list[tuple[Step, datetime]]:
    """Each reminder with the ladder's own time (no quiet hours); steps at or past the deadline dropped."""
    return [(s, created_at + s.after) for s in schedule.steps if created_at + s.after < deadline]


def decide(
    schedule: Schedule,
    *,
    created_at: datetime,
    deadline: datetime,
    handled_until: datetime | None,
    now: datetime,
    zone: str | ZoneInfo = "UTC",
) -> Decision:
    """Apply the late-step rule: of the slots due now, only the latest step's go out; a passed
    deadline settles at once and skips whatever was still waiting."""
    found = slots(schedule, created_at, deadline, zone)
    return decide_slots([s.at for s in found], [s.index for s in found], found.__getitem__,
                        deadline=deadline, handled_until=handled_until, now=now)


def decide_slots(times: Sequence[datetime], indexes: Sequence[int], slot: Callable[[int], Slot], *,
                 deadline: datetime, handled_until: datetime | None, now: datetime) -> Decision:
    """``decide`` on a transaction's slots given as their times and step indexes, in sending order;
    ``slot(i)`` makes the i-th Slot, asked only for the due ones (most are not, and a tick plans
    thousands of transactions)."""
    waiting = [i for i, at in enumerate(times) if handled_until is None or at > handled_until]
    due = [i for i in waiting if times[i] <= now]
    if deadline <= now:
        return Decision((), tuple(slot(i) for i in due), "late: the deadline passed before this step was sent", True,
                        deadline, None)
    if not due:
        return Decision((), (), "", False, handled_until, times[waiting[0]] if waiting else deadline)
    latest = max(indexes[i] for i in due)
    send = tuple(slot(i) for i in due if indexes[i] == latest)
    handled = max(times[i] for i in due)
    later = [times[i] for i in waiting if times[i] > handled]
    return Decision(
        send=send,
        skip=tuple(slot(i) for i in due if indexes[i] != latest),
        skip_reason=f"late: superseded by the later step {send[0].step.id!r}, sent instead",
        settle=False,
        handled_until=handled,
        next_due_at=later[0] if later else deadline,
    )


__all__ = ["BEFORE_QUIET", "UTC", "Decision", "Slot", "choose_variant", "decide", "decide_slots", "fallback_time",
           "notice_times", "placed_slots", "quiet_until", "slots", "step_times"]
