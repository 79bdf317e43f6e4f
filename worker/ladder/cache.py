"""Slots shared by the transactions one tick plans: a tick that finds 10,000 steps due plans each
distinct (schedule, zone, deadline offset, created-at cell) once, not each transaction.

Why a shared plan is exact: a transaction's slot times are either its own (``created_at`` plus a step's
``after``) or moments of the quiet hours (their end, or a minute before their start), which fall on
whole minutes in UTC (zone offsets and DST changes are whole minutes; checked when a plan is made).
``placed_slots`` only compares these times with each other and with ``created_at`` + offsets (the
deadline, the final-gap rule), and reads the local date and UTC offset of the step's own times. Cut
time into cells of ``g`` microseconds, ``g`` the greatest common divisor of a minute and every offset
the schedule adds to ``created_at``. Every boundary then lies on the grid, so two ``created_at`` in the
same open cell (or both exactly on the same grid point) take the same branches: their slots differ
only in the times that are their own, by the difference of their ``created_at``. The A/B variant and
the channels each customer can use are per transaction, and stay so (``scheduler.plan_transaction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from math import gcd
from zoneinfo import ZoneInfo

from .loader import min_final_gap
from .model import Schedule
from .plan import BEFORE_QUIET, Decision, Slot, decide, decide_slots, placed_slots

_MINUTE_US = 60_000_000


def _us(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass(frozen=True)
class _Plan:
    """The slots of one cell, made at one ``created_at`` of it (``origin``)."""

    slots: tuple[Slot, ...]
    offsets: tuple[timedelta | None, ...]  # slot time - created_at for the transaction's own times, else None
    indexes: tuple[int, ...]


class SlotCache:
    """``decide`` for many transactions, planning each distinct cell once.

    Holds at most ``limit`` plans (then starts again): they depend on the schedule, the zone and the
    times only, never on ``now``, so one cache can serve tick after tick."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._plans: dict[tuple, tuple[Schedule, _Plan | None]] = {}
        self._grids: dict[tuple[int, int], tuple[Schedule, int]] = {}
        self.made = 0  # plans made (the rest of the calls shared one)

    def decide(self, schedule: Schedule, *, created_at: datetime, deadline: datetime,
               handled_until: datetime | None, now: datetime, zone: str = "UTC") -> Decision:
        """The same Decision as ``plan.decide`` with these arguments."""
        plan = self._plan(schedule, created_at, deadline, zone)
        if plan is None:  # a zone whose offsets are not whole minutes: planned alone
            return decide(schedule, created_at=created_at, deadline=deadline, handled_until=handled_until, now=now,
                          zone=zone)
        offsets = plan.offsets
        times = [s.at if off is None else created_at + off for s, off in zip(plan.slots, offsets, strict=True)]

        def slot(i: int) -> Slot:
            s = plan.slots[i]
            return s if offsets[i] is None else Slot(s.step, s.index, s.channels, times[i], s.note)

        return decide_slots(times, plan.indexes, slot, deadline=deadline, handled_until=handled_until, now=now)

    def _plan(self, schedule: Schedule, created_at: datetime, deadline: datetime, zone: str) -> _Plan | None:
        if created_at.utcoffset():
            created_at = created_at.astimezone(UTC)
        span = _us(deadline - created_at)
        grid = self._grids.get((id(schedule), span))
        if grid is None or grid[0] is not schedule:
            grid = self._grids[id(schedule), span] = (schedule, _grid(schedule, span))
        step = grid[1]
        minute = created_at.replace(second=0, microsecond=0)
        cell, rest = divmod(created_at.second * 1_000_000 + created_at.microsecond, step)
        key = (id(schedule), zone, span, minute, cell, rest == 0)
        found = self._plans.get(key)
        if found is not None and found[0] is schedule:
            return found[1]
        origin = minute + timedelta(microseconds=cell * step + (0 if rest == 0 else step // 2))
        plan = _make(schedule, origin, origin + (deadline - created_at), zone)
        if len(self._plans) >= self.limit:
            self._plans.clear()
            self._grids.clear()
        self._plans[key] = (schedule, plan)
        self.made += 1
        return plan


def _grid(schedule: Schedule, span_us: int) -> int:
    """The cell size (microseconds): every offset from ``created_at`` a plan compares is a multiple."""
    g = gcd(_MINUTE_US, span_us, _us(BEFORE_QUIET))
    last = None
    for s in schedule.steps:
        g = gcd(g, _us(s.after))
        if _us(s.after) < span_us:
            last = s
    if last is not None:  # the final-gap rule of the final warning
        g = gcd(g, _us(min_final_gap(last.after)))
    return g


def _whole_minute(at: datetime) -> bool:
    at = at.astimezone(UTC)
    return at.second == 0 and at.microsecond == 0


def _make(schedule: Schedule, created_at: datetime, deadline: datetime, zone: str) -> _Plan | None:
    """The plan of ``created_at``'s cell, or None when the zone breaks the grid (an offset in seconds)."""
    tz = ZoneInfo(zone)
    for s in schedule.steps:
        offset = tz.utcoffset(created_at + s.after)
        if offset is None or offset % timedelta(minutes=1):
            return None
    placed = placed_slots(schedule, created_at, deadline, tz)
    if any(not own and not _whole_minute(s.at) for s, own in placed):
        return None
    return _Plan(slots=tuple(s for s, _own in placed),
                 offsets=tuple(s.at - created_at if own else None for s, own in placed),
                 indexes=tuple(s.index for s, _own in placed))


__all__ = ["SlotCache"]
