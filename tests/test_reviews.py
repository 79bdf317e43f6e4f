"""The risk-review queue: escalated transactions listed oldest first; ops contact, approve or decline, each
with a name in the audit trail, a message to the customer and an event to the platform. Through the HTTP
app and the CLI."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from support import HOOK_SECRET, ROOT, T0, serve_platform, transaction
from test_events import OPS, PLATFORM, register

from worker.cli import main
from worker.service import Remind
from worker.settings import Settings


def escalate(h, client, *tx_ids: str) -> None:
    for n, tx_id in enumerate(tx_ids):
        h.at(minutes=n)
        register(client, tx_id, risk_flag=True, customer={"timezone": "UTC"})  # 18:00 there at +9 h: not quiet
    h.at(hours=6, minutes=30).tick()  # the final warning (by email: SMS and push wait out the night)
    h.drain()
    h.at(hours=9).tick()  # the risk schedule escalates at 8 h
    h.drain()


def test_the_queue_lists_escalated_transactions_oldest_first_with_what_was_sent(service):
    h, client = service
    escalate(h, client, "tx_a", "tx_b")
    register(client, "tx_plain")
    assert client.get("/v1/reviews", headers=PLATFORM).status_code == 403  # the platform's token is not ops
    body = client.get("/v1/reviews", headers=OPS).json()
    assert [r["id"] for r in body["reviews"]] == ["tx_a", "tx_b"]
    first = body["reviews"][0]
    assert first["status"] == "escalated" and first["amount"] == "1000.00" and first["fee"] == "12.50"
    assert {(s["step"], s["channel"]) for s in first["sent"]} >= {("escalate", "sms"), ("escalate", "email")}
    assert first["history"] == [{"at": (T0 + timedelta(hours=9)).isoformat().replace("+00:00", "Z"),
                                 "action": "escalated", "source": "deadline", "actor": None, "note": None}]


def test_contact_asks_the_customer_who_can_then_confirm_by_the_link(service, hooks):
    h, client = service
    escalate(h, client, "tx_v")
    token_before = next(m.group(1) for line in h.lines("tx_v") if (m := re.search(r"/c/(\S+)", line["body"])))
    # before ops asked, the customer's old link cannot override the review (and ops see that it was tried)
    assert client.post(f"/c/{token_before}").status_code in (409, 410)
    response = client.post("/v1/reviews/tx_v/contact", json={"actor": "Wang Fang", "note": "called twice"},
                           headers=OPS)
    assert response.status_code == 200 and response.json()["review_state"] == "contacted"
    h.drain()
    [sms] = [line for line in h.lines("tx_v") if line["step"] == "contact" and line["channel"] == "sms"]
    assert "1,012.50" in sms["body"] or "1012.50" in sms["body"]  # the total, on the message itself
    token = re.search(r"/c/(\S+)", sms["body"]).group(1)
    assert "form" in client.get(f"/c/{token}").text  # the page offers the button again
    assert client.post(f"/c/{token}").status_code == 200
    h.drain()
    view = client.get("/v1/transactions/tx_v", headers=PLATFORM).json()
    assert view["status"] == "confirmed" and view["settled_by"] == {"source": "customer", "actor": None}
    actions = [(x["action"], x["source"], x["actor"], x["note"]) for x in view["history"]]
    assert ("contacted", "ops", "Wang Fang", "called twice") in actions and actions[-1][:2] == ("confirmed", "customer")
    assert [t for t in hooks.types() if t[0] != "transaction.escalated"] == [
        ("review.contacted", "ops", "Wang Fang"), ("transaction.confirmed", "customer", None)]


@pytest.mark.parametrize("action", ["approve", "decline"])
def test_approve_and_decline_tell_the_customer_and_the_platform_who_decided(service, hooks, action):
    h, client = service
    escalate(h, client, "tx_d")
    body = {"actor": "Wang Fang", **({"reason": "compliance"} if action == "decline" else {})}
    response = client.post(f"/v1/reviews/tx_d/{action}", json=body, headers=OPS)
    assert response.status_code == 200, response.text
    h.drain()
    status = "confirmed" if action == "approve" else "cancelled"
    assert response.json()["status"] == status
    step = "approve" if action == "approve" else "cancel"
    told = {line["channel"] for line in h.lines("tx_d") if line["step"] == step}
    assert told >= {"sms", "email"}  # the escalation's channels
    event = hooks.received[-1]
    assert (event["type"], event["data"]["source"], event["data"]["actor"]) == (f"transaction.{status}", "ops",
                                                                                 "Wang Fang")
    assert event["data"]["reason"] == ("compliance" if action == "decline" else None)
    # repeating is harmless; acting on a transaction that is not under review is a 409
    assert client.post(f"/v1/reviews/tx_d/{action}", json=body, headers=OPS).status_code == 200
    register(client, "tx_p")
    named = {"actor": "Wang Fang"}
    assert client.post("/v1/reviews/tx_p/approve", json=named, headers=OPS).status_code == 409
    assert client.post("/v1/reviews/nope/approve", json=named, headers=OPS).status_code == 404
    missing = client.post("/v1/reviews/tx_d/approve", json={}, headers=OPS)
    assert missing.status_code == 422
    view = client.get("/v1/transactions/tx_d", headers=PLATFORM).json()
    assert view["settled_by"] == {"source": "ops", "actor": "Wang Fang"}
    # the funnel counts an ops approval apart: reminders are judged by the customers' own confirmations
    [funnel] = client.get("/v1/stats", params={"schedule": "risk_review"}, headers=OPS).json()["schedules"]
    assert (funnel["confirmed"], funnel["approved"]) == ((0, 1) if action == "approve" else (0, 0))
    assert funnel["confirmation_rate"]["value"] == 0 and all(s["confirmed_after"] == 0 for s in funnel["steps"])


def test_the_cli_works_the_queue(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    received: list[str] = []
    server, url = serve_platform(lambda body, headers: received.append(json.loads(body)["type"]) or 204)
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"),
           "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_OUTBOX": str(tmp_path / "out.jsonl"),
           "REMIND_PLATFORM_WEBHOOK_URL": url, "REMIND_WEBHOOK_SECRET": HOOK_SECRET}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    run = CliRunner().invoke
    now = datetime.now(UTC)
    tx = transaction("tx_cli", risk_flag=True, created_at=now.isoformat(),
                     expires_at=(now + timedelta(days=2)).isoformat(),
                     expected_arrival=(now + timedelta(days=1)).isoformat())
    assert run(main, ["tx", "submit", "-"], input=json.dumps(tx)).exit_code == 0
    Remind.from_settings(Settings()).tick(now + timedelta(hours=9))  # a scheduler's tick, 9 h on, escalates it
    listed = run(main, ["review", "list"])
    assert listed.exit_code == 0 and "tx_cli" in listed.output
    assert run(main, ["review", "approve", "tx_cli"]).exit_code != 0  # --actor is required
    done = run(main, ["review", "decline", "tx_cli", "--actor", "Wang Fang", "--reason", "risk_declined"])
    assert done.exit_code == 0 and "cancelled by Wang Fang" in done.output
    again = run(main, ["review", "contact", "tx_cli", "--actor", "Wang Fang"])
    assert again.exit_code != 0 and "cancelled" in again.output
    shown = run(main, ["tx", "show", "tx_cli"]).output
    assert "escalated      by deadline" in shown and "cancelled      by ops (Wang Fang)" in shown
    events = run(main, ["events", "list", "--json"])
    assert [e["type"] for e in json.loads(events.output)["events"]] == ["transaction.escalated",
                                                                        "transaction.cancelled"]
    server.shutdown()


def test_the_review_page_under_ops_lists_the_queue_and_acts_with_a_name(service, hooks):
    h, client = service
    escalate(h, client, "tx_page")
    assert client.get("/ops/reviews", follow_redirects=False).status_code == 303  # not signed in
    assert client.post("/ops/reviews/tx_page/decline", data={"actor": "x"}, follow_redirects=False).status_code == 303
    assert client.post("/ops/login", data={"token": "ops-token"}, follow_redirects=False).status_code == 303
    page = client.get("/ops/reviews")
    assert page.status_code == 200 and "tx_page" in page.text and "1 waiting" in page.text
    nameless = client.post("/ops/reviews/tx_page/decline", data={"actor": "  ", "reason": "compliance"})
    assert nameless.status_code == 422 and "actor" in nameless.text
    done = client.post("/ops/reviews/tx_page/decline", data={"actor": "Wang Fang", "note": "<b>no</b>",
                                                             "reason": "compliance"})
    assert done.status_code == 200 and "tx_page: declined by Wang Fang" in done.text and "0 waiting" in done.text
    view = client.get("/v1/transactions/tx_page", headers=PLATFORM).json()
    assert view["status"] == "cancelled" and view["status_reason"] == "compliance"
    assert view["history"][-1]["note"] == "<b>no</b>"  # kept as written; the page escapes it
    h.drain()
    assert hooks.received[-1]["data"]["actor"] == "Wang Fang"
