"""A synthetic history from a known confirmation hazard, for the what-if tests: ladder A ran for a month
(real planner: quiet hours in three zones, fallback for missing contacts), customers confirmed at the
times a known piecewise-constant hazard gave them, a few were cancelled by the platform. Written into a
real store; ``true_rate`` integrates the same hazard under any other ladder for the same transactions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
from sqlalchemy import insert
from support import T0

from worker.contacts import choose
from worker.ladder import Schedule, choose_variant, load_file, slots
from worker.store import Store
from worker.store.tables import deliveries, transactions

LADDER_A = """\
name: standard
match: {}
priority: 100
quiet_hours: {start: "22:00", end: "08:00", channels: [sms, push]}
steps:
  - {after: 15m, channels: [push], template: nudge}
  - {after: 2h, channels: [sms, push], template: reminder}
  - {after: 20h, channels: [sms, email, push], template: final_warning}
cancel: {after: 24h, template: cancelled, reason: not_confirmed, channels: [sms, email, push]}
"""

#: A different ladder: everything earlier, the final warning at 8h.
LADDER_B = """\
name: standard
match: {}
priority: 100
quiet_hours: {start: "22:00", end: "08:00", channels: [sms, push]}
steps:
  - {after: 5m, channels: [push], template: nudge}
  - {after: 1h, channels: [sms, push], template: reminder}
  - {after: 8h, channels: [sms, email, push], template: final_warning}
cancel: {after: 24h, template: cancelled, reason: not_confirmed, channels: [sms, email, push]}
"""

#: The true hazard (per hour). Baseline by hours since created_at: (from, rate).
BASE = ((0, 0.10), (0.25, 0.08), (0.5, 0.06), (1, 0.05), (2, 0.04), (3, 0.03), (4, 0.025), (6, 0.02), (8, 0.015),
        (12, 0.01), (16, 0.008), (20, 0.006))
SINCE = (0, 0.5, 2, 6)
#: Multipliers by hours since the last reminder (bins SINCE), per kind.
EFFECT = {
    "nudge:push": (3.0, 1.8, 1.2, 1.0),
    "reminder:sms+push": (5.0, 2.5, 1.4, 1.1),
    "reminder:email+push": (3.0, 1.6, 1.2, 1.0),
    "final_warning:sms+email+push": (6.0, 3.0, 1.5, 1.2),
}
SEGMENT = {"new": 1.3, "returning": 1.0}
ZONES = ("Asia/Shanghai", "Europe/London", "America/New_York")
SEGMENTS_PER_SMS = {"nudge": 1, "reminder": 2, "final_warning": 3}
STEP = 1 / 60  # the grid the truth is integrated on: one minute


def schedule(tmp: Path, text: str, name: str = "ladder.yaml") -> Schedule:
    path = tmp / name
    path.write_text(text)
    return load_file(path)


def hazard_grid(created: datetime, end_hours: float, sends: list[tuple[datetime, str]], segment: str) -> np.ndarray:
    """The true hazard on each minute of [0, end_hours), at the middle of the minute."""
    t = np.arange(0, end_hours, STEP) + STEP / 2
    base_from = np.array([b for b, _ in BASE])
    h = np.array([r for _, r in BASE])[np.searchsorted(base_from, t, side="right") - 1]
    mult = np.ones_like(t)
    for at, kind in sorted(sends):
        s = (at - created).total_seconds() / 3600
        after = t >= s
        since = np.searchsorted(np.array(SINCE), t - s, side="right") - 1
        effect = np.array(EFFECT.get(kind, (1.0,) * len(SINCE)))[np.clip(since, 0, len(SINCE) - 1)]
        mult = np.where(after, effect, mult)  # later sends override earlier ones: the last reminder counts
    return h * mult * SEGMENT[segment]


def sends_of(sched: Schedule, tx_id: str, created: datetime, deadline: datetime, zone: str,
             customer: dict) -> list[tuple[datetime, str, str, tuple[str, ...]]]:
    out = []
    for slot in slots(sched, created, deadline, zone):
        _, template = choose_variant(slot.step, tx_id)
        chosen = choose(slot.channels, sched.fallback_for(slot.step.id), customer, set(), taken=slot.step.channels)
        channels = tuple(c.channel for c in chosen if c.send)
        if channels:
            kind = f"{template}:{'+'.join(sorted(channels, key=('sms', 'email', 'push').index))}"
            out.append((slot.at, kind, template, channels))
    return out


@dataclass
class Synthetic:
    """What was generated: each transaction's inputs, to compute the truth under another ladder."""

    rows: list[dict]  # id, created, zone, segment, customer, external (latent platform cancel, hours or None)
    start: datetime
    end: datetime

    def true_rate(self, sched: Schedule, *, ids: set[str] | None = None) -> float:
        """The expected share confirmed by the customer under ``sched``: the true hazard, integrated."""
        ps = []
        for r in self.rows:
            if ids is not None and r["id"] not in ids:
                continue
            deadline = sched.deadline(r["created"], None)
            end_h = (deadline - r["created"]).total_seconds() / 3600
            if r["external"] is not None:
                end_h = min(end_h, r["external"])
            sends = [(at, kind) for at, kind, _, _ in sends_of(sched, r["id"], r["created"], deadline, r["zone"],
                                                                r["customer"])]
            ps.append(1 - math.exp(-float(np.sum(hazard_grid(r["created"], end_h, sends, r["segment"]))) * STEP))
        return float(np.mean(ps))


def generate(store: Store, sched: Schedule, *, n: int = 2000, seed: int = 7, days: int = 30,
             end: datetime = T0 - timedelta(days=2), external_share: float = 0.03) -> Synthetic:
    """Run ``sched`` on ``n`` transactions created over ``days`` days before ``end``; write them to ``store``."""
    rng = np.random.default_rng(seed)
    start = end - timedelta(days=days)
    tx_rows, dl_rows, kept = [], [], []
    for i in range(n):
        tx_id = f"syn_{i:05d}"
        created = start + timedelta(seconds=int(rng.integers(0, days * 86400)))
        zone = ZONES[int(rng.integers(0, len(ZONES)))]
        segment = "new" if rng.random() < 0.4 else "returning"
        customer = {"id": f"c_{i}", "name": "Test", "timezone": zone, "segment": segment, "locale": "en"}
        if rng.random() < 0.9:
            customer["phone"] = "+447700900123"
        if rng.random() < 0.8:
            customer["email"] = f"c{i}@example.com"
        if rng.random() < 0.85:
            customer["push_tokens"] = ["tok"]
        external = float(rng.uniform(0, 24)) if rng.random() < external_share else None
        deadline = sched.deadline(created, None)
        planned = sends_of(sched, tx_id, created, deadline, zone, customer)
        end_h = 24.0 if external is None else min(24.0, external)
        h = hazard_grid(created, end_h, [(at, kind) for at, kind, _, _ in planned], segment)
        cum = np.cumsum(h) * STEP
        hit = int(np.searchsorted(cum, rng.exponential()))
        row = {"id": tx_id, "status": "cancelled", "content": {"id": tx_id, "customer": customer},
               "customer_id": customer["id"], "segment": segment, "risk_flag": False, "amount": Decimal("100.00"),
               "currency": "GBP", "schedule": sched.name, "schedule_version": sched.version, "created_at": created,
               "expires_at": None, "deadline": deadline, "registered_at": created, "confirmed_at": None,
               "cancelled_at": None, "settled_source": None}
        if hit < len(cum):
            settled = created + timedelta(hours=(hit + 0.5) * STEP)
            row.update(status="confirmed", confirmed_at=settled, settled_source="customer")
        elif external is not None:
            settled = created + timedelta(hours=external)
            row.update(cancelled_at=settled, settled_source="platform")
        else:
            settled = deadline
            row.update(cancelled_at=deadline, settled_source="deadline")
        for at, _kind, template, channels in planned:
            if at >= settled:
                break
            for channel in channels:
                dl_rows.append({"transaction_id": tx_id, "step": template, "kind": "reminder", "channel": channel,
                                "template": template, "variant": "default", "due_at": at, "status": "sent",
                                "attempts": 1, "sent_at": at + timedelta(seconds=2), "updated_at": at,
                                "segments": SEGMENTS_PER_SMS[template] if channel == "sms" else None})
        tx_rows.append(row)
        kept.append({"id": tx_id, "created": created, "zone": zone, "segment": segment, "customer": customer,
                     "external": external})
    with store.engine.begin() as conn:
        conn.execute(insert(transactions), tx_rows)
        if dl_rows:
            conn.execute(insert(deliveries), dl_rows)
    return Synthetic(kept, start, end)
