"""Events to the platform: one for every outcome, with who caused it; never lost while the platform is
down (retried from SQL, caught up through GET /v1/events, sent again on demand). Through the HTTP app."""

from __future__ import annotations

import json
import re
from datetime import timedelta

from starlette.testclient import TestClient
from support import T0, transaction

PLATFORM = {"Authorization": "Bearer plat-token"}
OPS = {"Authorization": "Bearer ops-token"}


def register(client: TestClient, tx_id: str, **overrides) -> None:
    response = client.post("/v1/transactions", content=json.dumps(transaction(tx_id, **overrides)),
                           headers={**PLATFORM, "content-type": "application/json"})
    assert response.status_code == 201, response.text


def link_of(h, tx_id: str) -> str:
    line = next(line for line in h.lines(tx_id) if line["channel"] == "sms")
    return re.search(r"https?://\S+/c/\S+", line["body"]).group(0).split("/c/", 1)[1]


def test_every_outcome_is_an_event_naming_its_source(service, hooks):
    h, client = service
    for tx_id in ("tx_link", "tx_api", "tx_cancel", "tx_late"):
        register(client, tx_id)
    register(client, "tx_risk", risk_flag=True)
    h.at(hours=2, minutes=1).tick()  # the reminder by SMS carries the link
    h.drain()
    token = link_of(h, "tx_link")
    assert client.post(f"/c/{token}").status_code == 200  # the customer's one tap
    assert client.post("/v1/transactions/tx_api/confirm", headers=PLATFORM).status_code == 200
    cancel = client.post("/v1/transactions/tx_cancel/cancel", json={"reason": "compliance"}, headers=PLATFORM)
    assert cancel.status_code == 200 and cancel.json()["settled_by"] == {"source": "platform", "actor": None}
    h.drain()
    h.at(hours=30).tick()  # tx_late's deadline: cancelled; tx_risk's: escalated
    h.drain()
    assert sorted(hooks.types()) == sorted([
        ("transaction.confirmed", "customer", None), ("transaction.confirmed", "platform", None),
        ("transaction.cancelled", "platform", None), ("transaction.cancelled", "deadline", None),
        ("transaction.escalated", "deadline", None)])
    by_tx = {e["data"]["id"]: e for e in hooks.received}
    assert by_tx["tx_cancel"]["data"]["reason"] == "compliance"
    assert by_tx["tx_late"]["data"]["reason"] == "not_confirmed"
    data = by_tx["tx_api"]["data"]
    assert set(data) >= {"id", "status", "source", "actor", "reason", "at", "amount", "currency", "customer_id"}
    assert (data["amount"], data["currency"], data["customer_id"], data["status"]) == ("1000.00", "CNY", "c_42",
                                                                                      "confirmed")
    # the timeline says who did it, on the injected clock
    history = client.get("/v1/transactions/tx_link", headers=PLATFORM).json()["history"]
    assert [(x["action"], x["source"]) for x in history] == [("confirmed", "customer")]
    assert history[0]["at"] == (T0 + timedelta(hours=2, minutes=1)).isoformat().replace("+00:00", "Z")


def test_a_platform_down_for_hours_catches_up_through_the_feed_and_loses_nothing(service, hooks):
    h, client = service
    hooks.down = True
    for n in range(5):
        register(client, f"tx_{n}", expires_at=(T0 + timedelta(hours=1)).isoformat())
    assert client.post("/v1/transactions/tx_0/confirm", headers=PLATFORM).status_code == 200
    h.at(hours=2).tick()  # the other four are cancelled at their deadline
    h.drain()
    for minutes in range(5, 6 * 60, 15):  # six hours down: retries keep failing, nothing is dropped
        h.at(hours=2, minutes=minutes).tick()
    h.drain()
    assert hooks.received == []
    # back up: the platform reads what it missed, oldest first, page by page, with each delivery status
    hooks.down = False
    seen, after = [], None
    while True:
        page = client.get("/v1/events", params={"limit": 2, **({"after": after} if after else {})}, headers=PLATFORM)
        assert page.status_code == 200, page.text
        body = page.json()
        if not body["events"]:
            break
        seen += body["events"]
        after = body["next_after"]
    assert [e["data"]["id"] for e in seen] == ["tx_0", "tx_1", "tx_2", "tx_3", "tx_4"]
    assert [e["type"] for e in seen] == ["transaction.confirmed"] + ["transaction.cancelled"] * 4
    assert all(e["delivery"]["status"] == "pending" and e["delivery"]["attempts"] > 5 for e in seen)
    assert all(e["delivery"]["last_error"] == "webhook answered HTTP 503" for e in seen)
    # and the retries deliver each one by themselves (the same webhook-id as in the feed)
    h.at(hours=9).tick()
    h.drain()
    assert sorted(e["webhook_id"] for e in hooks.received) == sorted(e["id"] for e in seen)
    assert client.get("/v1/events", params={"status": "failed"}, headers=OPS).json()["events"] == []


def test_resend_an_event_by_id_and_bad_input_is_named(service, hooks):
    h, client = service
    register(client, "tx_r")
    client.post("/v1/transactions/tx_r/confirm", headers=PLATFORM)
    h.drain()
    h.clock.advance(seconds=3)  # on PostgreSQL the feed stays 2 s behind (commits can land out of id order)
    [event] = client.get("/v1/events", headers=OPS).json()["events"]
    assert event["delivery"]["status"] == "delivered"
    resent = client.post(f"/v1/events/{event['id']}/resend", headers=PLATFORM)
    assert resent.status_code == 200 and resent.json() == {"resent": [event["id"]]}
    h.drain()
    assert [e["webhook_id"] for e in hooks.received] == [event["id"], event["id"]]
    assert client.post("/v1/events/evt_999999/resend", headers=OPS).status_code == 404
    bad = client.get("/v1/events", params={"after": "tx_1"}, headers=OPS)
    assert bad.status_code == 422 and "after" in bad.json()["problems"]
    assert client.get("/v1/events", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_cancel_through_the_api_tells_the_customer_why_and_the_old_link_says_so(service, hooks):
    h, client = service
    register(client, "tx_c")
    h.at(hours=2, minutes=1).tick()
    h.drain()
    token = link_of(h, "tx_c")
    assert client.post("/v1/transactions/tx_c/cancel", json={"reason": "customer_request"},
                       headers=PLATFORM).status_code == 200
    h.drain()
    notices = [line for line in h.lines("tx_c") if line["step"] == "cancel"]
    assert {line["channel"] for line in notices} == {"sms", "email", "push"}
    page = client.get(f"/c/{token}")
    assert page.status_code == 409 and "取消" in page.text


def test_a_deadline_burst_settles_each_once_with_its_event_and_its_audit_line(service, hooks):
    """Many transactions reaching their deadline in one tick are settled in one statement per kind of
    outcome: each still gets exactly its own status, time stamp, audit line and event."""
    h, client = service
    risky = {f"tx_r{i}" for i in range(8)}
    plain = {f"tx_p{i}" for i in range(17)}
    for tx_id in sorted(plain):
        register(client, tx_id)
    for tx_id in sorted(risky):
        register(client, tx_id, risk_flag=True)
    h.at(hours=30).tick()
    h.drain()
    assert sorted(hooks.types()) == sorted(
        [("transaction.cancelled", "deadline", None)] * len(plain)
        + [("transaction.escalated", "deadline", None)] * len(risky))
    assert {e["data"]["id"] for e in hooks.received} == plain | risky
    at = (T0 + timedelta(hours=30)).isoformat().replace("+00:00", "Z")
    for tx_id in sorted(plain | risky):
        body = client.get(f"/v1/transactions/{tx_id}", headers=PLATFORM).json()
        outcome = "escalated" if tx_id in risky else "cancelled"
        assert body["status"] == outcome, tx_id
        assert body["settled_by"] == {"source": "deadline", "actor": None}
        assert (body["cancelled_at"], body["escalated_at"]) == ((None, at) if tx_id in risky else (at, None))
        assert [(x["action"], x["source"], x["at"]) for x in body["history"]] == [(outcome, "deadline", at)]
        assert [e["type"] for e in body["events"]] == [f"transaction.{outcome}"]
