"""Personal data: erased on request (API, CLI) and after REMIND_RETENTION_DAYS, gone from every row."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from click.testing import CliRunner
from sqlalchemy import text
from starlette.testclient import TestClient
from support import ROOT, T0, transaction

from worker.cli import main
from worker.runner import _add_tick
from worker.web.app import create_app

AUTH = {"Authorization": "Bearer platform-token"}
#: Everything of customer c_42 that must not survive an erasure, as the tests' sample sends it.
LI_WEI = ("Li Wei", "+8613800138000", "li.wei@example.com", "fcm-token-1")
OTHER = {"id": "c_7", "name": "Zhang San", "phone": "+8613911112222", "email": "zhang.san@example.com",
         "push_tokens": ["fcm-token-7"]}


def raw_text(remind) -> str:
    """Every row of every table as the database holds it (JSON as stored, not parsed)."""
    engine = remind.store.engine
    tables = ("transactions", "deliveries", "suppressions", "early_callbacks")
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            rows = [r for t in tables for r in conn.execute(text(f"SELECT CAST(x AS text) FROM {t} AS x"))]
        else:
            rows = [r for t in tables for r in conn.exec_driver_sql(f"SELECT * FROM {t}")]
    return "\n".join(" | ".join(str(v) for v in row) for row in rows)


def li_wei_left(remind) -> list[str]:
    raw = raw_text(remind)
    return [value for value in LI_WEI if value in raw]


@pytest.fixture
def h(make_harness):
    """Two transactions of Li Wei (c_42) that have had reminders, one confirmed; one of another customer."""
    h = make_harness(api_tokens="platform-token")
    for tx in (transaction("tx_1"), transaction("tx_2"), transaction("tx_other", customer=OTHER)):
        assert h.remind.register(tx).created
    h.at(minutes=16).tick()
    h.at(hours=2, minutes=1).tick()
    h.remind.confirm("tx_2")
    # an opt-out, and a reason quoting an address in full (as a provider's error might): both hold data
    h.remind.store.suppress(None, "sms", "+8613800138000", "c_42", "the customer replied STOP")
    sms = next(d for d in h.remind.store.deliveries_of("tx_1") if d["channel"] == "sms")
    h.remind.store.update_delivery(None, sms["id"], reason="provider said: +8613800138000 is unreachable")
    assert li_wei_left(h.remind) == list(LI_WEI)  # the check below can see what it looks for
    return h


def test_the_api_erases_a_customer_and_keeps_amounts_statuses_and_the_timeline(h):
    before = {tx: h.remind.show(tx) for tx in ("tx_1", "tx_2")}
    with TestClient(create_app(h.remind)) as client:
        assert client.delete("/v1/customers/c_42/personal-data").status_code == 401
        first = client.delete("/v1/customers/c_42/personal-data", headers=AUTH)
        again = client.delete("/v1/customers/c_42/personal-data", headers=AUTH)
        shown = client.get("/v1/transactions/tx_2", headers=AUTH).json()

    assert first.status_code == 200, first.text
    assert first.json() == {"customer_id": "c_42", "transactions": 2, "erased": ["tx_1", "tx_2"],
                            "cancelled": ["tx_1"]}
    assert again.status_code == 200  # harmless: the same customer, nothing left to do
    assert again.json() == {"customer_id": "c_42", "transactions": 2, "erased": [], "cancelled": []}
    assert li_wei_left(h.remind) == []
    raw = raw_text(h.remind)
    assert all(v in raw for v in ("Zhang San", "+8613911112222", "zhang.san@example.com", "fcm-token-7"))

    # amounts, status and the timeline stay; recipients only masked, as before
    assert shown["status"] == "confirmed" and shown["amount"] == "1000.00" and shown["fee"] == "12.50"
    assert shown["erased_at"] and shown["customer"]["name"] == "" and shown["customer"]["phone"] is None
    assert [(e["step"], e["channel"], e["status"], e["recipient"]) for e in shown["timeline"]] == [
        (e["step"], e["channel"], e["status"], e["recipient"]) for e in before["tx_2"]["timeline"]]
    assert {e["recipient"] for e in shown["timeline"]} >= {"+86*******8000", "fcm-…(11 chars)"}
    assert shown["customer"]["masked"]["email"] == "l***@e***.com"

    # the pending one is cancelled: nobody can be reminded, and later ticks send it nothing
    tx_1 = h.remind.show("tx_1")
    assert tx_1["status"] == "cancelled" and tx_1["status_reason"] == "customer_request"
    h.clock.advance(seconds=3)  # the feed stays 2 s behind on PostgreSQL
    [event] = [e for e in h.remind.events() if e["data"]["id"] == "tx_1"]  # the platform hears of it too
    assert (event["type"], event["data"]["source"], event["data"]["reason"]) == (
        "transaction.cancelled", "platform", "customer_request")
    assert "Li Wei" not in str(event) and "+8613800138000" not in str(event)
    sent = len(h.lines("tx_1"))
    h.at(hours=20, minutes=1).tick()
    h.at(hours=25).tick()
    assert len(h.lines("tx_1")) == sent and h.remind.show("tx_1")["status"] == "cancelled"

    # the opt-out still holds (by its hash), but no longer names the customer
    with h.remind.store.engine.connect() as conn:
        assert conn.execute(text("SELECT customer_id FROM suppressions")).all() == [(None,)]
    with h.remind.store.begin() as conn:
        assert h.remind.store.suppressed(conn, [("sms", "+8613800138000")])


def test_the_cli_erases_a_customer_and_a_second_run_is_harmless(h, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in {"DATABASE_URL": h.remind.settings.database_url, "REMIND_SECRET_KEY": "k" * 8 + "0123456789",
                       "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"),
                       "REMIND_TEMPLATES_DIR": str(ROOT / "templates")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)

    first = CliRunner().invoke(main, ["customer", "erase", "c_42"])
    assert first.exit_code == 0, first.output
    assert "no personal data left in 2 transactions (2 erased now)" in first.output and "tx_1" in first.output
    assert li_wei_left(h.remind) == []
    again = CliRunner().invoke(main, ["customer", "erase", "c_42", "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["erased"] == []
    shown = json.loads(CliRunner().invoke(main, ["tx", "show", "tx_2", "--json"]).output)
    assert shown["status"] == "confirmed" and shown["customer"]["masked"]["sms"] == "+86*******8000"
    assert "tx_2  CONFIRMED" in CliRunner().invoke(main, ["tx", "show", "tx_2"]).output

    bad = CliRunner().invoke(main, ["customer", "erase", "a\tb"])
    assert bad.exit_code == 2 and "CUSTOMER_ID" in bad.output and "control character" in bad.output


def test_an_unknown_customer_a_bad_id_and_an_id_with_a_slash(make_harness):
    h = make_harness(api_tokens="platform-token", start_worker=False)
    h.remind.register(transaction("tx_s", customer={"id": "org/7 x"}))
    with TestClient(create_app(h.remind)) as client:
        unknown = client.delete("/v1/customers/c_nobody/personal-data", headers=AUTH)
        bad = client.delete("/v1/customers/a%00b/personal-data", headers=AUTH)
        slash = client.delete("/v1/customers/org%2F7%20x/personal-data", headers=AUTH)
    assert unknown.status_code == 200 and unknown.json()["transactions"] == 0
    assert bad.status_code == 422 and "customer_id" in bad.json()["problems"]
    assert slash.status_code == 200 and slash.json()["erased"] == ["tx_s"]
    assert li_wei_left(h.remind) == []


def test_registering_an_erased_transaction_again_stores_nothing(make_harness):
    h = make_harness(api_tokens="platform-token", start_worker=False)
    h.remind.register(transaction("tx_r"))
    h.remind.erase_customer("c_42")
    with TestClient(create_app(h.remind)) as client:
        same = client.post("/v1/transactions", json=transaction("tx_r"), headers=AUTH)
        other = client.post("/v1/transactions", json=transaction("tx_r", fee="13.00"), headers=AUTH)
    assert same.status_code == 200 and same.json()["status"] == "cancelled"
    assert other.status_code == 409 and other.json()["fields"] == ["fee"]
    assert li_wei_left(h.remind) == []


def test_retention_erases_transactions_settled_longer_ago_only(make_harness):
    h = make_harness(start_worker=False)
    for n in (1, 2, 3):
        h.remind.register(transaction(f"tx_{n}", customer={"id": f"c_{n}", "name": f"Customer {n}"}))
    h.at(hours=1)
    h.remind.confirm("tx_1")
    h.at(days=20)
    h.remind.cancel("tx_2", "customer asked support")  # tx_3 stays pending: never erased by age

    def names() -> list[str]:
        raw = raw_text(h.remind)
        return [f"Customer {n}" for n in (1, 2, 3) if f"Customer {n}" in raw]

    off = make_harness(start_worker=False, retention_days=0)
    assert off.remind.erase_expired(T0 + timedelta(days=1000)) == 0 and names() == ["Customer 1", "Customer 2",
                                                                                 "Customer 3"]
    assert h.remind.erase_expired(T0 + timedelta(days=90, minutes=59)) == 0
    assert h.remind.erase_expired(T0 + timedelta(days=90, hours=1, minutes=1)) == 1
    assert names() == ["Customer 2", "Customer 3"]
    assert h.remind.erase_expired(T0 + timedelta(days=111)) == 1
    assert names() == ["Customer 3"] and h.remind.erase_expired(T0 + timedelta(days=1000)) == 0
    kept = h.remind.show("tx_1")
    assert (kept["status"], kept["amount"], kept["customer"]["id"]) == ("confirmed", "1000.00", "c_1")
    assert "+8613800138000" in raw_text(h.remind)  # tx_3's phone: still pending, still needed


def test_the_scheduler_runs_retention_as_its_own_job_on_the_injected_clock(make_harness):
    h = make_harness(start_worker=False)
    h.remind.register(transaction("tx_j"))
    h.remind.confirm("tx_j")
    scheduler = BackgroundScheduler(timezone="UTC")
    _add_tick(scheduler, h.remind)
    job = scheduler.get_job("retention")
    assert job is not None and job.trigger.interval == timedelta(minutes=5)
    h.at(days=89)
    job.func(*job.args)
    assert li_wei_left(h.remind) == list(LI_WEI)
    h.at(days=91)
    job.func(*job.args)
    assert li_wei_left(h.remind) == []

    off = BackgroundScheduler(timezone="UTC")
    _add_tick(off, make_harness(start_worker=False, retention_days=0).remind)
    assert off.get_job("retention") is None and off.get_job("tick") is not None


def test_the_retention_query_reads_its_index(make_harness):
    h = make_harness(start_worker=False)
    engine = h.remind.store.engine
    query = h.remind.store.retention_query(T0, 500)
    sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL enable_seqscan = off"))  # a near-empty table is cheaper to scan
            plan = " ".join(r[0] for r in conn.execute(text("EXPLAIN " + sql + " FOR UPDATE SKIP LOCKED")))
        else:
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    assert "ix_transactions_retention" in plan and "Sort" not in plan, plan
