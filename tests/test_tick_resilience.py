"""One transaction the tick cannot plan or write never stops the tick for the others; the tick goes on
batch after batch until nothing due is left."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from support import T0, transaction

from worker.ingest import parse_transaction
from worker.ladder import Match, Registry, Variant
from worker.scheduler import RETRY_BROKEN
from worker.store import NewTransaction


def insert_raw(store, tx_id: str, *, schedule: str = "default", **customer) -> None:
    """A transaction written through the store, past the checks of register(): what a bug, an old
    release or a schedule edited before its names were checked could leave behind."""
    tx = parse_transaction(transaction(tx_id), now=T0)
    content = tx.canonical()
    content["customer"].update(customer)
    store.insert_transaction(NewTransaction(
        id=tx.id, content=content, customer_id=tx.customer.id, segment=tx.customer.segment,
        risk_flag=tx.risk_flag, amount=tx.amount, currency=tx.currency, schedule=schedule,
        schedule_version="old", created_at=T0, expires_at=None, deadline=T0 + timedelta(hours=24),
        next_due_at=T0 + timedelta(minutes=15)))


def nudged(h) -> list[str]:
    return sorted(line["transaction_id"] for line in h.lines() if line["step"] == "nudge")


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
def test_a_row_postgresql_refuses_is_set_aside_and_the_others_get_their_reminders(make_harness, caplog):
    """The crafted schedule names a variant of 39 characters (deliveries.variant holds 32): the loader
    refuses that now, but a row the store cannot write must still cost only its own transaction."""
    h = make_harness()
    default = h.remind.registry.get("default")
    nudge = replace(default.steps[0], variants=(Variant("a_variant_named_with_39_characters_long", "nudge", 1),))
    broken = replace(default, name="broken", match=Match(segments=("nobody",)), priority=999,
                     steps=(nudge, *default.steps[1:]))
    crafted = Registry([*h.remind.registry, broken])
    h.remind.scheduler.registry = lambda: crafted
    for i in range(3):
        h.remind.register(transaction(f"tx_{i}"))
    insert_raw(h.remind.store, "tx_bad", schedule="broken")
    h.at(minutes=16)
    result = h.tick()
    assert nudged(h) == ["tx_0", "tx_1", "tx_2"]  # the others got their reminders
    assert result.claimed == 4 and len(result.enqueued) == 3
    bad = h.remind.store.get_transaction("tx_bad")
    assert bad["status"] == "pending" and bad["handled_until"] is None
    assert bad["next_due_at"] == T0 + timedelta(minutes=16) + RETRY_BROKEN  # looked at again later
    assert h.remind.store.deliveries_of("tx_bad") == []  # nothing half-written
    assert "tx_bad: cannot be written" in caplog.text
    # the next ticks go on for everyone else
    h.at(minutes=121).tick()
    assert sorted(line["transaction_id"] for line in h.lines() if line["step"] == "reminder") == [
        "tx_0", "tx_0", "tx_1", "tx_1", "tx_2", "tx_2"]


def test_a_transaction_that_cannot_be_planned_is_set_aside_and_the_others_go_on(make_harness, caplog):
    h = make_harness()
    for i in range(3):
        h.remind.register(transaction(f"tx_{i}"))
    insert_raw(h.remind.store, "tx_bad", timezone="Mars/Olympus_Mons")  # no such zone: planning raises
    h.at(minutes=16)
    result = h.tick()
    assert nudged(h) == ["tx_0", "tx_1", "tx_2"]
    assert result.claimed == 4
    bad = h.remind.store.get_transaction("tx_bad")
    assert bad["status"] == "pending" and bad["next_due_at"] == T0 + timedelta(minutes=16) + RETRY_BROKEN
    assert h.remind.store.deliveries_of("tx_bad") == []
    assert "tx_bad: cannot plan" in caplog.text
    assert h.at(minutes=17).tick().claimed == 0  # set aside: not planned again on every tick


def test_one_tick_claims_batch_after_batch_until_nothing_is_due(make_harness):
    h = make_harness(batch_size=3)
    ids = [f"tx_{i:02}" for i in range(10)]
    for tx_id in ids:
        h.remind.register(transaction(tx_id))
    h.at(minutes=16)
    result = h.tick()
    assert result.claimed == 10 and len(result.enqueued) == 10
    assert nudged(h) == ids
    assert h.at(minutes=17).tick().claimed == 0
