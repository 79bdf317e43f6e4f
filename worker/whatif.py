"""What-if before saving: replay the recorded transactions of a period under a proposed ladder.

Pure: numbers in, numbers out (history rows, schedules, a pricing object); no SQL, no I/O. See docs/whatif.md.

**The model.** A piecewise-constant hazard of a *customer* confirmation, in hours since the transaction was
created (``t``):

    h(t) = base[bin(t)] · effect[kind of the last reminder sent, bin(t − when it was sent)] · seg[segment]

``kind`` is a reminder's template and the set of channels it went out on together (``reminder:sms+push``),
so the effect of a reminder may decay (or grow) over the hours since it was sent. It is fitted as a
Poisson GLM (statsmodels) on person-time: each transaction's follow-up is cut wherever a factor changes,
the pieces are summed per cell (confirmations, hours at risk), and ``log(hours)`` is the offset. One
pseudo-observation per parameter (half a confirmation; at the overall rate for the baseline, at no effect
for the others) keeps a cell without any confirmation finite; its pull is negligible against real data.

Only customer confirmations (``settled_source = 'customer'``) before the deadline are events. A
settlement by the platform, the CLI or ops ends (censors) the follow-up at its time; a deadline cancel
or escalation at the deadline. Transactions still pending, or whose deadline is still to come, are left out.

**The replay.** Each transaction of the period gets the proposed ladder's send times from the planner
(``ladder.slots``: quiet hours in the customer's zone, steps after the deadline dropped), its channels
from its contacts (``contacts.choose``, with the step's fallback), its variant (``choose_variant``), and
its deadline from the proposed ``cancel.after``/``escalate.after`` (or ``expires_at``). Integrating the
fitted hazard gives each one's probability of confirming and its time distribution; a message is
expected when the transaction is still pending at its send time.

**Intervals.** 95%, from ``DRAWS`` draws of the parameters from the normal approximation of the fit
(estimates and the GLM's covariance): a parametric bootstrap. The confirmation rate's interval is for the
expected rate of these transactions (model uncertainty only); ``prediction`` adds the binomial noise of
their actual number, the interval an observed rate should fall in (the backtest uses it).
"""

from __future__ import annotations

import bisect
import functools
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import numpy as np

from .contacts import choose
from .ladder import Schedule, choose_variant, slots
from .stats import wilson

CHANNEL_ORDER = ("sms", "email", "push")
#: Baseline bins, hours since created_at (the last one is open-ended).
BASE_BINS: tuple[float, ...] = (0, 0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 36, 48)
#: Reminder-effect bins, hours since that reminder went out (the last one is open-ended).
SINCE_BINS: tuple[float, ...] = (0, 0.5, 2, 6)
#: Draws of the parameters for the intervals (the median's interval uses the first MEDIAN_DRAWS of them).
DRAWS = 400
MEDIAN_DRAWS = 100
#: Deliveries of one step sent within this long of each other count as one reminder (one kind).
SAME_SEND = timedelta(minutes=5)
Z95 = 1.959963984540054

ASSUMPTIONS = (
    "a reminder has the same effect in the proposed ladder as it had in the recorded one (same template, same "
    "channels together), and that effect depends only on the hours since it was sent, not on earlier reminders",
    "the confirmation hazard without a reminder depends only on the hours since created_at and the segment "
    "(no time-of-day effect): quiet hours matter only through when messages go out",
    "only customer confirmations count; platform/ops settlements are independent of the reminders: the replay "
    "ends a transaction at its recorded platform/ops settlement, if it had one, else at the proposed deadline",
    "every step goes out on time (no late-step skips, no outages) to the channels the customer's recorded "
    "contacts allow (the step's fallback applied; opt-outs are not known to the replay)",
    "messages, SMS segments and cost count reminders only (as `remind stats`); SMS segments per message are the "
    "recorded average of the same template (and locale) over the period",
    "transactions still pending or whose deadline is still to come are left out; the model is fitted on every "
    "settled transaction of the period (all schedules), the replay is of the chosen schedule's transactions",
)


class PricingLike(Protocol):
    """What the what-if needs of ``worker.pricing.Pricing``."""

    currency: str

    def cost(self, channel: str, *, segments: int = 1, phone: str | None = None,
             country_code: int | None = None) -> Decimal: ...


# -- history -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reminder:
    at: datetime
    kind: str  # "template:ch1+ch2"
    channels: tuple[str, ...]
    template: str


@dataclass
class Record:
    """One settled transaction of the period, as the model sees it."""

    id: str
    schedule: str
    segment: str
    created_at: datetime
    expires_at: datetime | None
    deadline: datetime
    zone: str
    customer: dict[str, Any]
    locale: str
    confirmed_at: datetime | None  # a customer confirmation before the deadline: the event
    external_at: datetime | None  # a platform/CLI/ops settlement: censored there
    reminders: list[Reminder] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)  # the reminder deliveries that went out

    @property
    def end(self) -> datetime:
        """Where the recorded follow-up ends."""
        return self.confirmed_at or self.external_at or self.deadline


def kind_of(template: str, channels: Iterable[str]) -> str:
    return f"{template}:{'+'.join(sorted(set(channels), key=_channel_key))}"


def _channel_key(c: str) -> tuple[int, str]:
    return (CHANNEL_ORDER.index(c) if c in CHANNEL_ORDER else 99, c)


def records(txs: Sequence[Mapping[str, Any]], dls: Sequence[Mapping[str, Any]], now: datetime) -> list[Record]:
    """Transactions whose deadline has passed by ``now`` (see worker.store.history_rows) as Records; pending ones
    and ones whose deadline is still to come are left out (among those, only the quick confirmations are in)."""
    by_tx: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for d in dls:
        by_tx[d["transaction_id"]].append(d)
    out = []
    for tx in txs:
        if tx["status"] == "pending" or tx["deadline"] > now:  # not over yet: only quick confirmations would count
            continue
        settled = tx["confirmed_at"] or tx["cancelled_at"] or tx["escalated_at"]
        if settled is None:
            continue
        source = tx.get("settled_source") or ""
        deadline = tx["deadline"]
        confirmed = external = None
        if settled < deadline and source == "customer" and tx["status"] == "confirmed":
            confirmed = settled
        elif settled < deadline and source not in ("deadline", "customer"):
            external = settled
        customer = dict((tx.get("content") or {}).get("customer") or {})
        rec = Record(id=tx["id"], schedule=tx["schedule"], segment=tx.get("segment") or "(none)",
                     created_at=tx["created_at"], expires_at=tx.get("expires_at"), deadline=deadline,
                     zone=customer.get("timezone") or "UTC", customer=customer,
                     locale=str(customer.get("locale") or ""), confirmed_at=confirmed, external_at=external)
        rec.sent = list(by_tx.get(tx["id"], ()))
        rec.reminders = _reminders(rec.sent)
        out.append(rec)
    return out


def _reminders(sent: Sequence[Mapping[str, Any]]) -> list[Reminder]:
    """Deliveries of one step sent together (within SAME_SEND of the first) make one reminder."""
    groups: list[tuple[str, datetime, list[Mapping[str, Any]]]] = []
    for d in sorted(sent, key=lambda d: d["sent_at"]):
        for step, first, members in groups:
            if step == d["step"] and d["sent_at"] - first <= SAME_SEND:
                members.append(d)
                break
        else:
            groups.append((d["step"], d["sent_at"], [d]))
    out = []
    for _, first, members in groups:
        template = members[0]["template"] or members[0]["step"]
        channels = tuple(sorted({m["channel"] for m in members}, key=_channel_key))
        out.append(Reminder(first, kind_of(template, channels), channels, template))
    return sorted(out, key=lambda r: r.at)


# -- person-time ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A stretch of one transaction's follow-up over which every factor is constant."""

    start: float  # hours since created_at
    hours: float
    base: int  # index in BASE_BINS
    kind: str | None  # the last reminder's kind, None before the first
    since: int | None  # index in SINCE_BINS


def _bin(bins: Sequence[float], x: float) -> int:
    return max(0, bisect.bisect_right(bins, x) - 1)


def pieces(created_at: datetime, end: datetime, reminders: Sequence[tuple[datetime, str]],
           base_bins: Sequence[float] = BASE_BINS, since_bins: Sequence[float] = SINCE_BINS) -> list[Piece]:
    """Cut [created_at, end) wherever the baseline bin, the last reminder or its age bin changes."""
    total = (end - created_at).total_seconds() / 3600
    if total <= 0:
        return []
    sends = sorted(((at - created_at).total_seconds() / 3600, kind) for at, kind in reminders)
    sends = [(h, k) for h, k in sends if h < total]
    cuts = {0.0, total, *(b for b in base_bins if 0 < b < total)}
    for h, _ in sends:
        cuts.update(h + s for s in since_bins if 0 <= h + s < total)
    cuts_sorted = sorted(c for c in cuts if c >= 0)
    out = []
    times = [h for h, _ in sends]
    for a, b in zip(cuts_sorted, cuts_sorted[1:], strict=False):
        if b <= a:
            continue
        mid = (a + b) / 2
        i = bisect.bisect_right(times, mid) - 1
        if i >= 0:
            out.append(Piece(a, b - a, _bin(base_bins, mid), sends[i][1], _bin(since_bins, mid - sends[i][0])))
        else:
            out.append(Piece(a, b - a, _bin(base_bins, mid), None, None))
    return out


# -- the model -----------------------------------------------------------------------------------


@dataclass
class Model:
    """The fitted hazard: column names, estimates and their covariance."""

    columns: list[str]
    beta: np.ndarray
    cov: np.ndarray
    reference_segment: str
    base_bins: tuple[float, ...]
    since_bins: tuple[float, ...]
    transactions: int
    events: int
    hours: float
    kinds: dict[str, float]  # kind -> hours at risk after it, for substitutions
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.columns)}

    def draws(self, n: int, seed: int = 0) -> np.ndarray:
        """The estimates, then ``n - 1`` draws from their normal approximation."""
        rng = np.random.default_rng(seed)
        cov = (self.cov + self.cov.T) / 2
        extra = rng.multivariate_normal(self.beta, cov, size=max(0, n - 1), method="eigh")
        return np.vstack([self.beta[None, :], extra])

    def effects(self) -> list[dict[str, Any]]:
        """Each reminder kind's multiplier on the hazard, by hours since it was sent (for people)."""
        se = np.sqrt(np.clip(np.diag(self.cov), 0, None))
        out = []
        for c, i in self.index.items():
            if c.startswith("after "):
                kind, _, since = c[len("after "):].rpartition(" @")
                out.append({"kind": kind, "hours_since": since, "multiplier": math.exp(self.beta[i]),
                            "low": math.exp(self.beta[i] - Z95 * se[i]), "high": math.exp(self.beta[i] + Z95 * se[i])})
        return out


@functools.lru_cache(maxsize=4096)
def _since_label(bins: tuple[float, ...], i: int) -> str:
    lo = bins[i]
    return f"{lo:g}h+" if i == len(bins) - 1 else f"{lo:g}-{bins[i + 1]:g}h"


def _base_col(i: int) -> str:
    return f"base {i}"


@functools.lru_cache(maxsize=65536)
def _effect_col(kind: str, since: int, bins: tuple[float, ...]) -> str:
    return f"after {kind} @{_since_label(bins, since)}"


def _seg_col(segment: str) -> str:
    return f"segment {segment}"


def fit(recs: Sequence[Record], *, base_bins: Sequence[float] = BASE_BINS,
        since_bins: Sequence[float] = SINCE_BINS) -> Model:
    """The Poisson GLM on person-time; raises ValueError when there is nothing to fit."""
    from statsmodels.genmod.families import Poisson
    from statsmodels.genmod.generalized_linear_model import GLM

    cells: dict[tuple[int, str | None, int | None, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    kinds: dict[str, float] = defaultdict(float)
    segments: Counter[str] = Counter()
    events = 0
    for r in recs:
        segments[r.segment] += 1
        ps = pieces(r.created_at, r.end, [(m.at, m.kind) for m in r.reminders], base_bins, since_bins)
        for p in ps:
            cells[(p.base, p.kind, p.since, r.segment)][1] += p.hours
            if p.kind is not None:
                kinds[p.kind] += p.hours
        if r.confirmed_at is not None and ps:
            last = ps[-1]
            cells[(last.base, last.kind, last.since, r.segment)][0] += 1
            events += 1
    if not cells or events == 0:
        raise ValueError("nothing to fit: no settled transaction with a customer confirmation in the period")
    reference = segments.most_common(1)[0][0]
    columns: list[str] = []
    index: dict[str, int] = {}

    def col(name: str) -> int:
        if name not in index:
            index[name] = len(columns)
            columns.append(name)
        return index[name]

    rows: list[list[int]] = []
    y, exposure = [], []
    for (base, kind, since, segment), (k, hours) in sorted(cells.items(), key=lambda kv: str(kv[0])):
        if hours <= 0:
            continue
        cols = [col(_base_col(base))]
        if kind is not None:
            cols.append(col(_effect_col(kind, since, tuple(since_bins))))
        if segment != reference:
            cols.append(col(_seg_col(segment)))
        rows.append(cols)
        y.append(k)
        exposure.append(hours)
    total_hours = float(sum(exposure))
    crude = events / total_hours
    # one pseudo-observation per parameter: half a confirmation at the overall rate (baseline) or at no effect
    for name, j in list(index.items()):
        rows.append([j])
        y.append(0.5)
        exposure.append(0.5 / crude if name.startswith("base ") else 0.5)
    X = np.zeros((len(rows), len(columns)))
    for i, cols in enumerate(rows):
        X[i, cols] = 1.0
    try:
        result = GLM(np.asarray(y), X, family=Poisson(), offset=np.log(np.asarray(exposure))).fit()
    except (np.linalg.LinAlgError, FloatingPointError) as exc:
        raise ValueError(f"the model could not be fitted on this period: {exc}") from None
    return Model(columns=columns, beta=np.asarray(result.params), cov=np.asarray(result.cov_params()),
                 reference_segment=reference, base_bins=tuple(base_bins), since_bins=tuple(since_bins),
                 transactions=len(recs), events=events, hours=total_hours, kinds=dict(kinds))


# -- the replay ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """One reminder of the replay: when, which kind, on which channels (after the customer's contacts)."""

    at: datetime
    kind: str
    template: str
    channels: tuple[str, ...]


def plan(schedule: Schedule, rec: Record) -> tuple[datetime, list[Send]]:
    """The proposed ladder for one recorded transaction: (its deadline, the reminders in sending order)."""
    deadline = schedule.deadline(rec.created_at, rec.expires_at)
    out = []
    erased = bool(rec.customer.get("erased"))
    for slot in slots(schedule, rec.created_at, deadline, rec.zone):
        _, template = choose_variant(slot.step, rec.id)
        if erased:  # the contacts are gone: assume the step's own channels
            channels = slot.channels
        else:  # as the scheduler does: a fallback never takes a channel the step sends at another time
            chosen = choose(slot.channels, schedule.fallback_for(slot.step.id), rec.customer, set(),
                            taken=slot.step.channels)
            channels = tuple(c.channel for c in chosen if c.send)
        if channels:
            out.append(Send(slot.at, kind_of(template, channels), template, channels))
    return deadline, out


@dataclass
class _Batch:
    """Every replayed transaction's pieces as arrays, to integrate the hazard for many parameter draws."""

    n: int
    tx: np.ndarray  # piece -> transaction
    start: np.ndarray
    hours: np.ndarray
    design: Any  # scipy.sparse (pieces x parameters)
    end: np.ndarray  # per transaction: hours of follow-up
    sends: list[tuple[int, float, Send]]  # (transaction, hours since created, the send)
    send_from: np.ndarray  # per send: the transaction's first piece
    send_to: np.ndarray  # per send: the first piece at or after the send (pieces are cut at every send)


def _batch(model: Model, plans: Sequence[tuple[Record, datetime, list[Send]]], notes: set[str]) -> _Batch:
    from scipy import sparse

    tx_idx: list[int] = []
    starts: list[float] = []
    hours: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    sends: list[tuple[int, float, Send]] = []
    send_from: list[int] = []
    send_to: list[int] = []
    ends = []
    last_base = max((int(c.split()[1]) for c in model.columns if c.startswith("base ")), default=0)
    kind_map: dict[str, str | None] = {}
    cell_cols: dict[tuple[int, str | None, int | None, str], list[int]] = {}
    for i, (rec, deadline, planned) in enumerate(plans):
        end = min(deadline, rec.external_at) if rec.external_at else deadline
        ends.append(max(0.0, (end - rec.created_at).total_seconds() / 3600))
        first_piece = len(starts)
        ps = pieces(rec.created_at, end, [(s.at, s.kind) for s in planned], model.base_bins, model.since_bins)
        for p in ps:
            e = len(starts)
            tx_idx.append(i)
            starts.append(p.start)
            hours.append(p.hours)
            key = (p.base, p.kind, p.since, rec.segment)
            if key not in cell_cols:
                base = min(p.base, last_base)
                if p.base > last_base:
                    notes.add(f"hours past {model.base_bins[last_base]:g}h since creation were never at risk in "
                              f"the period: the last fitted baseline rate is used there")
                cell_cols[key] = [model.index[name] for name in
                                  _piece_columns(model, p, rec.segment, base, kind_map, notes)]
            for j in cell_cols[key]:
                rows.append(e)
                cols.append(j)
        piece_starts = starts[first_piece:]
        for s in planned:
            h = (s.at - rec.created_at).total_seconds() / 3600
            if h >= ends[-1]:
                continue
            sends.append((i, h, s))
            send_from.append(first_piece)
            send_to.append(first_piece + bisect.bisect_left(piece_starts, h - 1e-9))
    design = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(starts), len(model.columns)))
    return _Batch(len(plans), np.asarray(tx_idx, dtype=int), np.asarray(starts), np.asarray(hours), design,
                  np.asarray(ends), sends, np.asarray(send_from, dtype=int), np.asarray(send_to, dtype=int))


def _piece_columns(model: Model, p: Piece, segment: str, base: int, kind_map: dict[str, str | None],
                   notes: set[str]) -> list[str]:
    names = [_base_col(base)]
    if p.kind is not None:
        if p.kind not in kind_map:
            kind_map[p.kind] = _substitute(model, p.kind, notes)
        kind = kind_map[p.kind]
        if kind is not None:
            name = _effect_col(kind, p.since, model.since_bins)
            if name in model.index:
                names.append(name)
            else:  # later than it was ever observed: its effect stays at the latest one estimated
                known = [i for i in range(len(model.since_bins))
                         if _effect_col(kind, i, model.since_bins) in model.index]
                nearest = min(known, key=lambda i: (abs(i - p.since), -i)) if known else None
                if nearest is None:
                    notes.add(f"{kind}: never at risk after it in the period: no effect assumed")
                else:
                    names.append(_effect_col(kind, nearest, model.since_bins))
                    notes.add(f"{kind}: never at risk {_since_label(model.since_bins, p.since)} after it in the "
                              f"period: its effect at {_since_label(model.since_bins, nearest)} is used there")
    if segment != model.reference_segment:
        if _seg_col(segment) in model.index:
            names.append(_seg_col(segment))
        else:
            notes.add(f"segment {segment}: not in the period; taken as {model.reference_segment}")
    return names


def _substitute(model: Model, kind: str, notes: set[str]) -> str | None:
    """The recorded kind used for ``kind``: itself, else the same template on the most overlapping channels
    (then the most recorded), else None (no effect)."""
    if kind in model.kinds:
        return kind
    template, _, chans = kind.partition(":")
    mine = set(chans.split("+"))
    same = [k for k in model.kinds if k.partition(":")[0] == template]
    if same:
        best = max(same, key=lambda k: (len(mine & set(k.partition(":")[2].split("+"))), model.kinds[k]))
        notes.add(f"{kind} was never sent in the period: the effect of {best} is used")
        return best
    notes.add(f"{kind} was never sent in the period: no effect assumed (the hazard without a reminder)")
    return None


def _integrate(batch: _Batch, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per piece hazard rate, per transaction cumulative hazard at its end)."""
    rate = np.exp(batch.design @ beta)
    total = np.bincount(batch.tx, weights=rate * batch.hours, minlength=batch.n)
    return rate, total


def _median_hours(batch: _Batch, rate: np.ndarray, total: np.ndarray) -> float | None:
    """The median of the time to confirm among confirmations: the mixture of every transaction's
    distribution, F(t) = Σ (1 − e^(−H_i(t))) / Σ (1 − e^(−H_i(end_i))); bisection on t."""
    mass = float(np.sum(1 - np.exp(-total)))
    if mass <= 0:
        return None
    lo, hi = 0.0, float(batch.end.max())

    def share(t: float) -> float:
        h = np.bincount(batch.tx, weights=rate * np.clip(t - batch.start, 0, batch.hours), minlength=batch.n)
        return float(np.sum(1 - np.exp(-h))) / mass

    for _ in range(22):  # to a 2e-7 share of the longest follow-up (0.02 s in a day)
        mid = (lo + hi) / 2
        if share(mid) < 0.5:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _interval(values: np.ndarray) -> dict[str, float | None]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"low": None, "high": None}
    return {"low": float(np.quantile(values, 0.025)), "high": float(np.quantile(values, 0.975))}


def predict(model: Model, schedule: Schedule, recs: Sequence[Record], *, pricing: PricingLike | None = None,
            segments_per_sms: Mapping[tuple[str, str], float] | None = None, draws: int = DRAWS,
            seed: int = 0) -> dict[str, Any]:
    """What ``schedule`` would have done for ``recs``: expected figures with 95% intervals."""
    notes: set[str] = set()
    plans = [(r, *plan(schedule, r)) for r in recs]
    if not plans:
        raise ValueError("no settled transactions to replay in the period")
    batch = _batch(model, plans, notes)
    betas = model.draws(draws, seed)
    rates, medians, surv_sends = [], [], []
    n = batch.n
    for b, beta in enumerate(betas):
        rate, total = _integrate(batch, beta)
        rates.append(float(np.mean(1 - np.exp(-total))))
        if b <= min(MEDIAN_DRAWS, draws):
            m = _median_hours(batch, rate, total)
            medians.append(np.nan if m is None else m)
        if b == 0:
            cum = np.concatenate([[0.0], np.cumsum(rate * batch.hours)])
            surv_sends = np.exp(-(cum[batch.send_to] - cum[batch.send_from]))
            p_each = 1 - np.exp(-total)
    rates_a, medians_a = np.asarray(rates), np.asarray(medians)
    value = rates_a[0]
    binomial = float(np.sum(p_each * (1 - p_each))) / (n * n)
    predictive = np.clip(rates_a[1:] + np.random.default_rng(seed + 1).normal(0, math.sqrt(binomial),
                                                                                size=len(rates_a) - 1), 0, 1)
    # messages: expected when still pending at the send time
    messages: dict[str, float] = defaultdict(float)
    sms_segments = 0.0
    cost = Decimal(0) if pricing is not None else None
    seg_table = segments_per_sms or {}
    for (i, _h, s), alive in zip(batch.sends, surv_sends, strict=True):
        rec = plans[i][0]
        for channel in s.channels:
            messages[channel] += float(alive)
            segs = 1
            if channel == "sms":
                per = seg_table.get((s.template, rec.locale), seg_table.get((s.template, ""), None))
                if per is None:
                    notes.add(f"{s.template}: no SMS of it sent in the period: 1 segment per SMS assumed")
                    per = 1.0
                sms_segments += float(alive) * per
                segs = max(1, round(per))
            if cost is not None:
                cost += pricing.cost(channel, segments=segs, phone=rec.customer.get("phone") or None) * Decimal(
                    repr(float(alive)))
    median_value = None if np.isnan(medians_a[0]) else float(medians_a[0]) * 3600
    med_iv = _interval(medians_a[1:] * 3600)
    return {
        "transactions": n,
        "confirmation_rate": {"value": float(value), **_interval(rates_a[1:])},
        "prediction": {"value": float(value), **_interval(predictive)},
        "median_time_to_confirm_seconds": {"value": median_value, **med_iv},
        "messages": {c: round(messages[c], 1) for c in sorted(messages, key=_channel_key)},
        "sms_segments": round(sms_segments, 1),
        "cost": None if cost is None else str(cost.quantize(Decimal("0.01"))),
        "notes": sorted(notes),
    }


def segment_table(recs: Sequence[Record]) -> dict[tuple[str, str], float]:
    """Recorded SMS segments per message: by (template, locale), and by (template, '') over every locale."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in recs:
        for d in r.sent:
            if d["channel"] != "sms" or d.get("segments") is None:
                continue
            template = d["template"] or d["step"]
            for key in ((template, r.locale), (template, "")):
                sums[key][0] += d["segments"]
                sums[key][1] += 1
    return {k: s / n for k, (s, n) in sums.items() if n}


def actual(recs: Sequence[Record], pricing: PricingLike | None = None) -> dict[str, Any]:
    """What the schedule that ran did for ``recs``: reminders that went out, customer confirmations."""
    messages: Counter[str] = Counter()
    segments = 0
    cost = Decimal(0) if pricing is not None else None
    for r in recs:
        for d in r.sent:
            messages[d["channel"]] += 1
            if d["channel"] == "sms":
                segments += d.get("segments") or 0
            if cost is not None:
                cost += pricing.cost(d["channel"], segments=max(1, d.get("segments") or 1),
                                     phone=r.customer.get("phone") or None)
    times = [(r.confirmed_at - r.created_at).total_seconds() for r in recs if r.confirmed_at is not None]
    k = len(times)
    return {
        "transactions": len(recs),
        "confirmed_by_customer": k,
        "confirmation_rate": wilson(k, len(recs)),
        "median_time_to_confirm_seconds": statistics.median(times) if times else None,
        "messages": {c: messages[c] for c in sorted(messages, key=_channel_key)},
        "sms_segments": segments,
        "cost": None if cost is None else str(cost.quantize(Decimal("0.01"))),
    }


# -- the whole what-if ---------------------------------------------------------------------------


def whatif(proposed: Schedule, recs: Sequence[Record], *, schedule: str, pricing: PricingLike | None = None,
           draws: int = DRAWS, seed: int = 0) -> dict[str, Any]:
    """Fit on every record, replay ``schedule``'s records under ``proposed``; beside their actual figures."""
    mine = [r for r in recs if r.schedule == schedule]
    if not mine:
        raise ValueError(f"no settled transactions of schedule {schedule!r} in the period")
    model = fit(recs)
    figures = predict(model, proposed, mine, pricing=pricing, segments_per_sms=segment_table(recs), draws=draws,
                      seed=seed)
    return {
        "schedule": schedule, "proposed": {"name": proposed.name, "version": proposed.version,
                                           "source": proposed.source},
        "transactions": len(mine), "currency": pricing.currency if pricing is not None else None,
        "current": actual(mine, pricing), "whatif": figures, "model": _model_info(model, draws),
        "assumptions": list(ASSUMPTIONS),
    }


def backtest(current: Schedule, recs: Sequence[Record], *, schedule: str, draws: int = DRAWS,
             seed: int = 0) -> dict[str, Any]:
    """Fit on the first half of the period (by created_at), predict the second half of ``schedule`` under
    ``current`` (the schedule that ran), and compare with what happened."""
    if len(recs) < 4:
        raise ValueError("too few settled transactions in the period to split it in two")
    ordered = sorted(recs, key=lambda r: r.created_at)
    first, last = ordered[0].created_at, ordered[-1].created_at
    middle = first + (last - first) / 2
    train = [r for r in ordered if r.created_at < middle]
    test = [r for r in ordered if r.created_at >= middle and r.schedule == schedule]
    if not train or not test:
        raise ValueError(f"no settled transactions of schedule {schedule!r} in one half of the period")
    model = fit(train)
    figures = predict(model, current, test, segments_per_sms=segment_table(train), draws=draws, seed=seed)
    seen = actual(test)
    observed = seen["confirmation_rate"]["value"]
    pred = figures["prediction"]
    return {
        "fitted_on": {"from": _iso(first), "to": _iso(middle), "transactions": len(train)},
        "predicted": {"from": _iso(middle), "to": _iso(last), "transactions": len(test)},
        "predicted_rate": figures["confirmation_rate"], "prediction_interval": pred,
        "actual_rate": seen["confirmation_rate"],
        "error": figures["confirmation_rate"]["value"] - observed,
        "within_interval": pred["low"] <= observed <= pred["high"],
        "predicted_median_seconds": figures["median_time_to_confirm_seconds"],
        "actual_median_seconds": seen["median_time_to_confirm_seconds"],
        "predicted_messages": figures["messages"], "actual_messages": seen["messages"],
        "notes": figures["notes"],
    }


def _model_info(model: Model, draws: int) -> dict[str, Any]:
    return {"transactions": model.transactions, "customer_confirmations": model.events,
            "hours_at_risk": round(model.hours, 1), "parameters": len(model.columns),
            "reference_segment": model.reference_segment,
            "baseline_bins_hours": list(model.base_bins), "effect_bins_hours": list(model.since_bins),
            "interval": f"95%, {draws} draws from the normal approximation of the Poisson GLM fit (estimates and "
                        f"covariance): a parametric bootstrap",
            "effects": model.effects()}


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


# -- text ----------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    from .ladder import format_duration

    return format_duration(timedelta(seconds=round(seconds / 60) * 60)) if seconds >= 60 else f"{round(seconds)}s"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, current actual, proposed expected [95% interval]) as text, for the CLI and /ops/whatif."""
    cur, new = result["current"], result["whatif"]
    rows: list[tuple[str, str, str]] = []
    rate, exp = cur["confirmation_rate"], new["confirmation_rate"]
    rows.append(("customer confirmation rate", f"{_pct(rate['value'])} [{_pct(rate['low'])}-{_pct(rate['high'])}]",
                 f"{_pct(exp['value'])} [{_pct(exp['low'])}-{_pct(exp['high'])}]"))
    med = new["median_time_to_confirm_seconds"]
    rows.append(("median time to confirm", _dur(cur["median_time_to_confirm_seconds"]),
                 f"{_dur(med['value'])} [{_dur(med['low'])}-{_dur(med['high'])}]"))
    for c in sorted(set(cur["messages"]) | set(new["messages"]), key=_channel_key):
        rows.append((f"{c} messages", str(cur["messages"].get(c, 0)), f"{new['messages'].get(c, 0):.1f}"))
    rows.append(("sms segments", str(cur["sms_segments"]), f"{new['sms_segments']:.1f}"))
    currency = result.get("currency") or ""
    rows.append((f"cost {currency}".strip(), cur["cost"] or "- (no pricing)", new["cost"] or "- (no pricing)"))
    return rows


def to_text(result: dict[str, Any]) -> str:
    new, prop = result["whatif"], result["proposed"]
    rows = table_rows(result)
    head = (f"what-if: {prop['name']} ({prop['source'] or 'proposed'}, version {prop['version']}) on the "
            f"{result['transactions']} settled transactions of schedule {result['schedule']}"
            + (f" since {result['since']}" if result.get("since") else ""))
    width = max(len(r[0]) for r in rows) + 2
    lines = [head, "", f"  {'':<{width}}{'current (actual)':<26}proposed (expected) [95% interval]"]
    lines += [f"  {a:<{width}}{b:<26}{c}" for a, b, c in rows]
    m = result["model"]
    lines += ["", f"model: piecewise-constant hazard of a customer confirmation, Poisson GLM on "
                  f"{m['transactions']} settled transactions ({m['customer_confirmations']} customer "
                  f"confirmations, {m['hours_at_risk']:g} hours at risk, {m['parameters']} parameters); "
                  f"intervals: {m['interval']}"]
    if new["notes"]:
        lines += ["notes:"] + [f"  - {n}" for n in new["notes"]]
    lines += ["assumptions:"] + [f"  - {a}" for a in result["assumptions"]]
    if result.get("backtest"):
        lines += ["", backtest_text(result["backtest"])]
    return "\n".join(lines)


def backtest_text(bt: dict[str, Any]) -> str:
    p, pi, a = bt["predicted_rate"], bt["prediction_interval"], bt["actual_rate"]
    verdict = "within" if bt["within_interval"] else "OUTSIDE"
    return "\n".join([
        f"backtest: fitted on {bt['fitted_on']['transactions']} transactions created {bt['fitted_on']['from']} to "
        f"{bt['fitted_on']['to']}; predicted the {bt['predicted']['transactions']} of the second half under the "
        f"schedule that ran",
        f"  predicted rate {_pct(p['value'])} [{_pct(p['low'])}-{_pct(p['high'])}], for the observed rate "
        f"[{_pct(pi['low'])}-{_pct(pi['high'])}]; actual {_pct(a['value'])}: error {bt['error'] * 100:+.1f} "
        f"points, {verdict} the interval",
        f"  median time to confirm: predicted {_dur(bt['predicted_median_seconds']['value'])}, actual "
        f"{_dur(bt['actual_median_seconds'])}",
    ])
