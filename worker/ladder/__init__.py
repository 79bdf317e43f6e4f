"""The ladder: schedules (what is due when) and the late-step rule. Imports nothing of SQL or I/O."""

from .cache import SlotCache
from .durations import format_duration, parse_duration
from .loader import load_dir, load_file
from .model import CHANNELS, Final, Match, Schedule, Step, Variant
from .plan import (
    Decision,
    Slot,
    choose_variant,
    decide,
    decide_slots,
    fallback_time,
    notice_times,
    placed_slots,
    quiet_until,
    slots,
    step_times,
)
from .quiet import QuietHours
from .registry import Registry

__all__ = [
    "CHANNELS", "Decision", "Final", "Match", "QuietHours", "Registry", "Schedule", "Slot", "SlotCache", "Step",
    "Variant", "choose_variant", "decide", "decide_slots", "fallback_time", "format_duration", "load_dir",
    "load_file", "notice_times", "parse_duration", "placed_slots", "quiet_until", "slots", "step_times",
]
