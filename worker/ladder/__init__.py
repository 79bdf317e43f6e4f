"""The ladder: schedules (what is due when) and the late-step rule. Imports nothing of SQL or I/O."""

from .durations import format_duration, parse_duration
from .loader import load_dir, load_file
from .model import CHANNELS, Final, Match, Schedule, Step, Variant
from .plan import Decision, Slot, choose_variant, decide, slots, step_times
from .quiet import QuietHours
from .registry import Registry

__all__ = [
    "CHANNELS", "Decision", "Final", "Match", "QuietHours", "Registry", "Schedule", "Slot", "Step", "Variant",
    "choose_variant", "decide", "slots", "format_duration", "load_dir", "load_file", "parse_duration", "step_times",
]
