"""The ladder: schedules (what is due when) and the late-step rule. Imports nothing of SQL or I/O."""

from .durations import format_duration, parse_duration
from .loader import load_dir, load_file
from .model import CHANNELS, Final, Match, Schedule, Step, Variant
from .plan import Decision, Slot, choose_variant, decide, fallback_time, notice_times, quiet_until, slots, step_times
from .quiet import QuietHours
from .registry import Registry

__all__ = [
    "CHANNELS", "Decision", "Final", "Match", "QuietHours", "Registry", "Schedule", "Slot", "Step", "Variant",
    "choose_variant", "decide", "fallback_time", "format_duration", "load_dir", "load_file", "notice_times",
    "parse_duration", "quiet_until", "slots", "step_times",
]
