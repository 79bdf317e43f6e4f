"""What the reminders cost, and the stats export: one flat row per (schedule, step, variant, segment).

Costs come from ``pricing.yaml`` (worker/pricing.py) applied to every customer message the provider
accepted (``sent_at`` set, so also one the carrier later reported undelivered: it is billed all the
same): an SMS costs its recorded segments (1 when none was recorded) × the price for its destination's
calling code (recorded at send time; for older rows read from the transaction's phone; else the
``default``), an email or a push its price per message. Without a price table every cost is None.

- ``cost_report(store, pricing, ...)``: cost per (schedule, step, variant) of the reminders, per
  transaction (reminders and notices), and per schedule with the cost per *customer* confirmation
  (``transactions.settled_source = 'customer'``: an ops approval or a platform call is not one).
- ``cost_totals(store, pricing, ...)``: the same per step and per schedule (with the cost per transaction),
  from figures the database aggregates: what ``/v1/stats``, ``/ops`` and ``remind stats`` show.
- ``export(store, pricing, ...)``: the rows of ``remind stats --format csv|json`` and
  ``GET /v1/stats.csv``; ``to_csv`` writes them. Definitions: docs/stats.md, "Cost" and "Export".
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from .pricing import Pricing
from .stats import parse_since, wilson
from .store import Store
from .store.export import cost_figures, export_rows

#: Cost per confirmation is rounded to this (costs themselves are exact sums of the table's prices).
PER_CONFIRMATION = Decimal("0.000001")
CHANNELS = ("sms", "email", "push")
#: The CSV's columns, in order (docs/stats.md, "Export").
COLUMNS = ("schedule", "step", "variant", "segment", "reached", "confirmed_after", "confirmation_rate",
           "rate_low", "rate_high", "messages_sms", "messages_email", "messages_push", "sms_segments",
           "currency", "cost", "cost_per_confirmation")


def group_cost(pricing: Pricing, group: dict[str, Any], phone: str | None = None) -> Decimal | None:
    """The cost of one group of messages (``channel``, ``messages``, ``billed_segments``,
    ``country_code``), or None without a price table. ``phone``: where an SMS went when the row has
    no calling code (older rows)."""
    if not pricing.available:
        return None
    if group["channel"] == "sms":
        return pricing.cost("sms", segments=group["billed_segments"], phone=phone,
                            country_code=group.get("country_code"))
    return pricing.cost(group["channel"]) * group["messages"]


def per_confirmation(cost: Decimal | None, confirmations: int) -> Decimal | None:
    """Cost per confirmation (or per transaction: any count), rounded to 6 places; None for 0 or no cost."""
    if cost is None or confirmations <= 0:
        return None
    return (cost / confirmations).quantize(PER_CONFIRMATION, rounding=ROUND_HALF_EVEN)


@dataclass
class CostReport:
    """Costs in ``currency`` (None: no price table, every cost None)."""

    currency: str | None
    #: (schedule, step, variant) -> cost of the reminders of that step and variant.
    by_step: dict[tuple[str, str, str], Decimal | None] = field(default_factory=dict)
    #: transaction id -> cost of every message to its customer (reminders and notices); 0 when none.
    by_transaction: dict[str, Decimal | None] = field(default_factory=dict)
    #: schedule -> {transactions, customer_confirmations, cost, cost_per_customer_confirmation}.
    by_schedule: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (schedule, step, variant) -> customer confirmations attributed to it (``cost_totals`` only).
    customer_confirmations: dict[tuple[str, str, str], int] = field(default_factory=dict)


def _add(total: Decimal | None, cost: Decimal | None) -> Decimal | None:
    return None if cost is None else (total or Decimal(0)) + cost


def cost_report(store: Store, pricing: Pricing, *, since: datetime | None = None, until: datetime | None = None,
                schedule: str | None = None) -> CostReport:
    """Costs of the transactions created in [since, until) (on ``schedule``): see CostReport."""
    txs, groups, phones = export_rows(store, since=since, until=until, schedule=schedule)
    return _report(pricing, txs, groups, phones)


def cost_totals(store: Store, pricing: Pricing, *, since: datetime | None = None,
                schedule: str | None = None) -> CostReport:
    """``cost_report``'s ``by_step`` and ``by_schedule`` (plus ``cost_per_transaction``), and the customer
    confirmations per step, from figures the database aggregates (worker.store.export.cost_figures): its
    memory does not grow with the window, so ``/v1/stats`` and ``/ops`` can show it. ``by_transaction`` is
    left empty. Without a price table the messages are not read (every cost is null)."""
    totals, groups, attributed = cost_figures(store, since=since, schedule=schedule, priced=pricing.available)
    zero = Decimal(0) if pricing.available else None
    report = CostReport(pricing.currency if pricing.available else None)
    report.customer_confirmations = {(r["schedule"], r["step"], r["variant"]): r["customer_confirmations"]
                                     for r in attributed}
    cost_of: dict[str, Decimal | None] = defaultdict(lambda: zero)
    for g in groups:
        cost = group_cost(pricing, g, g["phone"])
        cost_of[g["schedule"]] = _add(cost_of[g["schedule"]], cost)
        if g["kind"] == "reminder":
            key = (g["schedule"], g["step"], g["variant"])
            report.by_step[key] = _add(report.by_step.get(key, zero), cost)
    for s in totals:
        cost = cost_of[s["schedule"]]
        report.by_schedule[s["schedule"]] = {
            "schedule": s["schedule"], "transactions": int(s["transactions"]),
            "customer_confirmations": s["customer_confirmations"], "cost": cost,
            "cost_per_transaction": per_confirmation(cost, int(s["transactions"])),
            "cost_per_customer_confirmation": per_confirmation(cost, s["customer_confirmations"])}
    return report


def _report(pricing: Pricing, txs: list[dict[str, Any]], groups: list[dict[str, Any]],
            phones: dict[str, str | None]) -> CostReport:
    zero = Decimal(0) if pricing.available else None
    report = CostReport(pricing.currency if pricing.available else None)
    schedule_of = {tx["id"]: tx["schedule"] for tx in txs}
    report.by_transaction = {tx["id"]: zero for tx in txs}
    for g in groups:
        cost = group_cost(pricing, g, phones.get(g["transaction_id"]))
        tx_id = g["transaction_id"]
        report.by_transaction[tx_id] = _add(report.by_transaction[tx_id], cost)
        if g["kind"] == "reminder":
            key = (schedule_of[tx_id], g["step"], g["variant"])
            report.by_step[key] = _add(report.by_step.get(key, zero), cost)
    for tx in txs:
        s = report.by_schedule.setdefault(tx["schedule"], {"schedule": tx["schedule"], "transactions": 0,
                                                           "customer_confirmations": 0, "cost": zero})
        s["transactions"] += 1
        s["customer_confirmations"] += _customer_confirmed(tx)
        s["cost"] = _add(s["cost"], report.by_transaction[tx["id"]])
    for s in report.by_schedule.values():
        s["cost_per_customer_confirmation"] = per_confirmation(s["cost"], s["customer_confirmations"])
    return report


def _customer_confirmed(tx: dict[str, Any]) -> bool:
    return tx["status"] == "confirmed" and tx["settled_source"] == "customer" and tx["confirmed_at"] is not None


@dataclass
class _Row:
    schedule: str
    step: str
    variant: str
    segment: str | None
    reached: int = 0
    confirmed_after: int = 0
    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    sms_segments: int | None = None
    cost: Decimal | None = None


def export(store: Store, pricing: Pricing, *, since: str | datetime | None = None, until: datetime | None = None,
           schedule: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The export as JSON-ready data: ``rows`` (one per schedule, step, variant and customer segment, in
    ladder order) and ``schedules`` (totals with the cost per customer confirmation). Raises ValueError
    for a ``since`` it cannot read."""
    now = now or store.clock()
    start = parse_since(since, now) if isinstance(since, str) else since
    txs, groups, phones = export_rows(store, since=start, until=until, schedule=schedule)
    report = _report(pricing, txs, groups, phones)
    zero = Decimal(0) if pricing.available else None
    by_id = {tx["id"]: tx for tx in txs}
    rows: dict[tuple[str, str, str, str | None], _Row] = {}
    units: dict[str, dict[tuple[str, str], datetime]] = defaultdict(dict)  # tx -> (step, variant) -> first sent
    offsets: dict[tuple[str, str], float] = {}  # (schedule, step) -> earliest offset from created_at
    for g in groups:
        if g["kind"] != "reminder":
            continue
        tx = by_id[g["transaction_id"]]
        key = (tx["schedule"], g["step"], g["variant"], tx["segment"])
        row = rows.setdefault(key, _Row(*key, cost=zero))
        row.messages[g["channel"]] = row.messages.get(g["channel"], 0) + g["messages"]
        if g["channel"] == "sms" and g["segments"] is not None:
            row.sms_segments = (row.sms_segments or 0) + int(g["segments"])
        row.cost = _add(row.cost, group_cost(pricing, g, phones.get(tx["id"])))
        if g["first_sent"] is not None:
            mine = units[tx["id"]]
            unit = (g["step"], g["variant"])
            mine[unit] = min(mine.get(unit, g["first_sent"]), g["first_sent"])
            offset = (g["first_sent"] - tx["created_at"]).total_seconds()
            offsets[(tx["schedule"], g["step"])] = min(offsets.get((tx["schedule"], g["step"]), offset), offset)
    for tx_id, mine in units.items():
        tx = by_id[tx_id]
        for step, variant in mine:
            rows[(tx["schedule"], step, variant, tx["segment"])].reached += 1
        if _customer_confirmed(tx):
            before = sorted((sent, unit) for unit, sent in mine.items() if sent <= tx["confirmed_at"])
            if before:
                step, variant = before[-1][1]
                rows[(tx["schedule"], step, variant, tx["segment"])].confirmed_after += 1
    ordered = sorted(rows.values(), key=lambda r: (
        r.schedule, offsets.get((r.schedule, r.step), float("inf")), r.step, r.variant, r.segment or ""))
    return {
        "generated_at": _iso(now), "since": _iso(start), "until": _iso(until), "schedule": schedule,
        "currency": report.currency,
        "rows": [_row_json(r, report.currency) for r in ordered],
        "schedules": [{**s, "cost": _money(s["cost"]),
                       "cost_per_customer_confirmation": _money(s["cost_per_customer_confirmation"])}
                      for _, s in sorted(report.by_schedule.items())],
    }


def _row_json(row: _Row, currency: str | None) -> dict[str, Any]:
    rate = wilson(row.confirmed_after, row.reached)
    return {
        "schedule": row.schedule, "step": row.step, "variant": row.variant, "segment": row.segment,
        "reached": row.reached, "confirmed_after": row.confirmed_after,
        "confirmation_rate": _round(rate["value"]), "rate_low": _round(rate["low"]), "rate_high": _round(rate["high"]),
        **{f"messages_{c}": row.messages.get(c, 0) for c in CHANNELS},
        "sms_segments": row.sms_segments, "currency": currency, "cost": _money(row.cost),
        "cost_per_confirmation": _money(per_confirmation(row.cost, row.confirmed_after)),
    }


def to_csv(data: dict[str, Any]) -> str:
    """The export's rows as CSV (RFC 4180, a header line, CRLF); an empty field is a null."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for row in data["rows"]:
        writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
    return out.getvalue()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
