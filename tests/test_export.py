"""Costs and the stats export on a small history driven through the real pipeline, on both backends: the
calling code recorded at send time, cost per (schedule, step, variant), per transaction and per customer
confirmation (ops approvals and platform calls are not customer confirmations), and the CSV through
`remind stats --format csv` and GET /v1/stats.csv (= /v1/stats?format=csv)."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update
from starlette.testclient import TestClient
from support import ROOT, T0, Harness, transaction, write_files

from worker.cli import main
from worker.export import COLUMNS, cost_report, cost_totals, export, to_csv
from worker.pricing import Pricing
from worker.stats import funnel, report, to_text
from worker.store.rollup import forget
from worker.store.tables import deliveries, transactions
from worker.web.app import create_app

TOKEN = "export-ops-token"
PRICES = """\
currency: EUR
sms:
  default: 0.10
  1: 0.01
  86: 0.04
email: 0.002
push: 0.0005
"""
SCHEDULES = {
    "costly.yaml": """
name: costly
match: {}
priority: 100
steps:
  - {after: 15m, channels: [sms, push], template: nudge}
  - {after: 2h, channels: [sms, email], template: reminder}
cancel: {after: 24h, template: cancelled, reason: not_confirmed, channels: [sms]}
""",
    "review.yaml": """
name: review
match: {risk_flag: true}
priority: 10
steps:
  - {after: 5m, channels: [sms], template: verify}
escalate: {after: 2h, template: escalated, reason: risk_review, channels: [sms]}
""",
}
SMS_PRICE = {86: Decimal("0.04"), 1: Decimal("0.01"), 33: Decimal("0.10")}
PHONES = {"c86": "+8613800138000", "c1": "+12127365000", "cfr": "+33612345678", "cplat": "+8613900139000",
          "r1": "+8613700137000"}
CODES = {"c86": 86, "c1": 1, "cfr": 33, "cplat": 86, "r1": 86}
SEGMENTS = {"c86": "returning", "c1": "new", "cfr": "new", "cplat": "returning", "r1": "returning"}


def _tx(tx_id: str, **extra) -> dict:
    return transaction(tx_id, customer={"id": f"cust_{tx_id}", "phone": PHONES[tx_id],
                                        "segment": SEGMENTS[tx_id]}, **extra)


@pytest.fixture
def history(make_harness, tmp_path) -> Harness:
    """On `costly` (sms+push at 15m, sms+email at 2h, an SMS cancellation notice at 24h): c86 (+86) confirms
    by its link after the nudge, c1 (+1) after the reminder; the platform confirms cplat (+86) after the
    reminder; cfr (+33, priced at the default) is cancelled at the deadline. On `review`: r1 is escalated
    after its verify SMS and approved by ops."""
    folder = write_files(tmp_path / "schedules", SCHEDULES)
    prices = write_files(tmp_path, {"pricing.yaml": PRICES}) / "pricing.yaml"
    h = make_harness(schedules_dir=folder, ops_tokens=TOKEN, api_tokens="platform-token", pricing_file=prices)
    r = h.remind
    for tx_id in ("c86", "c1", "cfr", "cplat"):
        r.register(_tx(tx_id))
    r.register(_tx("r1", risk_flag=True))
    h.at(minutes=5).tick()
    h.at(minutes=15).tick()
    h.at(minutes=30)
    r.confirm("c86", by_customer=True)
    h.at(hours=2).tick()
    h.at(hours=3)
    r.confirm("c1", by_customer=True)
    r.confirm("cplat")
    r.review("r1", "approve", actor="ana")
    h.at(hours=24).tick()
    return h


def _sent(h: Harness) -> list[dict]:
    d, t = deliveries.c, transactions.c
    with h.remind.store.engine.connect() as conn:
        return [dict(row) for row in conn.execute(
            select(d.transaction_id, d.kind, d.step, d.channel, d.segments, d.country_code, t.schedule)
            .join(transactions, t.id == d.transaction_id)
            .where(d.sent_at.is_not(None), d.channel != "webhook")).mappings()]


def _price(row: dict) -> Decimal:
    if row["channel"] == "sms":
        return SMS_PRICE[CODES[row["transaction_id"]]] * row["segments"]
    return {"email": Decimal("0.002"), "push": Decimal("0.0005")}[row["channel"]]


def test_the_calling_code_is_recorded_at_send_time(history):
    sent = _sent(history)
    sms = {(r["transaction_id"], r["step"]): r["country_code"] for r in sent if r["channel"] == "sms"}
    assert sms[("c86", "nudge")] == 86 and sms[("c1", "reminder")] == 1 and sms[("cfr", "cancel")] == 33
    assert all(r["country_code"] is None for r in sent if r["channel"] != "sms")
    assert all(r["segments"] >= 1 for r in sent if r["channel"] == "sms")


def test_cost_per_step_transaction_and_customer_confirmation(history):
    sent = _sent(history)
    report = cost_report(history.remind.store, history.remind.pricing)
    assert report.currency == "EUR"
    per_tx: dict[str, Decimal] = defaultdict(Decimal)
    per_step: dict[tuple, Decimal] = defaultdict(Decimal)
    for row in sent:
        per_tx[row["transaction_id"]] += _price(row)
        if row["kind"] == "reminder":
            per_step[(row["schedule"], row["step"], "default")] += _price(row)
    assert report.by_transaction == dict(per_tx)
    assert report.by_step == dict(per_step)
    assert set(report.by_step) == {("costly", "nudge", "default"), ("costly", "reminder", "default"),
                                   ("review", "verify", "default")}
    costly = report.by_schedule["costly"]
    total = sum(per_tx[t] for t in ("c86", "c1", "cfr", "cplat"))
    # two customer confirmations: the platform's call on cplat is not one
    assert (costly["transactions"], costly["customer_confirmations"], costly["cost"]) == (4, 2, total)
    assert costly["cost_per_customer_confirmation"] == (total / 2).quantize(Decimal("0.000001"))
    review = report.by_schedule["review"]
    # the ops approval of r1 is not a customer confirmation: its messages cost, per confirmation is null
    assert review["customer_confirmations"] == 0 and review["cost"] == per_tx["r1"] > 0
    assert review["cost_per_customer_confirmation"] is None

    # an erased customer keeps its price: the calling code was recorded when the SMS went out
    history.remind.erase_customer("cust_c86")
    assert cost_report(history.remind.store, history.remind.pricing).by_transaction["c86"] == per_tx["c86"]
    # a row from before migration 0008 reads the phone (c1), or, erased (c86), pays the default
    with history.remind.store.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.transaction_id.in_(("c86", "c1"))).values(
            country_code=None))
    again = cost_report(history.remind.store, history.remind.pricing).by_transaction
    assert again["c1"] == per_tx["c1"]
    c86_sms = sum(r["segments"] for r in sent if r["transaction_id"] == "c86" and r["channel"] == "sms")
    assert again["c86"] == per_tx["c86"] + c86_sms * (Decimal("0.10") - Decimal("0.04"))

    none = cost_report(history.remind.store, Pricing.none())
    assert none.currency is None and set(none.by_transaction.values()) == {None}
    assert none.by_schedule["costly"]["cost_per_customer_confirmation"] is None


def _expected_rows(history) -> list[dict]:
    sent = _sent(history)
    cost: dict[tuple, Decimal] = defaultdict(Decimal)
    segments: dict[tuple, int] = defaultdict(int)
    for row in sent:
        if row["kind"] == "reminder":
            key = (row["schedule"], row["step"], SEGMENTS[row["transaction_id"]])
            cost[key] += _price(row)
            segments[key] += row["segments"] if row["channel"] == "sms" else 0
    # (schedule, step, segment): reached, confirmed after (by the customer), sms, email, push
    counts = {("costly", "nudge", "new"): (2, 0, 2, 0, 2), ("costly", "nudge", "returning"): (2, 1, 2, 0, 2),
              ("costly", "reminder", "new"): (2, 1, 2, 2, 0), ("costly", "reminder", "returning"): (1, 0, 1, 1, 0),
              ("review", "verify", "returning"): (1, 0, 1, 0, 0)}
    rows = []
    for (schedule, step, segment), (reached, confirmed, sms, email, push) in counts.items():
        key = (schedule, step, segment)
        rows.append({"schedule": schedule, "step": step, "variant": "default", "segment": segment,
                     "reached": reached, "confirmed_after": confirmed, "messages_sms": sms, "messages_email": email,
                     "messages_push": push, "sms_segments": segments[key], "currency": "EUR",
                     "cost": str(cost[key]), "cost_per_confirmation": str(
                         (cost[key] / confirmed).quantize(Decimal("0.000001"))) if confirmed else None})
    return rows


def test_export_rows_one_per_schedule_step_variant_and_segment(history):
    data = export(history.remind.store, history.remind.pricing)
    expected = _expected_rows(history)
    got = [{k: r[k] for k in expected[0]} for r in data["rows"]]
    assert got == expected
    nudge = data["rows"][1]
    assert (nudge["confirmation_rate"], round(nudge["rate_low"], 4), round(nudge["rate_high"], 4)) == (
        0.5, 0.0945, 0.9055)
    assert data["rows"][0]["confirmation_rate"] == 0.0 and data["currency"] == "EUR"
    assert [s["customer_confirmations"] for s in data["schedules"]] == [2, 0]
    assert export(history.remind.store, history.remind.pricing, since=T0.replace(day=26))["rows"] == []
    assert [r["schedule"] for r in export(history.remind.store, history.remind.pricing, schedule="review")[
        "rows"]] == ["review"]
    with pytest.raises(ValueError):
        export(history.remind.store, history.remind.pricing, since="last tuesday")
    unpriced = export(history.remind.store, Pricing.none())["rows"][1]
    assert (unpriced["cost"], unpriced["cost_per_confirmation"], unpriced["currency"]) == (None, None, None)
    assert to_csv(export(history.remind.store, Pricing.none())).splitlines()[2].endswith(",,,")


def _csv(text: str) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


def _as_csv(rows: list[dict]) -> list[dict]:
    return [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]


def test_remind_stats_format_csv_and_json(history, tmp_path, monkeypatch):
    settings = history.remind.settings
    monkeypatch.chdir(tmp_path)
    for key, value in {"DATABASE_URL": settings.database_url, "REMIND_SCHEDULES_DIR": str(settings.schedules_dir),
                       "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_PRICING_FILE": str(
                           settings.pricing_file), "REMIND_OUTBOX": str(tmp_path / "cli.jsonl")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    result = CliRunner().invoke(main, ["stats", "--format", "csv"])
    assert result.exit_code == 0, result.output
    header, rows = _csv(result.output)
    assert header == list(COLUMNS)
    expected = _expected_rows(history)
    assert [{k: r[k] for k in expected[0]} for r in rows] == _as_csv(expected)
    assert result.output.splitlines()[0] == ",".join(COLUMNS)

    as_json = json.loads(CliRunner().invoke(main, ["stats", "--format", "json", "--schedule", "costly"]).output)
    assert [r["step"] for r in as_json["rows"]] == ["nudge", "nudge", "reminder", "reminder"]
    assert as_json["schedules"][0]["customer_confirmations"] == 2
    both = CliRunner().invoke(main, ["stats", "--format", "csv", "--json"])
    assert both.exit_code == 2
    bad = CliRunner().invoke(main, ["stats", "--format", "csv", "--since", "soon"])
    assert bad.exit_code == 2 and "--since" in bad.output
    checked = CliRunner().invoke(main, ["schedules", "check"])
    assert checked.exit_code == 0 and "prices: EUR, SMS 2 calling codes + default" in checked.output


def test_get_v1_stats_csv_needs_the_ops_token(history):
    with TestClient(create_app(history.remind)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/v1/stats.csv").status_code == 401
        assert client.get("/v1/stats?format=csv").status_code == 401
        assert client.get("/v1/stats.csv", headers={"Authorization": "Bearer platform-token"}).status_code == 403
        answer = client.get("/v1/stats.csv", headers=auth)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
        header, rows = _csv(answer.text)
        assert header == list(COLUMNS) and len(rows) == 5
        assert answer.text == to_csv(export(history.remind.store, history.remind.pricing))
        assert client.get("/v1/stats?format=csv", headers=auth).text == answer.text
        assert _csv(client.get("/v1/stats.csv?schedule=review", headers=auth).text)[1][0]["step"] == "verify"
        bad = client.get("/v1/stats.csv?since=soon", headers=auth)
        assert bad.status_code == 422 and "since" in bad.json()["problems"]
        # without format=csv, /v1/stats is still the funnel's JSON
        funnel = client.get("/v1/stats", headers=auth)
        assert funnel.headers["content-type"] == "application/json" and "schedules" in funnel.json()
        assert "schedules" in client.get("/v1/stats?format=json", headers=auth).json()


def _totals_match(history) -> None:
    """The database's aggregate (cost_totals) prices every step and schedule as the row-by-row report does."""
    store, pricing = history.remind.store, history.remind.pricing
    rows, totals = cost_report(store, pricing), cost_totals(store, pricing)
    assert totals.by_step == rows.by_step and totals.currency == rows.currency
    for name, s in rows.by_schedule.items():
        assert {k: v for k, v in totals.by_schedule[name].items() if k != "cost_per_transaction"} == s
        assert totals.by_schedule[name]["cost_per_transaction"] == (s["cost"] / s["transactions"]).quantize(
            Decimal("0.000001"))


def test_costs_in_the_stats_json_and_on_the_ops_page(history):
    """Cost per transaction and per customer confirmation, by schedule, step and variant, in /v1/stats (an
    added `costs` field: `schedules` stays the funnel) and on /ops; the same money as the export's."""
    _totals_match(history)
    store, pricing = history.remind.store, history.remind.pricing
    data = report(store, pricing, schedules=history.remind.registry, now=T0 + timedelta(days=1))
    assert data["schedules"] == funnel(store, now=T0 + timedelta(days=1))["schedules"]
    exported = export(store, pricing)
    assert data["currency"] == data["costs"]["currency"] == "EUR"
    by_name = {s["schedule"]: s for s in data["costs"]["schedules"]}
    for s in exported["schedules"]:
        mine = by_name[s["schedule"]]
        assert {k: mine[k] for k in s} == s
        assert Decimal(mine["cost_per_transaction"]) == (Decimal(s["cost"]) / s["transactions"]).quantize(
            Decimal("0.000001"))
    # per step and variant: the export's rows summed over the segments
    step_cost: dict[tuple, Decimal] = defaultdict(Decimal)
    confirmed: dict[tuple, int] = defaultdict(int)
    for r in exported["rows"]:
        step_cost[(r["schedule"], r["step"], r["variant"])] += Decimal(r["cost"])
        confirmed[(r["schedule"], r["step"], r["variant"])] += r["confirmed_after"]
    steps = {(s["schedule"], r["step"], r["variant"]): r for s in data["costs"]["schedules"] for r in s["steps"]}
    assert set(steps) == set(step_cost)
    for key, r in steps.items():
        assert (Decimal(r["cost"]), r["customer_confirmations"]) == (step_cost[key], confirmed[key])
        assert r["cost_per_customer_confirmation"] == (str((step_cost[key] / confirmed[key]).quantize(
            Decimal("0.000001"))) if confirmed[key] else None)
    nudge = steps[("costly", "nudge", "default")]
    assert (nudge["reached"], nudge["customer_confirmations"]) == (4, 1)
    assert nudge["cost_per_transaction"] == str((step_cost[("costly", "nudge", "default")] / 4).quantize(
        Decimal("0.000001")))
    review = by_name["review"]  # an ops approval is not a customer confirmation
    assert review["customer_confirmations"] == 0 and review["cost_per_customer_confirmation"] is None

    history.at(hours=25)
    with TestClient(create_app(history.remind)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        body = client.get("/v1/stats", headers=auth).json()
        assert body["costs"] == data["costs"] and body["currency"] == "EUR"
        page = client.get("/ops", headers=auth).text
        costly = by_name["costly"]
        assert f"EUR {costly['cost']}" in page
        assert f"{costly['cost_per_customer_confirmation']} per customer confirmation" in page
        assert f"<td class=\"cost\">{nudge['cost']}</td>" in page

    # no price table: every cost null, the page says why
    unpriced = report(store, Pricing.none(), now=T0 + timedelta(days=1))
    assert unpriced["currency"] is None and unpriced["costs"]["schedules"][0]["cost"] is None
    assert "cost: - (no price table" in to_text(unpriced)
    assert f"  cost: EUR {costly['cost']}, " in to_text(data)


def test_cost_totals_read_the_phone_of_older_rows_and_the_default_for_erased_ones(history):
    """SMS sent before migration 0008 have no calling code: grouped by the phone's first characters instead,
    the aggregate still prices them as the row-by-row report; an erased (masked) phone pays the default."""
    with history.remind.store.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.transaction_id.in_(("c86", "c1", "cfr"))).values(
            country_code=None))
        forget(conn, ["c86", "c1", "cfr"])  # rolled up since: as a roll-up of such rows would have been written
    history.remind.erase_customer("cust_c86")
    _totals_match(history)
    unpriced = cost_totals(history.remind.store, Pricing.none())  # no price table: no message is read
    assert unpriced.by_step == {} and unpriced.by_schedule["costly"]["cost"] is None
    assert unpriced.customer_confirmations[("costly", "nudge", "default")] == 1
