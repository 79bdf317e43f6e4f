"""When is each step due, and what does a tick do now: the late-step rule lives here, and only here.

Pure functions of the ladder and the clock: no SQL, no broker, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .model import Schedule, Step


@dataclass(frozen=True)
class Decision:
    """What one tick does for one pending transaction."""

    send: Step | None  # the reminder that goes out now
    skip: tuple[Step, ...]  # due reminders recorded as skipped (late-step rule)
    skip_reason: str
    settle: bool  # the deadline has passed: cancel or escalate now
    handled_until: datetime | None  # due time of the newest step handled so far
    next_due_at: datetime | None  # when this transaction next needs the scheduler


def step_times(schedule: Schedule, created_at: datetime, deadline: datetime) -> list[tuple[Step, datetime]]:
    """Each reminder with its due time; steps at or past the deadline are dropped."""
    return [(s, created_at + s.after) for s in schedule.steps if created_at + s.after < deadline]


def decide(
    schedule: Schedule,
    *,
    created_at: datetime,
    deadline: datetime,
    handled_until: datetime | None,
    now: datetime,
) -> Decision:
    """Apply the late-step rule: of the reminders due now, only the latest goes out; a passed
    deadline settles at once and skips whatever reminders were still waiting."""
    timeline = step_times(schedule, created_at, deadline)
    waiting = [(s, t) for s, t in timeline if handled_until is None or t > handled_until]
    due = [(s, t) for s, t in waiting if t <= now]
    if deadline <= now:
        return Decision(
            send=None,
            skip=tuple(s for s, _ in due),
            skip_reason="late: the deadline passed before this step was sent",
            settle=True,
            handled_until=deadline,
            next_due_at=None,
        )
    if not due:
        nxt = waiting[0][1] if waiting else deadline
        return Decision(None, (), "", False, handled_until, nxt)
    send, send_at = due[-1]
    later = [t for _, t in waiting if t > send_at]
    return Decision(
        send=send,
        skip=tuple(s for s, _ in due[:-1]),
        skip_reason=f"late: superseded by the later step {send.id!r}, sent instead",
        settle=False,
        handled_until=send_at,
        next_due_at=later[0] if later else deadline,
    )
