"""Quiet hours: when SMS and push wait for the customer's morning. Local wall-clock times, DST-aware."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class QuietHours:
    """``start``–``end`` in the customer's zone, e.g. 22:00–08:00 (crossing midnight is allowed)."""

    start: time
    end: time
    channels: tuple[str, ...] = ("sms", "push")

    def _local(self, day: datetime, at: time, zone: ZoneInfo) -> datetime:
        """Wall-clock ``at`` on ``day``'s date; a time skipped by a DST jump moves forward by the jump
        (02:30 on a spring-forward night is 03:30), as the clock on the customer's phone would read."""
        naive = datetime.combine(day.date(), at)
        local = naive.replace(tzinfo=zone)
        back = local.astimezone(UTC).astimezone(zone)
        if back.replace(tzinfo=None) != naive:  # inside a spring-forward gap
            local = back
        return local.astimezone(UTC)

    def period(self, when: datetime, zone: ZoneInfo) -> tuple[datetime, datetime] | None:
        """The quiet period (start, end) in UTC that contains ``when``, or None."""
        local = when.astimezone(zone)
        for offset in (-1, 0):
            day = local + timedelta(days=offset)
            start = self._local(day, self.start, zone)
            end_day = day if self.end > self.start else day + timedelta(days=1)
            end = self._local(end_day, self.end, zone)
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
