"""A/B variants compared honestly: does variant B of a step get more customers to confirm than the control,
by how much, and how many more transactions a fair answer needs. See docs/stats.md, "Variant comparison".

**What is counted (attribution).** Per (schedule, step, variant), on reminder deliveries that went out, with
the funnel's rule (docs/stats.md): a step *reached* a transaction when one of its deliveries went out, at the
step's *first sent*; a confirmation goes to the last step sent before it (``first sent <= confirmed_at <
first sent of the next step that reached it``). Only a confirmation the customer made
(``settled_source = 'customer'``: the link) is a success; one by ops (a review approval), by the platform
(API) or from the CLI is counted apart and is not a success. A transaction's outcome for a step is
*decided* once the step's window has closed: a later step reached it, or it settled. One still pending
with this step as its last is *open* and left out of the rates until then, so every arm's rate is over
outcomes that are known. Time to confirm is ``confirmed_at`` minus the step's first sent, over customer
confirmations only.

**Which arm is the control.** A variant named ``control``; else one named ``default``; else the first variant
of the step in the schedule file as loaded now; else (a step no longer in the file) the variant sent first.
Only transactions created while every arm of the step was being sent are compared (the *concurrent* window:
from the latest first transaction of an arm to the earliest last one), so an arm from before the variants
were introduced, or one since removed, is not compared with another period.

**The test (always valid under peeking).** The difference ``rate(B) - rate(A)`` gets a *confidence sequence*:
the mixture sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis and Walsh, "Peeking at A/B
tests" (KDD 2017) and "Always valid inference" (Operations Research 70(3), 2022), with a normal mixture
(Robbins 1970) over the difference, on the normal approximation of the two-proportion difference as in
Optimizely's Stats Engine (see also Howard et al., Annals of Statistics 2021, and Waudby-Smith et al., 2021,
for asymptotic confidence sequences). With ``v`` the variance of the estimated difference and ``tau`` the
mixing scale (the minimum detectable effect),

    Lambda(theta) = sqrt(v / (v + tau^2)) * exp(tau^2 (d - theta)^2 / (2 v (v + tau^2)))

and the interval is every theta with Lambda < 1/alpha, i.e. ``d +- sqrt(v (v + tau^2) / tau^2 *
(ln((v + tau^2) / v) + 2 ln(1/alpha)))``. The probability that the interval *ever* misses the true difference,
however often it is looked at, is at most alpha: ops may look every day and act the day it excludes 0.
Verdicts: ``better`` / ``worse`` (the interval excludes 0), ``no difference`` (it lies within +-MDE),
``no difference yet`` (with how many more transactions per arm are needed), ``too few`` (under
``min_per_arm`` decided transactions in an arm, where the normal approximation is not trusted).
Several variants of one step share alpha (Bonferroni over the comparisons with the control), and so do
the cells of a breakdown (segment, locale, channels), so looking at every cell does not multiply false
winners.

**How many more.** ``needs_more`` is the number of further decided transactions per arm after which this
verdict has ``power`` (80%) probability to come out when the true difference is the MDE (on the control's
rate so far, at the current split between the arms): the smallest sample where ``half-width + z_power * se
<= MDE``. ``fixed_horizon`` is the classical answer for a single test at one pre-planned sample size
(Cohen's arcsine effect size, the formula of statsmodels' ``NormalIndPower``); it is smaller, but is only
valid if nobody acts on a look before it.

The guarantee is asymptotic: it rests on the normal approximation with the variance estimated from the data
(hence ``min_per_arm``); tests/test_experiments.py checks it by simulation at the sizes this service sees.

Everything but ``report`` / ``read_table`` (which read the store) is a pure function of counts; ``compare`` is
the one the tests feed with simulated daily counts. The database does the attribution and the counting
(worker/attribution.py, worker.store.experiments: one row per cell, never per transaction), so a report's
memory does not grow with the window; scipy (``ndtri``, for the normal quantiles) loads with the first
comparison, not with the module.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from .attribution import BREAKDOWNS, Cell, Outcome, Table, attribute, table_from_rows, table_of
from .stats import human, parse_since
from .store import Store
from .store.experiments import OUTCOMES, variant_figures

ALPHA = 0.05
MDE = 0.05  # five percentage points
POWER = 0.8
MIN_PER_ARM = 30
CONTROL_NAMES = ("control", "default")
__all__ = ["Outcome", "Table", "attribute", "choose_control", "compare", "needed_per_arm", "read_table", "report",
           "summarize", "to_text"]

METHOD = ("mSPRT confidence sequence for a difference of two proportions (normal mixture; Johari et al., "
          "Always valid inference, Operations Research 2022)")


# -- the statistics, on counts ------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _z(q: float) -> float:
    """The standard normal quantile (scipy's ``ndtri``, what ``scipy.stats.norm.ppf`` computes), kept: the same
    few levels are asked for on every look. Imported here, not with the module: the web process loads
    scipy.special (~40 MB) with its first comparison, and never loads scipy.stats (~90 MB)."""
    from scipy.special import ndtri

    return float(ndtri(q))


def _rate(k: int, n: int) -> float:
    """A rate kept off 0 and 1 for the variance (add a half success and a half failure)."""
    return (k + 0.5) / (n + 1)


def _half_width(v: float, tau: float, alpha: float) -> float:
    """The mixture boundary: half-width of the always-valid interval for an estimate with variance v."""
    t2 = tau * tau
    return math.sqrt(v * (v + t2) / t2 * (math.log((v + t2) / v) + 2 * math.log(1 / alpha)))


def _log_lambda(d: float, v: float, tau: float) -> float:
    """log of the mixture likelihood ratio against "no difference"."""
    t2 = tau * tau
    return 0.5 * math.log(v / (v + t2)) + t2 * d * d / (2 * v * (v + t2))


def _planning_rates(control_rate: float, mde: float) -> tuple[float, float]:
    """The control's rate and one MDE away from it, towards 1/2 (the larger variance: conservative)."""
    p = min(max(control_rate, 1e-3), 1 - 1e-3)
    q = p + mde if p < 0.5 else p - mde
    return p, min(max(q, 1e-3), 1 - 1e-3)


@lru_cache(maxsize=64)
def _v_star(mde: float, alpha: float, power: float) -> float:
    """The variance of the estimated difference at which ``half-width + z_power * sqrt(v) = mde`` (both terms
    grow with v): where the verdict comes out with ``power`` at a true difference of ``mde``. It depends on
    neither rate, so it is solved once per (mde, alpha, power), by bisection on log v to 1e-15 relative."""
    z_power = _z(power)

    def excess(v: float) -> float:
        return _half_width(v, mde, alpha) + z_power * math.sqrt(v) - mde

    lo, hi = 1e-15, 10.0
    while hi - lo > 1e-15 * hi:
        mid = math.sqrt(lo * hi) if hi / lo > 4 else (lo + hi) / 2
        if excess(mid) > 0:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def needed_per_arm(control_rate: float, *, ratio: float = 1.0, mde: float = MDE, alpha: float = ALPHA,
                   power: float = POWER) -> dict[str, dict[str, int]]:
    """Decided transactions per arm for ``power`` at a true difference of ``mde``, with ``ratio`` = variant /
    control arm size: ``always_valid`` for this module's verdict, ``fixed_horizon`` for one test at one
    planned size (two-sided, arcsine effect size as in statsmodels' NormalIndPower)."""
    p, q = _planning_rates(control_rate, mde)
    z_power = _z(power)
    v_star = _v_star(mde, alpha, power)
    n_control = (p * (1 - p) + q * (1 - q) / ratio) / v_star
    h = abs(2 * math.asin(math.sqrt(q)) - 2 * math.asin(math.sqrt(p)))
    f_control = ((_z(1 - alpha / 2) + z_power) / h) ** 2 * (1 + 1 / ratio)
    return {"always_valid": {"control": math.ceil(n_control), "variant": math.ceil(n_control * ratio)},
            "fixed_horizon": {"control": math.ceil(f_control), "variant": math.ceil(f_control * ratio)}}


def compare(control: tuple[int, int], variant: tuple[int, int], *, alpha: float = ALPHA, mde: float = MDE,
            power: float = POWER, min_per_arm: int = MIN_PER_ARM, names: tuple[str, str] = ("A", "B")) -> dict:
    """Variant against control, each as (successes, decided transactions). JSON-ready:

    ``difference`` {value, low, high}: rate(variant) - rate(control) with its always-valid (1 - alpha)
    interval; ``p_value``: the always-valid p-value of this look (1 / likelihood ratio, capped at 1);
    ``verdict``: better | worse | no difference | no difference yet | too few; ``text``: the verdict in
    words; ``needs_more``: further decided transactions per arm, or None once decided;
    ``fixed_horizon``: the classical sample size per arm (see the module's docstring)."""
    (k_a, n_a), (k_b, n_b) = control, variant
    name_a, name_b = names
    out: dict[str, Any] = {
        "control": {"variant": name_a, "decided": n_a, "confirmed_by_customer": k_a,
                    "rate": k_a / n_a if n_a else None},
        "variant": {"variant": name_b, "decided": n_b, "confirmed_by_customer": k_b,
                    "rate": k_b / n_b if n_b else None},
        "alpha": alpha, "mde": mde, "power": power,
        "difference": {"value": None, "low": None, "high": None}, "p_value": None,
    }
    ratio = n_b / n_a if n_a and n_b else 1.0
    plan = needed_per_arm(_rate(k_a, n_a), ratio=ratio, mde=mde, alpha=alpha, power=power)
    more = {arm: max(0, plan["always_valid"][arm] - n) for arm, n in (("control", n_a), ("variant", n_b))}
    out["fixed_horizon"] = plan["fixed_horizon"]
    if n_a and n_b:
        d = k_b / n_b - k_a / n_a
        p_a, p_b = _rate(k_a, n_a), _rate(k_b, n_b)
        v = p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b
        half = _half_width(v, mde, alpha)
        out["difference"] = {"value": d, "low": max(-1.0, d - half), "high": min(1.0, d + half)}
        out["p_value"] = min(1.0, math.exp(-_log_lambda(d, v, mde)))
    low, high = out["difference"]["low"], out["difference"]["high"]
    if low is None or high is None or min(n_a, n_b) < min_per_arm:
        verdict = "too few"
        text = f"too few yet (under {min_per_arm} decided per arm; needs ~{_more_text(more, name_a, name_b)})"
    elif low > 0:
        verdict, text = "better", f"{name_b} better"
    elif high < 0:
        verdict, text = "worse", f"{name_b} worse"
    elif low > -mde and high < mde:
        verdict, text = "no difference", f"no difference of {_pts(mde)} or more"
    else:
        verdict, text = "no difference yet", f"no difference yet (needs ~{_more_text(more, name_a, name_b)})"
    out.update(verdict=verdict, text=text,
               needs_more=more if verdict in ("too few", "no difference yet") else None)
    return out


def _round_up(n: int) -> int:
    """Two significant figures, upwards: an estimate should not look precise."""
    if n < 100:
        return n
    step = 10 ** (len(str(n)) - 2)
    return -(-n // step) * step


def _more_text(more: dict[str, int], name_a: str, name_b: str) -> str:
    """One number when the arms are within a quarter of each other (the larger), else each arm's."""
    a, b = _round_up(more["control"]), _round_up(more["variant"])
    if max(a, b) <= 1.25 * min(a, b):
        return f"{max(a, b):,} more per arm"
    return f"{a:,} more on {name_a}, {b:,} more on {name_b}"


def _pts(x: float) -> str:
    return f"{x * 100:.3g} pts"


# -- the report, on the table (worker/attribution.py) ----------------------------------------------------------

def choose_control(variants: Sequence[str], listed: Sequence[str] = (), first_sent: dict[str, datetime] | None = None
                   ) -> str:
    """The control arm: ``control``, else ``default``, else the first listed in the schedule file, else the
    one sent first (then by name)."""
    for name in CONTROL_NAMES:
        if name in variants:
            return name
    for name in listed:
        if name in variants:
            return name
    if first_sent:
        return min(variants, key=lambda v: (first_sent[v], v))
    return sorted(variants)[0]


def _counts(cells: Iterable[Cell]) -> dict[str, int]:
    total = {"reached": 0, **dict.fromkeys(OUTCOMES, 0)}
    for c in cells:
        for k, n in c.counts.items():
            total[k] += n
    return total


def arm_figures(variant: str, cells: Sequence[Cell], times: dict[str, float | None] | None = None) -> dict[str, Any]:
    """What happened after one arm's step, customer confirmations apart from everyone else's."""
    counts = _counts(cells)
    decided = counts["reached"] - counts["open"]
    return {"variant": variant, "reached": counts.pop("reached"), "decided": decided, **counts,
            "customer_rate": counts["confirmed_by_customer"] / decided if decided else None,
            "time_to_confirm_seconds": times or {"median": None, "p25": None, "p75": None}}


def summarize(outcomes: Sequence[Outcome] | Table, *, listed: dict[tuple[str, str], Sequence[str]] | None = None,
              alpha: float = ALPHA, mde: float = MDE, power: float = POWER, min_per_arm: int = MIN_PER_ARM
              ) -> list[dict[str, Any]]:
    """Per schedule, per step (ordered by when it reaches customers): each variant's figures and, where a
    step has two or more variants, the comparisons with the control, overall and by breakdown. From the
    table (worker/attribution.py), or from units row by row (``attribute``)."""
    table = outcomes if isinstance(outcomes, Table) else table_of(outcomes)
    listed = listed or {}
    steps: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for c in table.cells:
        steps[(c.schedule, c.step)].append(c)
    by_schedule: dict[str, list[dict[str, Any]]] = defaultdict(list)
    offsets: dict[tuple[str, str], float] = {}
    for (schedule, step), cells in steps.items():
        offsets[(schedule, step)] = min(c.first_offset for c in cells)
        by_schedule[schedule].append(_step(schedule, step, cells, table.times, listed.get((schedule, step), ()),
                                           alpha=alpha, mde=mde, power=power, min_per_arm=min_per_arm))
    return [{"schedule": name, "steps": sorted(rows, key=lambda s: (offsets[(name, s["step"])], s["step"]))}
            for name, rows in sorted(by_schedule.items())]


def _step(schedule: str, step: str, cells: list[Cell], times: dict, listed: Sequence[str], **opts) -> dict[str, Any]:
    arms: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        arms[c.variant].append(c)
    names = sorted(arms)

    def figures(v: str) -> dict[str, Any]:
        return arm_figures(v, arms[v], times.get((schedule, step, v)))

    entry: dict[str, Any] = {"step": step, "variants": [figures(v) for v in names]}
    if len(names) < 2:
        entry.update(control=None, concurrent={"from": None, "to": None, "left_out": 0}, comparisons=[],
                     breakdowns={})
        return entry
    first = {v: min(c.first_sent for c in arms[v]) for v in names}
    control = choose_control(names, listed, first)
    others = [v for v in names if v != control]
    # arms are compared over the transactions created while every one of them was being sent
    start = max(min(c.created_from for c in arms[v]) for v in names)
    end = min(max(c.created_to for c in arms[v]) for v in names)
    fair = [c for c in cells if c.concurrent]
    entry["control"] = control
    entry["variants"] = [figures(v) for v in [control, *others]]
    entry["concurrent"] = {"from": _iso(start), "to": _iso(end),
                           "left_out": sum(c.counts["reached"] for c in cells if not c.concurrent)}
    entry["comparisons"] = _comparisons(fair, control, others, split=1, **opts)
    entry["breakdowns"] = {}
    for dim in BREAKDOWNS:
        by_value: dict[str, list[Cell]] = defaultdict(list)
        for c in fair:
            by_value[getattr(c, dim)].append(c)
        entry["breakdowns"][dim] = [{"value": value, "comparisons": _comparisons(by_value[value], control, others,
                                                                                  split=len(by_value), **opts)}
                                    for value in sorted(by_value)]
    return entry


def _comparisons(cells: Sequence[Cell], control: str, others: Sequence[str], *, split: int, alpha: float,
                 **opts) -> list[dict[str, Any]]:
    """Each variant against the control on these cells, alpha shared (Bonferroni) by the variants and ``split``
    cells."""
    counts = {v: _counts(c for c in cells if c.variant == v) for v in (control, *others)}

    def arm(v: str) -> tuple[int, int]:
        return counts[v]["confirmed_by_customer"], counts[v]["reached"] - counts[v]["open"]

    shared = alpha / (len(others) * split)
    return [compare(arm(control), arm(v), alpha=shared, names=(control, v), **opts) for v in others]


def report(store: Store, *, since: str | datetime | None = None, schedule: str | None = None,
           now: datetime | None = None, schedules: Iterable[Any] = (), alpha: float = ALPHA, mde: float = MDE,
           power: float = POWER, min_per_arm: int = MIN_PER_ARM, table: Table | None = None) -> dict[str, Any]:
    """The variant comparison as JSON-ready data (raises ValueError for a ``since`` it cannot read).
    ``schedules``: the loaded schedules (``Remind.registry``), for the order of each step's variants;
    ``table``: the figures when the caller has read them already (``read_table``)."""
    now = now or store.clock()
    start = parse_since(since, now) if isinstance(since, str) else since
    listed = {(s.name, step.id): [v.name for v in step.variants] for s in schedules for step in s.steps}
    if table is None:
        table = read_table(store, start, schedule)
    return {"generated_at": _iso(now), "since": _iso(start), "schedule": schedule,
            "method": {"name": METHOD, "alpha": alpha, "mde": mde, "power": power, "min_per_arm": min_per_arm,
                       "success": "confirmed by the customer (settled_source = customer)"},
            "schedules": summarize(table, listed=listed, alpha=alpha, mde=mde, power=power,
                                   min_per_arm=min_per_arm)}


def read_table(store: Store, since: datetime | None, schedule: str | None, among: Sequence[str] | None = None
               ) -> Table:
    """The comparison's figures for the transactions created at or after ``since`` (on ``schedule``, among
    ``among``), aggregated by the database."""
    if among is not None and not among:
        return Table()
    return table_from_rows(variant_figures(store, since, schedule, among))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


# -- text, for `remind experiments` -------------------------------------------------------------------------

def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}"


def comparison_line(c: dict[str, Any]) -> str:
    """``short vs plain: +15.8 pts [+6.7, +24.9]  short better``."""
    d = c["difference"]
    interval = f"{_signed(d['value'])} pts [{_signed(d['low'])}, {_signed(d['high'])}]" if d["value"] is not None \
        else "-"
    return f"{c['variant']['variant']} vs {c['control']['variant']}: {interval}  {c['text']}"


def to_text(data: dict[str, Any]) -> str:
    """Every step's outcomes per variant (customer confirmations apart from the rest), and where a step has
    variants, each one against the control, overall and by segment, locale and channels."""
    m = data["method"]
    scope = f"since {data['since']}" if data["since"] else "all time"
    lines = [f"variant comparison, {scope}" + (f", schedule {data['schedule']}" if data["schedule"] else ""),
             f"success = confirmed by the customer; always-valid {1 - m['alpha']:.0%} intervals (mSPRT), "
             f"MDE {_pts(m['mde'])}, power {m['power']:.0%}"]
    if not data["schedules"]:
        lines += ["", "no transactions"]
    for s in data["schedules"]:
        lines += ["", f"{s['schedule']}",
                  f"  {'step':<16}{'variant':<12}{'decided':>8}{'customer':>9}{'rate':>8}{'ops':>5}{'platform':>9}"
                  f"{'other':>6}{'cancelled':>10}{'escalated':>10}{'open':>6}  time to confirm: median [p25-p75]"]
        for st in s["steps"]:
            for a in st["variants"]:
                t = a["time_to_confirm_seconds"]
                rate = f"{a['customer_rate']:.1%}" if a["customer_rate"] is not None else "-"
                lines.append(f"  {st['step']:<16}{a['variant']:<12}{a['decided']:>8}{a['confirmed_by_customer']:>9}"
                             f"{rate:>8}{a['confirmed_by_ops']:>5}{a['confirmed_by_platform']:>9}"
                             f"{a['confirmed_other']:>6}{a['cancelled']:>10}{a['escalated']:>10}{a['open']:>6}  "
                             + (f"{human(t['median'])} [{human(t['p25'])}-{human(t['p75'])}]"
                                if t["median"] is not None else "-"))
        for st in s["steps"]:
            if not st["comparisons"]:
                continue
            c = st["concurrent"]
            lines += ["", f"  {st['step']}: control {st['control']}, transactions created {c['from']} to {c['to']}"
                      + (f" ({c['left_out']} outside, not compared)" if c["left_out"] else "")]
            lines += [f"    {comparison_line(cmp)}" for cmp in st["comparisons"]]
            for dim, cells in st["breakdowns"].items():
                for cell in cells:
                    lines += [f"      {dim} {cell['value']}: {comparison_line(cmp)}" for cmp in cell["comparisons"]]
    return "\n".join(lines)
