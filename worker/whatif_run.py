"""The what-if's glue for `remind schedules whatif` and /ops/whatif: read the period from the store, load
the proposed file with the same loader as `remind schedules check`, run worker.whatif, and where the
pricing comes from."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import whatif as whatif_model
from .ladder import Schedule, load_file
from .pricing import load_pricing
from .stats import parse_since
from .store import history_rows
from .whatif import PricingLike, backtest, records, whatif

if TYPE_CHECKING:
    from .service import Remind


def load_proposed(path: Path, remind: Remind) -> Schedule:
    """The proposed schedule file, validated like `remind schedules check` (same loader, same template
    check); raises ConfigError naming file, line and field."""
    return load_file(path, remind.templates.missing)


def pricing_for(remind: Remind) -> PricingLike | None:
    """The price table at REMIND_PRICING_FILE (validated as the service loads it; an invalid one is a
    ConfigError naming file, line and field); None without one: costs are then reported as null."""
    pricing = load_pricing(remind.settings.pricing_file)
    return pricing if pricing.available else None


def run(remind: Remind, proposed: Schedule, *, since: str | datetime | None = "30d", schedule: str | None = None,
        with_backtest: bool = False, pricing: PricingLike | None = None, draws: int | None = None,
        now: datetime | None = None) -> dict[str, Any]:
    """The what-if of ``proposed`` on the settled transactions of ``schedule`` (default: the proposed
    schedule's name) created since ``since``. Raises ValueError for a ``since`` it cannot read, or a period
    with nothing to fit or replay."""
    now = now or remind.store.clock()
    draws = draws or whatif_model.DRAWS
    start = parse_since(since, now) if isinstance(since, str) else since
    name = schedule or proposed.name
    txs, dls = history_rows(remind.store, start, now)
    recs = records(txs, dls, now)
    if not any(r.schedule == name for r in recs):
        known = sorted({r.schedule for r in recs})
        raise ValueError(f"no settled transactions of schedule {name!r} in the period"
                         + (f"; recorded schedules: {', '.join(known)} (choose one with --schedule)" if known else ""))
    result = whatif(proposed, recs, schedule=name, pricing=pricing, draws=draws)
    result["since"] = start.isoformat().replace("+00:00", "Z") if start else None
    result["until"] = now.isoformat().replace("+00:00", "Z")
    if with_backtest:
        current = remind.registry.get(name)
        if current is None:
            raise ValueError(f"the backtest replays the schedule that ran, {name!r}, which is not loaded now")
        result["backtest"] = backtest(current, [r for r in recs], schedule=name, draws=draws)
    return result
