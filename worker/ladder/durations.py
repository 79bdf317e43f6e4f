"""Durations as ops write them in schedules: ``30s``, ``5m``, ``2h``, ``1d`` and sums like ``1h30m``."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+)([dhms])")
_WHOLE = re.compile(r"^(?:\d+[dhms])+$")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m`` into a timedelta; each unit at most once, largest first."""
    if not isinstance(text, str) or not _WHOLE.match(text.strip()):
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m, 2h, 1d or 1h30m")
    parts = _PART.findall(text.strip())
    units = [u for _, u in parts]
    order = "dhms"
    if len(set(units)) != len(units) or units != sorted(units, key=order.index):
        raise ValueError(f"{text!r}: write each unit once, largest first (e.g. 1d2h30m)")
    return timedelta(seconds=sum(int(n) * _UNIT[u] for n, u in parts))


def format_duration(delta: timedelta) -> str:
    """The inverse of parse_duration, for messages and previews."""
    seconds = int(delta.total_seconds())
    if seconds == 0:
        return "0s"
    out = []
    for unit, size in _UNIT.items():
        n, seconds = divmod(seconds, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
