"""Taking transactions in: validation that names fields, exact money, idempotent registration."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import T0, Clock, make_settings, transaction

from worker.errors import Conflict, InvalidInput
from worker.ingest import parse_transaction
from worker.service import Remind


@pytest.fixture
def remind(tmp_path):
    return Remind.from_settings(make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}"), clock=Clock())


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


# -- text that cannot be stored, read back or shown -------------------------------------------------


def test_a_lone_surrogate_in_metadata_is_refused_naming_the_field_and_writes_nothing(remind):
    payload = json.loads(json.dumps(transaction()).replace('"app"', '"\\ud800"'))  # what JSON "\ud800" parses to
    with pytest.raises(InvalidInput) as info:
        remind.register(payload)
    assert "lone surrogate" in info.value.problems["metadata.channel"]
    assert remind.store.counts() == {}


@pytest.mark.parametrize("change,field,says", [
    ({"customer": {"email": "a@b.co\n"}}, "customer.email", "not an email address"),
    ({"customer": {"email": "li.wei@example"}}, "customer.email", "not an email address"),
    ({"customer": {"name": "Li\nWei"}}, "customer.name", "control character (U+000A"),
    ({"customer": {"name": "Li\u202eWei"}}, "customer.name", "control character (U+202E"),
    ({"customer": {"id": "c\x00"}}, "customer.id", "NUL"),
    ({"customer": {"segment": "new\x00"}}, "customer.segment", "NUL"),
    ({"payment_method": "card\r\n1234"}, "payment_method", "control character"),
    ({"customer": {"push_tokens": ["tok\x07"]}}, "customer.push_tokens.0", "control character"),
    ({"metadata": {"n": float("nan")}}, "metadata.n", "finite"),
    ({"metadata": {"note": "a\x00b"}}, "metadata.note", "NUL"),
    ({"metadata": {"\udc80": "x"}}, "metadata.\\udc80", "the key contains invalid Unicode"),
    ({"metadata": {"deep": json.loads("[" * 100 + "]" * 100)}}, "metadata.deep", "nested more than"),
    ({"unknown\ud800": 1}, "unknown\\ud800", "invalid Unicode"),
])
def test_text_that_cannot_be_kept_is_refused_naming_the_field(change, field, says):
    with pytest.raises(InvalidInput) as info:
        parse_transaction(transaction(**change))
    found = {k: v for k, v in info.value.problems.items() if k.startswith(field)}
    assert found and says in next(iter(found.values())), info.value.problems


def test_ordinary_international_text_is_kept_as_sent():
    tx = parse_transaction(transaction(
        customer={"name": "李 伟 🙂", "email": "李伟@例子.中国"}, payment_method="Carte bancaire • 1234",
        metadata={"note": "line one\nline two\ttabbed", "emoji": "👍🏽", "nested": {"list": [1, "二", None]}}))
    data = tx.canonical()
    assert data["customer"]["name"] == "李 伟 🙂" and data["customer"]["email"] == "李伟@例子.中国"
    assert data["metadata"]["note"] == "line one\nline two\ttabbed"
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # storable and readable as UTF-8


# -- fuzzing: nothing a client sends gives anything but a valid transaction or InvalidInput -----------

#: Text as a hostile or broken client sends it: lone surrogates, controls, format characters, anything.
nasty_text = st.one_of(
    st.text(st.characters(categories=["Cs", "Cc", "Cf", "Zl", "Zp", "L", "N", "S"]), max_size=40),
    st.text(st.characters(categories=["Cs", "Cc", "L"]), min_size=1, max_size=10),
    st.text(max_size=20),
    st.builds(lambda piece, times: piece * times, st.text(min_size=1, max_size=4), st.integers(1, 200_000)),
    st.sampled_from(["a@b.co\n", "li.wei@example.com", "+8613800138000", "", " ", "\x00", "\ud800", "NaN"]),
)
json_leaf = st.one_of(nasty_text, st.integers(-(10**30), 10**30), st.booleans(), st.none(),
                      st.floats(allow_nan=True, allow_infinity=True), st.decimals(allow_nan=True))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(nasty_text, inner, max_size=4)), max_leaves=12)

#: Where a fuzzed value lands in an otherwise valid transaction; the free-text fields, which accept
#: the most, come up most often.
FREE_TEXT = [("customer", "name"), ("customer", "id"), ("customer", "segment"), ("payment_method",),
             ("metadata", "note"), ("metadata", "channel")]
FIELDS = [*FREE_TEXT, *FREE_TEXT, ("id",), ("customer", "phone"), ("customer", "email"),
          ("customer", "push_tokens"), ("customer", "locale"), ("customer", "timezone"), ("amount",),
          ("currency",), ("fee",), ("expected_arrival",), ("created_at",), ("expires_at",), ("metadata",),
          ("risk_flag",), ("extra",)]


@st.composite
def payloads(draw, tx_id: str = "tx_fuzz") -> dict:
    """A valid transaction with one field (sometimes two) replaced by fuzz, mostly text."""
    data = transaction(tx_id)
    chosen = [draw(st.sampled_from(FIELDS))]
    if draw(st.integers(0, 3)) == 0:
        chosen.append(draw(st.sampled_from(FIELDS)))
    for path in sorted(set(chosen), key=len, reverse=True):  # a field inside metadata before metadata itself
        value = draw(nasty_text if draw(st.integers(0, 3)) else json_value)
        target = data
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
    return data


@given(payloads())
@example(transaction(metadata={"note": "\ud800"}))
@settings(max_examples=300, deadline=None)
def test_fuzzed_payloads_parse_to_a_storable_transaction_or_name_the_problem(payload):
    try:
        tx = parse_transaction(payload)
    except InvalidInput as exc:
        assert exc.problems and all(isinstance(k, str) and v for k, v in exc.problems.items())
        json.dumps(exc.problems, ensure_ascii=False).encode("utf-8")  # the 422 body itself can be sent
        return
    json.dumps(tx.canonical(), ensure_ascii=False).encode("utf-8")


@given(payloads())
@example(transaction("tx_fuzz", metadata={"note": "\ud800"}))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_registrations_store_a_readable_row_or_none(remind, payload):
    if payload["id"] == "tx_fuzz":  # one database for every example: a fresh id for each
        payload = {**payload, "id": f"fz_{uuid.uuid4().hex[:12]}"}
    before = remind.store.counts().get("transactions_pending", 0)
    try:
        remind.register(payload)
    except InvalidInput:
        assert remind.store.counts().get("transactions_pending", 0) == before  # a refusal writes nothing
        return
    except Conflict:
        return
    json.dumps(remind.show(payload["id"]), ensure_ascii=False).encode("utf-8")  # every read still works
