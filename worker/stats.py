"""The confirmation funnel: which reminder step a customer confirmed after, per schedule, step and variant.

Ops tune ladders (timings, channels, wording variants) with these figures, so each one is defined
exactly, on reminder deliveries (``kind = 'reminder'``) whose status is ``sent`` or ``delivered``:

- **reached**: a transaction is reached by (schedule, step, variant) when at least one of its
  deliveries for that step and variant went out. The step's *first sent* is the earliest
  ``sent_at`` of those deliveries.
- **confirmed after**: the transaction was reached by the step, is ``confirmed``, and its
  ``confirmed_at`` is at or after the step's first sent and before the first sent of the next step
  that reached it: the confirmation is attributed to the last step sent before it. A confirmation
  before any step went out counts only in the schedule's ``confirmed_before_first_step``.
- **confirmation rate**: confirmed after / reached, with a 95% Wilson score interval.
- **median time to confirm**: median of ``confirmed_at`` minus the step's first sent, over the
  confirmations attributed to the step (seconds).
- **cancelled** / **escalated**: reached by the step, finally ``cancelled`` / ``escalated``, and that
  step was the last one to reach them.
- **messages**: deliveries of the step that went out, by channel; ``sms_messages`` the SMS among
  them; ``sms_segments`` the sum of ``deliveries.segments`` (recorded at send time) for them.

Per schedule: transactions by final status, the overall rate (confirmed / transactions, Wilson),
and a histogram of time to confirm counted from ``created_at``. Filters: ``since`` keeps
transactions created at or after it (an ISO date/time, or a duration such as ``7d`` meaning now
minus 7 days; default the last 7 days); ``schedule`` keeps one schedule. The database aggregates
(worker.store.funnel_figures); ``summarize`` computes the same in Python, row by row, as the reference
the tests hold it to. See docs/stats.md.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from .ladder import format_duration, parse_duration
from .pricing import Pricing
from .store import Store, funnel_figures

#: The funnel's window when no ``since`` is given: the transactions created in the last 7 days.
DEFAULT_WINDOW = timedelta(days=7)
Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...
CHANNEL_ORDER = ("sms", "email", "push")
#: Final statuses as the funnel counts them: ``approved`` is a confirmation by ops after a risk review,
#: kept apart from ``confirmed`` (the customers' own), which is what reminders are judged by.
STATUSES = ("pending", "confirmed", "approved", "cancelled", "escalated")

#: Time-to-confirm buckets (from created_at): label, lower bound inclusive, upper bound exclusive (seconds).
BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("<5m", 0, 300), ("5m-15m", 300, 900), ("15m-1h", 900, 3600), ("1h-4h", 3600, 14400),
    ("4h-12h", 14400, 43200), ("12h-24h", 43200, 86400), (">=24h", 86400, None),
)


def wilson(k: int, n: int, z: float = Z95) -> dict[str, float | None]:
    """The rate k/n with its Wilson score interval: honest at small n and near 0 or 1, unlike p ± z·se."""
    if n <= 0:
        return {"value": None, "low": None, "high": None}
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return {"value": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half)}


def parse_since(text: str, now: datetime) -> datetime:
    """``7d``/``12h`` (now minus that) or an ISO date/time (UTC when it names no zone)."""
    text = text.strip()
    try:
        return now - parse_duration(text)
    except (ValueError, OverflowError):
        pass
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is neither a duration such as 7d or 12h nor an ISO date/time") from None


@dataclass
class _Unit:
    """One transaction's deliveries of one (step, variant)."""

    first_sent: datetime
    messages: dict[str, int] = field(default_factory=dict)
    segments: int | None = None


def funnel(store: Store, *, since: str | datetime | None = None, schedule: str | None = None,
           now: datetime | None = None) -> dict[str, Any]:
    """The funnel as JSON-ready data; raises ValueError for a ``since`` it cannot read. Without ``since``,
    the last ``DEFAULT_WINDOW`` (7 days) before ``now``. Aggregated by the database
    (worker.store.funnel_figures): the memory it takes does not grow with the tables."""
    now = now or store.clock()
    start = _window(since, now)
    figures = funnel_figures(store, start, schedule)
    return {"generated_at": _iso(now), "since": _iso(start), "schedule": schedule,
            "schedules": assemble(figures)}


def report(store: Store, pricing: Pricing | None = None, *, schedules: Iterable[Any] = (),
           since: str | datetime | None = None, schedule: str | None = None, now: datetime | None = None
           ) -> dict[str, Any]:
    """What ``/v1/stats``, ``/ops`` and ``remind stats`` show: the funnel (``schedules``, unchanged), plus
    ``currency`` and ``costs`` (per schedule and per step and variant: cost, per transaction, per customer
    confirmation; worker.export.cost_totals) and ``experiments`` (the variant comparison of the same window,
    as ``remind experiments --json``, for the schedules in ``schedules`` with a step that has variants: the
    running experiments). All aggregated by the database. ``schedules``: the loaded ones
    (``Remind.registry``). Raises ValueError for a bad ``since``."""
    from .experiments import read_table  # both import this module (wilson, parse_since, human)
    from .experiments import report as compare_variants
    from .export import cost_totals

    now = now or store.clock()
    schedules = list(schedules)
    data = funnel(store, since=since, schedule=schedule, now=now)
    start = _window(since, now)
    costs = cost_totals(store, pricing or Pricing.none(), since=start, schedule=schedule)
    data["currency"] = costs.currency
    data["costs"] = {"currency": costs.currency, "schedules": [
        _costs(s, costs, costs.customer_confirmations) for s in data["schedules"]]}
    # the running experiments: schedules with a step that has variants now (remind experiments has them all)
    running = sorted({s.name for s in schedules if any(len(getattr(step, "variants", ()) or ()) > 1
                                                       for step in s.steps)})
    data["experiments"] = compare_variants(store, since=start, schedule=schedule, now=now, schedules=schedules,
                                           table=read_table(store, start, schedule, among=running))
    return data


def _costs(s: dict[str, Any], costs: Any, confirmed: dict[tuple[str, str, str], int]) -> dict[str, Any]:
    """One schedule's costs: in total and per step and variant of the funnel (reminders only)."""
    from .export import per_confirmation

    zero = None if costs.currency is None else Decimal(0)
    total = costs.by_schedule.get(s["schedule"], {})
    steps = []
    for r in s["steps"]:
        key = (s["schedule"], r["step"], r["variant"])
        cost, n = costs.by_step.get(key, zero), confirmed.get(key, 0)
        steps.append({"step": r["step"], "variant": r["variant"], "reached": r["reached"],
                      "customer_confirmations": n, "cost": _money(cost),
                      "cost_per_transaction": _money(per_confirmation(cost, r["reached"])),
                      "cost_per_customer_confirmation": _money(per_confirmation(cost, n))})
    return {"schedule": s["schedule"], "transactions": s["transactions"],
            "customer_confirmations": total.get("customer_confirmations", 0),
            "cost": _money(total.get("cost", zero)),
            "cost_per_transaction": _money(total.get("cost_per_transaction")),
            "cost_per_customer_confirmation": _money(total.get("cost_per_customer_confirmation")),
            "steps": steps}


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _window(since: str | datetime | None, now: datetime) -> datetime:
    start = parse_since(since, now) if isinstance(since, str) else since
    return now - DEFAULT_WINDOW if start is None else start


def assemble(figures: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The schedules' entries, by name, from the database's aggregates (see worker.store.funnel_figures)."""
    schedules: dict[str, dict[str, Any]] = {}
    for row in figures["status"]:
        entry = schedules.setdefault(row["schedule"], {s: 0 for s in STATUSES})
        entry[row["status"]] = entry.get(row["status"], 0) + int(row["n"])
    histogram: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
    for row in figures["histogram"]:
        histogram[row["schedule"]][int(row["bucket"])] += int(row["n"])
    medians = {row["schedule"]: _number(row["median"]) for row in figures["median"]}
    steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
    offsets: dict[tuple[str, str], float] = {}  # (schedule, step) -> earliest offset from created_at
    for row in figures["steps"]:
        key = (row["schedule"], row["step"])
        offsets[key] = min(offsets.get(key, float(row["first_offset"])), float(row["first_offset"]))
        messages = {c: int(row[c]) for c in CHANNEL_ORDER if row.get(c)}
        confirmed_after = int(row["confirmed_after"])
        steps[row["schedule"]].append({
            "step": row["step"], "variant": row["variant"], "reached": int(row["reached"]),
            "confirmed_after": confirmed_after, "cancelled": int(row["cancelled"]),
            "escalated": int(row["escalated"]), "messages": messages,
            "sms_segments": None if row["sms_segments"] is None else int(row["sms_segments"]),
            "confirmation_rate": wilson(confirmed_after, int(row["reached"])),
            "median_time_to_confirm_seconds": _number(row["median"]),
            "sms_messages": messages.get("sms", 0),
        })
    out = []
    for name in sorted(schedules):
        status = schedules[name]
        total = sum(status.values())
        ordered = sorted(steps.get(name, []), key=lambda r: (offsets[(name, r["step"])], r["step"], r["variant"]))
        counts = histogram[name]
        out.append({
            "schedule": name, "transactions": total, **status,
            # every confirmation is attributed to one step, or came before any
            "confirmed_before_first_step": sum(counts) - sum(r["confirmed_after"] for r in ordered),
            "confirmation_rate": wilson(status["confirmed"], total),
            "median_time_to_confirm_seconds": medians.get(name),
            "time_to_confirm_histogram": [{"bucket": label, "from_seconds": lo, "to_seconds": hi, "count": n}
                                          for (label, lo, hi), n in zip(BUCKETS, counts, strict=True)],
            "steps": [{k: r[k] for k in _STEP_KEYS} for r in ordered],
        })
    return out


_STEP_KEYS = ("step", "variant", "reached", "confirmed_after", "cancelled", "escalated", "messages", "sms_segments",
              "confirmation_rate", "median_time_to_confirm_seconds", "sms_messages")


def _number(value: Any) -> float | None:
    """A median from the database (a Decimal, float or None) as seconds."""
    return None if value is None else float(value)


def summarize(txs: list[dict[str, Any]], dls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same figures computed in Python on plain rows (see worker.store.funnel_rows): the reference the
    tests hold the database's aggregation to, on small stores. One entry per schedule, by name."""
    units: dict[str, dict[tuple[str, str], _Unit]] = defaultdict(dict)
    for d in dls:
        if d["first_sent"] is None:
            continue
        u = units[d["transaction_id"]].setdefault((d["step"], d["variant"]), _Unit(d["first_sent"]))
        u.first_sent = min(u.first_sent, d["first_sent"])
        u.messages[d["channel"]] = u.messages.get(d["channel"], 0) + d["messages"]
        if d["channel"] == "sms" and d.get("segments") is not None:
            u.segments = (u.segments or 0) + d["segments"]
    by_schedule: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for tx in txs:
        by_schedule[tx["schedule"]].append(tx)
    return [_schedule(name, rows, units) for name, rows in sorted(by_schedule.items())]


def _schedule(name: str, txs: list[dict[str, Any]], units: dict[str, dict[tuple[str, str], _Unit]]) -> dict:
    steps: dict[tuple[str, str], dict[str, Any]] = {}
    offsets: dict[str, float] = {}  # step -> earliest offset from created_at, to order the ladder
    status = {s: 0 for s in STATUSES}
    before_first, to_confirm = 0, []
    for tx in txs:
        status[tx["status"]] = status.get(tx["status"], 0) + 1
        mine = sorted(units.get(tx["id"], {}).items(), key=lambda kv: (kv[1].first_sent, kv[0]))
        for (step, variant), u in mine:
            row = steps.setdefault((step, variant), _empty_step(step, variant))
            row["reached"] += 1
            for channel, n in u.messages.items():
                row["messages"][channel] = row["messages"].get(channel, 0) + n
            if u.segments is not None:
                row["sms_segments"] = (row["sms_segments"] or 0) + u.segments
            offset = (u.first_sent - tx["created_at"]).total_seconds()
            offsets[step] = min(offsets.get(step, offset), offset)
        if tx["status"] == "confirmed" and tx["confirmed_at"] is not None:
            to_confirm.append((tx["confirmed_at"] - tx["created_at"]).total_seconds())
            sent_before = [(key, u) for key, u in mine if u.first_sent <= tx["confirmed_at"]]
            if not sent_before:
                before_first += 1
            else:
                key, u = sent_before[-1]
                steps[key]["confirmed_after"] += 1
                steps[key]["_times"].append((tx["confirmed_at"] - u.first_sent).total_seconds())
        elif tx["status"] in ("cancelled", "escalated") and mine:
            steps[mine[-1][0]][tx["status"]] += 1
    ordered = sorted(steps.values(), key=lambda r: (offsets[r["step"]], r["step"], r["variant"]))
    for row in ordered:
        times = row.pop("_times")
        row["confirmation_rate"] = wilson(row["confirmed_after"], row["reached"])
        row["median_time_to_confirm_seconds"] = statistics.median(times) if times else None
        row["messages"] = {c: row["messages"][c] for c in _channels(row["messages"])}
        row["sms_messages"] = row["messages"].get("sms", 0)
    return {
        "schedule": name, "transactions": len(txs), **status,
        "confirmed_before_first_step": before_first,
        "confirmation_rate": wilson(status["confirmed"], len(txs)),
        "median_time_to_confirm_seconds": statistics.median(to_confirm) if to_confirm else None,
        "time_to_confirm_histogram": _histogram(to_confirm),
        "steps": ordered,
    }


def _empty_step(step: str, variant: str) -> dict[str, Any]:
    return {"step": step, "variant": variant, "reached": 0, "confirmed_after": 0, "cancelled": 0,
            "escalated": 0, "messages": {}, "sms_segments": None, "_times": []}


def _channels(messages: dict[str, int]) -> list[str]:
    return sorted(messages, key=lambda c: (CHANNEL_ORDER.index(c) if c in CHANNEL_ORDER else 99, c))


def _histogram(seconds: list[float]) -> list[dict[str, Any]]:
    counts = [0] * len(BUCKETS)
    for s in seconds:
        counts[next(i for i, (_, _, hi) in enumerate(BUCKETS) if hi is None or s < hi)] += 1
    return [{"bucket": label, "from_seconds": lo, "to_seconds": hi, "count": n}
            for (label, lo, hi), n in zip(BUCKETS, counts, strict=True)]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


# -- text, for `remind stats` ---------------------------------------------------------------------

def human(seconds: float | None) -> str:
    """``1h5m`` from seconds; '-' for nothing."""
    return "-" if seconds is None else format_duration(timedelta(seconds=round(seconds)))


def pct(rate: dict[str, float | None]) -> str:
    if rate["value"] is None:
        return "-"
    return f"{rate['value']:.1%} [{rate['low']:.1%}-{rate['high']:.1%}]"


def to_text(stats: dict[str, Any]) -> str:
    """A table per schedule, for a terminal; with ``report``'s costs and variant comparisons when present."""
    scope = f"since {stats['since']}" if stats["since"] else "all time"  # since: 7 days back unless given
    lines = [f"confirmation funnel, {scope}" + (f", schedule {stats['schedule']}" if stats["schedule"] else "")]
    if not stats["schedules"]:
        lines.append("no transactions")
    costs = {c["schedule"]: c for c in (stats.get("costs") or {}).get("schedules", [])}
    variants = {e["schedule"]: e["steps"] for e in (stats.get("experiments") or {}).get("schedules", [])}
    for s in stats["schedules"]:
        approved = f", {s['approved']} approved by ops" if s.get("approved") else ""
        lines += ["", f"{s['schedule']}: {s['transactions']} transactions, {s['confirmed']} confirmed "
                      f"{pct(s['confirmation_rate'])}{approved}, {s['cancelled']} cancelled, "
                      f"{s['escalated']} escalated, "
                      f"{s['pending']} pending; median time to confirm {human(s['median_time_to_confirm_seconds'])}",
                  f"  {'step':<16}{'variant':<10}{'reached':>8}{'confirmed':>10}  {'rate [95% CI]':<22}"
                  f"{'median':>8}{'cancelled':>10}{'escalated':>10}  messages (sms segments)"]
        if s["confirmed_before_first_step"]:
            lines.insert(-1, f"  {s['confirmed_before_first_step']} confirmed before the first step went out")
        for r in s["steps"]:
            sent = ", ".join(f"{c} {n}" for c, n in r["messages"].items())
            seg = f" ({r['sms_segments']})" if r["sms_segments"] is not None else ""
            lines.append(f"  {r['step']:<16}{r['variant']:<10}{r['reached']:>8}{r['confirmed_after']:>10}  "
                         f"{pct(r['confirmation_rate']):<22}{human(r['median_time_to_confirm_seconds']):>8}"
                         f"{r['cancelled']:>10}{r['escalated']:>10}  {sent}{seg}")
        lines.append("  time to confirm: " + ", ".join(f"{b['bucket']} {b['count']}"
                                                         for b in s["time_to_confirm_histogram"]))
        lines += _cost_lines(costs.get(s["schedule"]), stats.get("currency"))
        lines += _variant_lines(variants.get(s["schedule"], []))
    return "\n".join(lines)


def _cost_lines(c: dict[str, Any] | None, currency: str | None) -> list[str]:
    """What the schedule's messages cost (``report``'s ``costs``): in all, then per step and variant."""
    if c is None:
        return []
    if currency is None:
        return ["  cost: - (no price table: REMIND_PRICING_FILE)"]
    lines = [f"  cost: {currency} {c['cost']}, {_or_dash(c['cost_per_transaction'])} per transaction, "
             f"{_or_dash(c['cost_per_customer_confirmation'])} per customer confirmation "
             f"({c['customer_confirmations']} of {c['transactions']})",
             f"  {'step':<16}{'variant':<10}{'reached':>8}{'customer':>10}{'cost':>14}{'per transaction':>18}"
             f"{'per customer confirmation':>28}"]
    for r in c["steps"]:
        lines.append(f"  {r['step']:<16}{r['variant']:<10}{r['reached']:>8}{r['customer_confirmations']:>10}"
                     f"{_or_dash(r['cost']):>14}{_or_dash(r['cost_per_transaction']):>18}"
                     f"{_or_dash(r['cost_per_customer_confirmation']):>28}")
    return lines


def _variant_lines(steps: list[dict[str, Any]]) -> list[str]:
    """Each step with variants against its control (``report``'s ``experiments``; docs/stats.md)."""
    from .experiments import comparison_line

    lines = []
    for st in steps:
        if st["comparisons"]:
            lines.append(f"  variants of {st['step']} (control {st['control']}; customer confirmations, "
                         "always-valid interval):")
            lines += [f"    {comparison_line(c)}" for c in st["comparisons"]]
    return lines


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)
