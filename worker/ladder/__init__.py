"""The ladder: schedules (what is due when) and the late-step rule. Imports nothing of SQL or I/O."""

from .durations import format_duration, parse_duration
from .loader import load_dir, load_file
from .model import CHANNELS, Final, Match, Schedule, Step
from .plan import Decision, decide, step_times
from .registry import Registry

__all__ = [
    "CHANNELS", "Decision", "Final", "Match", "Registry", "Schedule", "Step",
    "decide", "format_duration", "load_dir", "load_file", "parse_duration", "step_times",
]
