"""Taking transactions in: validation that names fields, exact money, idempotent registration."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from support import T0, make_settings, transaction

from worker.errors import Conflict, InvalidInput
from worker.ingest import parse_transaction
from worker.service import Remind


@pytest.fixture
def remind(tmp_path):
    return Remind.from_settings(make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}"))


def test_json_numbers_are_parsed_exactly_and_money_is_quantized():
    payload = json.loads(json.dumps(transaction()).replace('"1000.00"', "1000.1"), parse_float=Decimal)
    tx = parse_transaction(payload)
    assert tx.amount == Decimal("1000.1") and tx.canonical()["amount"] == "1000.10"
    assert tx.total == Decimal("1012.60")


@pytest.mark.parametrize("change,field", [
    ({"amount": 10.5}, "amount"),  # a float never gets in
    ({"amount": "1.234"}, "amount"),  # CNY has two minor digits
    ({"amount": "-5"}, "amount"),
    ({"currency": "ABC"}, "currency"),
    ({"id": "has space"}, "id"),
    ({"expected_arrival": "2026-11-26T10:00:00"}, "expected_arrival"),  # no offset
    ({"customer": {"phone": "+86 138 0013 8000"}}, "customer.phone"),
    ({"customer": {"timezone": "Mars/Olympus"}}, "customer.timezone"),
    ({"customer": {"email": "not-an-email"}}, "customer.email"),
    ({"surprise": True}, "surprise"),
])
def test_bad_fields_are_named(change, field):
    with pytest.raises(InvalidInput) as info:
        parse_transaction(transaction(**change))
    assert field in info.value.problems, info.value.problems


def test_a_customer_needs_some_way_to_be_reached():
    payload = transaction()
    payload["customer"] = {"id": "c", "name": "N"}
    with pytest.raises(InvalidInput) as info:
        parse_transaction(payload)
    assert "push_tokens" in info.value.problems["customer"]


def test_zero_decimal_currency_refuses_minor_units():
    with pytest.raises(InvalidInput) as info:
        parse_transaction(transaction(currency="JPY", amount="100.5", fee="0"))
    assert info.value.problems["amount"].startswith("JPY has 0 minor digits")


def test_registering_again_is_a_no_op_and_different_content_a_conflict(remind):
    first = remind.register(transaction())
    assert first.created and first.schedule == "default"
    again = remind.register(transaction(amount="1000.0"))  # same value, other spelling
    assert not again.created and again.status == "pending"
    with pytest.raises(Conflict) as info:
        remind.register(transaction(amount="999.00", customer={"phone": "+8613900139000"}))
    assert info.value.fields == ["amount", "customer.phone"]


def test_created_at_defaults_to_now_and_a_repeat_without_it_is_still_the_same(remind):
    from datetime import timedelta

    payload = transaction()
    del payload["created_at"]
    assert remind.register(payload, now=T0 + timedelta(hours=1)).created
    view = remind.show("tx_1")
    assert view["created_at"] == "2026-11-25T10:00:00Z"  # the time it was registered
    assert view["deadline"] == "2026-11-26T10:00:00Z"  # and the ladder counts from it
    again = remind.register(payload, now=T0 + timedelta(hours=2))  # a retry an hour later: the same one
    assert not again.created and remind.show("tx_1")["created_at"] == "2026-11-25T10:00:00Z"


def test_invalid_input_writes_nothing(remind):
    with pytest.raises(InvalidInput):
        remind.register(transaction(amount="oops"))
    assert remind.store.counts() == {}


def test_new_and_risk_flagged_customers_get_their_schedules(remind):
    assert remind.register(transaction("n", customer={"segment": "new"})).schedule == "new_customer"
    assert remind.register(transaction("r", risk_flag=True)).schedule == "risk_review"
    view = remind.show("r")
    assert view["deadline"] == "2026-11-25T17:00:00Z"  # risk_review escalates after 8h
    assert T0.isoformat().startswith(view["created_at"][:10])
