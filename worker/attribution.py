"""What happened after each (step, variant) that reached a transaction, and the small table the variant
comparison (worker/experiments.py) is computed from. Definitions: docs/stats.md, "Variant comparison".

A step *reached* a transaction when one of its reminders went out, at the step's *first sent*; a
confirmation goes to the last step sent before it (``first sent <= confirmed_at < first sent of the next
step that reached it``), and is counted by who made it (``settled_source``): only the customer's is a
success. A later step reaching the transaction first is ``moved_on``; a settlement with this step as the
last is ``cancelled`` / ``escalated``; a transaction still pending with this step as its last is ``open``.

The database does this for the report (worker.store.experiments.variant_figures: one row per cell, never
per transaction); ``attribute`` and ``table_of`` do the same in Python from plain rows, as the reference
the tests hold the database to.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .store.experiments import CHANNELS, OUTCOMES

#: How a confirmation is counted, by who made it (``settled_source``); anyone else is ``confirmed_other``.
SOURCES = {"customer": "confirmed_by_customer", "ops": "confirmed_by_ops", "platform": "confirmed_by_platform"}
CHANNEL_ORDER = CHANNELS
BREAKDOWNS = ("segment", "locale", "channels")


@dataclass
class Outcome:
    """One transaction reached by one (step, variant): what happened in that step's window."""

    schedule: str
    step: str
    variant: str
    transaction_id: str
    created_at: datetime
    first_sent: datetime
    channels: str  # the channel mix the step went out on, e.g. "sms+push"
    segment: str
    locale: str
    outcome: str  # confirmed_by_customer|_ops|_platform|confirmed_other | moved_on | cancelled | escalated | open
    seconds_to_confirm: float | None = None

    @property
    def decided(self) -> bool:
        return self.outcome != "open"


def channel_mix(channels: Iterable[str]) -> str:
    """``sms+push``: the channels in the order sms, email, push (any other after them, by name)."""
    return "+".join(sorted(set(channels), key=lambda c: (CHANNEL_ORDER.index(c) if c in CHANNEL_ORDER else 9, c)))


def attribute(txs: Iterable[dict[str, Any]], dls: Iterable[dict[str, Any]]) -> list[Outcome]:
    """Each (transaction, step, variant) reached, with its outcome: rows as ``variant_rows`` returns them."""
    units: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    for d in dls:
        if d["first_sent"] is None:
            continue
        u = units[d["transaction_id"]].setdefault((d["step"], d["variant"]), {"first_sent": d["first_sent"],
                                                                            "channels": set()})
        u["first_sent"] = min(u["first_sent"], d["first_sent"])
        u["channels"].add(d["channel"])
    out: list[Outcome] = []
    for tx in txs:
        mine = sorted(units.get(tx["id"], {}).items(), key=lambda kv: (kv[1]["first_sent"], kv[0]))
        confirmed_at = tx["confirmed_at"] if tx["status"] == "confirmed" else None
        for i, ((step, variant), u) in enumerate(mine):
            start = u["first_sent"]
            end = mine[i + 1][1]["first_sent"] if i + 1 < len(mine) else None
            seconds = None
            if confirmed_at is not None and start <= confirmed_at and (end is None or confirmed_at < end):
                outcome = SOURCES.get(tx["settled_source"] or "", "confirmed_other")
                seconds = (confirmed_at - start).total_seconds()
            elif end is not None or (confirmed_at is not None and confirmed_at < start):
                outcome = "moved_on"  # a later step reached it first (or, oddly, it was confirmed before)
            elif tx["status"] in ("cancelled", "escalated"):
                outcome = tx["status"]
            else:
                outcome = "open"
            out.append(Outcome(tx["schedule"], step, variant, tx["id"], tx["created_at"], start,
                               channel_mix(u["channels"]), tx.get("segment") or "(none)",
                               tx.get("locale") or "(none)", outcome, seconds))
    return out


# -- the table ----------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """The units of one (schedule, step, variant) with one segment, locale and channel mix, created inside
    the step's concurrent window (every arm being sent) or not: their outcomes, counted."""

    schedule: str
    step: str
    variant: str
    segment: str
    locale: str
    channels: str
    concurrent: bool
    counts: dict[str, int]  # reached, and each of OUTCOMES
    first_sent: datetime
    created_from: datetime
    created_to: datetime
    first_offset: float  # seconds from created_at to the earliest first send

    def add(self, other: Cell) -> None:
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        self.first_sent = min(self.first_sent, other.first_sent)
        self.created_from = min(self.created_from, other.created_from)
        self.created_to = max(self.created_to, other.created_to)
        self.first_offset = min(self.first_offset, other.first_offset)


@dataclass
class Table:
    """Cells, and per (schedule, step, variant) the quartiles of time to confirm (customer confirmations)."""

    cells: list[Cell] = field(default_factory=list)
    times: dict[tuple[str, str, str], dict[str, float | None]] = field(default_factory=dict)


def _key(c: Cell) -> tuple:
    return (c.schedule, c.step, c.variant, c.segment, c.locale, c.channels, c.concurrent)


def _merged(cells: Iterable[Cell]) -> list[Cell]:
    out: dict[tuple, Cell] = {}
    for c in cells:
        if _key(c) in out:
            out[_key(c)].add(c)
        else:
            out[_key(c)] = c
    return sorted(out.values(), key=_key)


def quartiles(times: Sequence[float]) -> dict[str, float | None]:
    """Median, p25, p75 as ``statistics.quantiles(method="inclusive")`` (one value: that value thrice)."""
    return _from_ranks(len(times), dict(enumerate(sorted(times), start=1)))


def _from_ranks(n: int, at: dict[int, float]) -> dict[str, float | None]:
    """The quartiles from the values at the ranks (1-based) around each ``(n - 1) * q``."""
    if n == 0:
        return {"median": None, "p25": None, "p75": None}
    if n == 1:
        return {"median": at[1], "p25": at[1], "p75": at[1]}
    out = []
    for i in (1, 2, 3):
        j, delta = divmod(i * (n - 1), 4)
        out.append((at[j + 1] * (4 - delta) + at[j + 2] * delta) / 4)
    return {"median": out[1], "p25": out[0], "p75": out[2]}


def table_of(outcomes: Sequence[Outcome]) -> Table:
    """The table from units row by row (the reference for ``table_from_rows``)."""
    arms: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        arms[(o.schedule, o.step, o.variant)].append(o)
    bounds: dict[tuple[str, str], tuple[datetime, datetime]] = {}
    for (schedule, step, _), rows in arms.items():
        lo, hi = min(r.created_at for r in rows), max(r.created_at for r in rows)
        old = bounds.get((schedule, step))
        bounds[(schedule, step)] = (max(lo, old[0]), min(hi, old[1])) if old else (lo, hi)
    cells = []
    for o in outcomes:
        lo, hi = bounds[(o.schedule, o.step)]
        counts = {"reached": 1, **dict.fromkeys(OUTCOMES, 0)}
        counts[o.outcome] += 1
        cells.append(Cell(o.schedule, o.step, o.variant, o.segment, o.locale, o.channels,
                          lo <= o.created_at <= hi, counts, o.first_sent, o.created_at, o.created_at,
                          (o.first_sent - o.created_at).total_seconds()))
    times = {key: quartiles([r.seconds_to_confirm for r in rows if r.outcome == "confirmed_by_customer"
                             and r.seconds_to_confirm is not None]) for key, rows in arms.items()}
    return Table(_merged(cells), times)


def table_from_rows(rows: Iterable[dict[str, Any]]) -> Table:
    """The table from the database's rows (worker.store.experiments.variant_figures)."""
    cells, ranked = [], defaultdict(dict)
    sizes: dict[tuple[str, str, str], int] = {}
    for r in rows:
        key = (r["schedule"], r["step"], r["variant"])
        if r["part"] == "time":
            ranked[key][int(r["rn"])] = float(r["seconds"])
            sizes[key] = int(r["n"])
            continue
        counts = {"reached": int(r["reached"]), **{k: int(r[k] or 0) for k in OUTCOMES}}
        cells.append(Cell(*key, r["segment"] or "(none)", r["locale"] or "(none)",
                          channel_mix(c for c in CHANNELS if r[c]), bool(r["concurrent"]), counts,
                          r["first_sent"], r["created_from"], r["created_to"], float(r["first_offset"])))
    arms = {(c.schedule, c.step, c.variant) for c in cells}
    return Table(_merged(cells), {key: _from_ranks(sizes.get(key, 0), ranked.get(key, {})) for key in arms})
