"""Read ``schedules/*.yaml`` into Schedules, refusing anything wrong with file, line and field named.

A load is all or nothing: the caller keeps its last good registry when this raises ConfigError.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass, replace
from datetime import time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .durations import format_duration, parse_duration
from .model import CHANNELS, MAX_LENGTH, Final, Match, Schedule, Step, Variant
from .quiet import QuietHours, parse_clock

_TOP_KEYS = {"name", "match", "priority", "steps", "cancel", "escalate", "description", "quiet_hours"}
_STEP_KEYS = {"id", "after", "channels", "template", "fallback", "variants"}
_VARIANT_KEYS = {"name", "template", "weight"}
_QUIET_KEYS = {"start", "end", "channels"}
_FINAL_KEYS = {"after", "template", "reason", "channels"}
_MATCH_KEYS = {"segment", "risk_flag", "amount", "currency"}
_AMOUNT_KEYS = {"min", "max"}

#: Called as has_template(template, channel) -> list of problems (missing locales/parts).
TemplateCheck = Callable[[str, str], list[str]]


class _Doc:
    """A parsed YAML file that remembers the line of every key, to point errors at it."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.lines: dict[tuple[Any, ...], int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError([f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
        if node is not None:
            self._index(node, ())

    def _index(self, node: yaml.Node, path: tuple[Any, ...]) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[path + (key.value,)] = key.start_mark.line + 1
                self._index(value, path + (key.value,))
                self.lines[path + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,))

    def error(self, path: tuple[Any, ...], message: str) -> None:
        line = None
        for cut in range(len(path), -1, -1):
            line = self.lines.get(path[:cut])
            if line is not None:
                break
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")
        where = f"{self.path}:{line}" if line else str(self.path)
        self.problems.append(f"{where}: {field or '(file)'}: {message}")


def _duration(doc: _Doc, path: tuple[Any, ...], value: Any):
    try:
        return parse_duration(str(value)) if value is not None else None
    except ValueError as exc:
        doc.error(path, str(exc))
        return None


def _channels(doc: _Doc, path: tuple[Any, ...], value: Any, *, default: tuple[str, ...] | None = None):
    if value is None and default is not None:
        return default
    if not isinstance(value, list) or not value:
        doc.error(path, f"a non-empty list of channels from {', '.join(CHANNELS)}")
        return ()
    bad = [c for c in value if c not in CHANNELS]
    if bad:
        doc.error(path, f"unknown channel(s) {bad}; use {', '.join(CHANNELS)}")
    if len(set(value)) != len(value):
        doc.error(path, "a channel is listed twice")
    return tuple(c for c in value if c in CHANNELS)


def _fits(doc: _Doc, path: tuple[Any, ...], kind: str, value: Any) -> bool:
    """False (and an error naming the column) when ``value`` is longer than the store can hold: SQLite
    would take it, PostgreSQL would refuse the row and with it every tick until the file is fixed."""
    column, limit = MAX_LENGTH[kind]
    if isinstance(value, str) and len(value) > limit:
        doc.error(path, f"{value!r} is {len(value)} characters; the store holds at most {limit} ({column})")
        return False
    return True


def _unknown_keys(doc: _Doc, path: tuple[Any, ...], value: dict, allowed: set[str]) -> None:
    for key in value:
        if key not in allowed:
            doc.error(path + (key,), f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _match(doc: _Doc, raw: Any) -> Match:
    if raw is None:
        return Match()
    if not isinstance(raw, dict):
        doc.error(("match",), "a mapping such as {segment: new} or {} for every transaction")
        return Match()
    _unknown_keys(doc, ("match",), raw, _MATCH_KEYS)
    def names(key: str) -> tuple[str, ...]:
        value = raw.get(key, ())
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            doc.error(("match", key), "a name or a list of names")
            return ()
        for v in value:
            _fits(doc, ("match", key), "segment" if key == "segment" else "currency", v)
        return tuple(value)

    segments, currencies = names("segment"), names("currency")
    risk = raw.get("risk_flag")
    if risk is not None and not isinstance(risk, bool):
        doc.error(("match", "risk_flag"), "true or false")
        risk = None
    lo = hi = None
    amount = raw.get("amount")
    if amount is not None:
        if not isinstance(amount, dict):
            doc.error(("match", "amount"), "a mapping with min and/or max")
        else:
            _unknown_keys(doc, ("match", "amount"), amount, _AMOUNT_KEYS)
            try:
                lo = Decimal(str(amount["min"])) if "min" in amount else None
                hi = Decimal(str(amount["max"])) if "max" in amount else None
            except InvalidOperation:
                doc.error(("match", "amount"), "min and max are decimal numbers")
            if lo is not None and hi is not None and lo > hi:
                doc.error(("match", "amount"), "min is above max")
    return Match(segments=segments, risk_flag=risk, amount_min=lo, amount_max=hi, currencies=currencies)


def _variants(doc: _Doc, path: tuple[Any, ...], raw: Any) -> tuple[Variant, ...]:
    if not isinstance(raw, list) or not raw:
        doc.error(path, "a list of {name, template, weight}")
        return ()
    out: list[Variant] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            doc.error(path + (i,), "a mapping with name, template and weight")
            continue
        _unknown_keys(doc, path + (i,), item, _VARIANT_KEYS)
        name, template, weight = item.get("name"), item.get("template"), item.get("weight", 1)
        if not isinstance(name, str) or not name:
            doc.error(path + (i, "name"), "required: the variant's name, recorded on each delivery")
            continue
        if not isinstance(template, str) or not template:
            doc.error(path + (i, "template"), "required: the name of a template folder")
            continue
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            doc.error(path + (i, "weight"), "a whole number of at least 1")
            continue
        if not (_fits(doc, path + (i, "name"), "variant", name)
                and _fits(doc, path + (i, "template"), "template", template)):
            continue
        if any(v.name == name for v in out):
            doc.error(path + (i, "name"), f"variant {name!r} is listed twice")
            continue
        out.append(Variant(name, template, weight))
    return tuple(out)


def _quiet(doc: _Doc, raw: Any) -> QuietHours | None:
    path = ("quiet_hours",)
    if not isinstance(raw, dict):
        doc.error(path, "a mapping with start, end and optional channels")
        return None
    _unknown_keys(doc, path, raw, _QUIET_KEYS)
    times = {}
    for key in ("start", "end"):
        try:
            times[key] = parse_clock(raw.get(key))
        except ValueError as exc:
            doc.error(path + (key,), str(exc))
    if len(times) < 2:
        return None
    start, end = times["start"], times["end"]
    if start == end:
        doc.error(path + ("end",), "the same as start: quiet hours would be empty")
        return None
    channels = _channels(doc, path + ("channels",), raw.get("channels"), default=("sms", "push"))
    return QuietHours(start, end, channels)


def _parse(doc: _Doc, check_template: TemplateCheck | None) -> Schedule | None:
    raw = doc.data
    if not isinstance(raw, dict):
        doc.error((), "a schedule is a mapping with name, match, priority, steps and cancel or escalate")
        return None
    _unknown_keys(doc, (), raw, _TOP_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        doc.error(("name",), "required: the schedule's name")
        name = doc.path.stem
    _fits(doc, ("name",), "schedule", name)
    priority = raw.get("priority", 100)
    if not isinstance(priority, int) or isinstance(priority, bool):
        doc.error(("priority",), "an integer (lower is tried first)")
        priority = 100

    steps: list[Step] = []
    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        doc.error(("steps",), "required: a non-empty list of steps")
        raw_steps = []
    seen: set[str] = set()
    for i, item in enumerate(raw_steps):
        path = ("steps", i)
        if not isinstance(item, dict):
            doc.error(path, "a mapping with after, channels and template")
            continue
        _unknown_keys(doc, path, item, _STEP_KEYS)
        for key in ("after", "channels") + (() if "variants" in item else ("template",)):
            if key not in item:
                doc.error(path + (key,), "required")
        variants = _variants(doc, path + ("variants",), item.get("variants")) if "variants" in item else ()
        if "template" in item:
            _fits(doc, path + ("template",), "template", item["template"])
        if variants and "template" not in item:
            item = {**item, "template": variants[0].template}
        after = _duration(doc, path + ("after",), item.get("after"))
        channels = _channels(doc, path + ("channels",), item.get("channels"))
        fallback = _channels(doc, path + ("fallback",), item["fallback"]) if "fallback" in item else None
        template = item.get("template")
        if "template" in item and (not isinstance(template, str) or not template):
            doc.error(path + ("template",), "the name of a template folder")
            template = None
        step_id = str(item.get("id") or template or f"step{i + 1}")
        if item.get("id"):
            _fits(doc, path + ("id",), "step", step_id)
        if step_id in seen or step_id in ("cancel", "escalate"):
            doc.error(path + ("id",), f"step id {step_id!r} is used twice; give the step its own id:")
        seen.add(step_id)
        if after is not None and steps and after <= steps[-1].after:
            doc.error(path + ("after",), f"steps must come later and later: {item.get('after')} is not after "
                      f"the previous step")
        if check_template and template:
            for channel in (*channels, *(fallback or ())):
                for problem in check_template(template, channel):
                    doc.error(path + ("template",), problem)
                for j, variant in enumerate(variants):
                    if variant.template != template:
                        for problem in check_template(variant.template, channel):
                            doc.error(path + ("variants", j, "template"), problem)
        if after is not None and template:
            steps.append(Step(id=step_id, after=after, channels=channels, template=template, fallback=fallback,
                              variants=variants))

    has_cancel, has_escalate = "cancel" in raw, "escalate" in raw
    if has_cancel == has_escalate:
        doc.error(("cancel",), "exactly one final step is required: cancel: or (risk schedules) escalate:")
        return None
    action = "cancel" if has_cancel else "escalate"
    fin = raw[action]
    path = (action,)
    if not isinstance(fin, dict):
        doc.error(path, "a mapping with after, template and reason")
        return None
    _unknown_keys(doc, path, fin, _FINAL_KEYS)
    for key in ("after", "template", "reason"):
        if key not in fin:
            doc.error(path + (key,), "required")
    after = _duration(doc, path + ("after",), fin.get("after"))
    channels = _channels(doc, path + ("channels",), fin.get("channels"), default=CHANNELS)
    template, reason = fin.get("template"), fin.get("reason")
    _fits(doc, path + ("template",), "template", template)
    if after is not None and steps and after <= steps[-1].after:
        doc.error(path + ("after",), f"the {action} step must come after the last reminder "
                  f"({steps[-1].id!r} at {raw_steps[len(steps) - 1].get('after')})")
    elif after is not None and steps:
        _check_final_gap(doc, action, steps[-1], after)
    if check_template and isinstance(template, str):
        for channel in channels:
            for problem in check_template(template, channel):
                doc.error(path + ("template",), problem)
    match = _match(doc, raw.get("match"))
    if doc.problems or after is None:
        return None
    final = Final(action=action, after=after, template=str(template), reason=str(reason), channels=channels)
    quiet = _quiet(doc, raw["quiet_hours"]) if "quiet_hours" in raw else None
    schedule = Schedule(name=name, match=match, priority=priority, steps=tuple(steps), final=final,
                        version="", source=str(doc.path), quiet_hours=quiet)
    schedule = replace(schedule, version=schedule_version(schedule))
    if check_template:  # a step may fall back to another channel: its template must exist there too
        for i, step in enumerate(schedule.steps):
            for channel in schedule.fallback_for(step.id):
                if channel not in step.channels and step.fallback is None:
                    for problem in check_template(step.template, channel):
                        doc.error(("steps", i, "template"), f"{problem} (used when falling back)")
    return None if doc.problems else schedule


def _meaning(value: Any) -> Any:
    """A schedule as plain JSON values: what it does, without where it came from or how it was spelled."""
    if is_dataclass(value):
        return {f.name: _meaning(getattr(value, f.name)) for f in fields(value) if f.name not in ("version", "source")}
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal | time):
        return str(value)
    if isinstance(value, tuple | list):
        return [_meaning(v) for v in value]
    return value


def schedule_version(schedule: Schedule) -> str:
    """The hash of what a schedule means (its parsed model as canonical JSON), not of its file's bytes:
    an edit to a comment, the description or the layout keeps the version, so it reschedules nothing."""
    canonical = json.dumps(_meaning(schedule), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# -- the final-gap rule ---------------------------------------------------------------------------
# The final step must not overtake the last reminder: that message (often the "last reminder before
# we cancel") needs time to arrive, through a few retries, and to be acted on. See docs/schedules.md.

#: The floor: SMS and email delivery plus a few retries (backoff grows to 5 minutes) fit in it.
MIN_FINAL_GAP = timedelta(minutes=5)
#: The gap grows with the ladder: at least this share of the last reminder's offset.
FINAL_GAP_SHARE = 0.10
#: Second-scale ladders (the demo, tests) cannot wait 5 minutes: the floor is capped at this share.
SHORT_LADDER_SHARE = 0.25


def min_final_gap(last_after: timedelta) -> timedelta:
    """max(10% of the last offset, min(5 minutes, 25% of it)), rounded up to whole seconds."""
    need = max(last_after * FINAL_GAP_SHARE, min(MIN_FINAL_GAP, last_after * SHORT_LADDER_SHARE))
    return timedelta(seconds=math.ceil(need.total_seconds()))


def _check_final_gap(doc: _Doc, action: str, last: Step, after: timedelta) -> None:
    need = min_final_gap(last.after)
    if after - last.after < need:
        doc.error((action, "after"), f"the {action} step comes {format_duration(after - last.after)} after the "
                  f"last reminder ({last.id!r} at {format_duration(last.after)}), too soon for it to arrive: "
                  f"leave at least {format_duration(need)} (at {format_duration(last.after + need)} or later)")


def load_file(path: Path, check_template: TemplateCheck | None = None) -> Schedule:
    """Load and validate one schedule file; raise ConfigError listing every problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror}"]) from None
    doc = _Doc(path, text)
    schedule = _parse(doc, check_template)
    if doc.problems or schedule is None:
        raise ConfigError(doc.problems or [f"{path}: invalid schedule"])
    return schedule


def load_dir(directory: Path, check_template: TemplateCheck | None = None) -> list[Schedule]:
    """Load every ``*.yaml``/``*.yml`` in a folder; the whole set must be valid together."""
    if not directory.is_dir():
        raise ConfigError([f"{directory}: the schedules folder does not exist"])
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    return load_files(files, check_template, where=str(directory))


def load_files(files: Iterable[Path], check_template: TemplateCheck | None = None, *,
               where: str = "schedules") -> list[Schedule]:
    problems: list[str] = []
    schedules: list[Schedule] = []
    for path in files:
        try:
            schedules.append(load_file(path, check_template))
        except ConfigError as exc:
            problems.extend(exc.problems)
    names: dict[str, str] = {}
    for s in schedules:
        if s.name in names:
            problems.append(f"{s.source}: name: {s.name!r} is also the name of {names[s.name]}")
        names[s.name] = s.source
    if not problems and not any(s.match.catches_all for s in schedules):
        problems.append(f"{where}: no schedule has an empty match (match: {{}}) to catch every other "
                        f"transaction; add a default schedule")
    if problems:
        raise ConfigError(problems)
    return sorted(schedules, key=lambda s: (s.priority, s.name))
