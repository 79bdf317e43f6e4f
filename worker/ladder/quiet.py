"""Quiet hours: when SMS and push wait for the customer's morning. Local wall-clock times, DST-aware."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


@lru_cache(maxsize=65536)
def wall_clock(day: date, at: time, zone: ZoneInfo) -> datetime:
    """Wall-clock ``at`` on ``day`` in ``zone``, in UTC; a time skipped by a DST jump moves forward by
    the jump (02:30 on a spring-forward night is 03:30), as the clock on the customer's phone would read.

    Cached: a tick plans thousands of customers in a handful of zones, around the same few days."""
    naive = datetime.combine(day, at)
    local = naive.replace(tzinfo=zone)
    back = local.astimezone(UTC).astimezone(zone)
    if back.replace(tzinfo=None) != naive:  # inside a spring-forward gap
        local = back
    return local.astimezone(UTC)


@dataclass(frozen=True)
class QuietHours:
    """``start``–``end`` in the customer's zone, e.g. 22:00–08:00 (crossing midnight is allowed)."""

    start: time
    end: time
    channels: tuple[str, ...] = ("sms", "push")

    def period(self, when: datetime, zone: ZoneInfo) -> tuple[datetime, datetime] | None:
        """The quiet period (start, end) in UTC that contains ``when``, or None."""
        today = when.astimezone(zone).date()
        for offset in (-1, 0):
            day = today + timedelta(days=offset)
            start = wall_clock(day, self.start, zone)
            end_day = day if self.end > self.start else day + timedelta(days=1)
            end = wall_clock(end_day, self.end, zone)
            if start <= when < end:
                return start, end
        return None


def parse_clock(text: str) -> time:
    """``"22:00"`` -> time(22, 0)."""
    try:
        hours, minutes = str(text).split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"{text!r} is not a time of day such as 22:00") from None
