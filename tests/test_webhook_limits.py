"""Body limits per route: SendGrid's event batches (768 KB and more) get in whole; any body past its
route's limit is refused with 413 as soon as it passes the limit, whatever Content-Length says."""

from __future__ import annotations

import base64
import json
import time

import anyio
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.testclient import TestClient

from worker.web.app import create_app

EVENTS = "/webhooks/sendgrid/events"
KIB = 1024
CHUNK = 64 * KIB


@pytest.fixture
def web(make_harness):
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    h = make_harness(start_worker=False, sendgrid_event_public_key=base64.b64encode(der).decode(),
                     api_tokens="limit-token")
    app = create_app(h.remind)
    with TestClient(app) as client:
        yield h, app, client, key


def signed(key, body: bytes) -> dict[str, str]:
    timestamp = str(int(time.time()))
    signature = base64.b64encode(key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    return {"X-Twilio-Email-Event-Webhook-Signature": signature,
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp, "content-type": "application/json"}


def event(i: int, kind: str) -> dict:
    """One event as SendGrid posts it, with the fields it adds to every event."""
    return {"email": f"customer{i}@example.com", "timestamp": int(time.time()), "event": kind,
            "sg_event_id": f"sg_event_id_{i:06d}_aGVsbG8gd29ybGQgdGhpcyBpcyBhbiBldmVudA",
            "sg_message_id": f"14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.{i}",
            "category": ["transfer-reminder", "final_warning"], "asm_group_id": 4242,
            "useragent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15",
            "ip": "203.0.113.7", "delivery_key": None}


def suppressed(h, addresses: list[str]) -> set[str]:
    with h.remind.store.begin() as conn:
        return {a for _c, a in h.remind.store.suppressed(conn, [("email", a) for a in addresses])}


def test_a_signed_batch_of_250_unsubscribes_over_64_kib_is_accepted_and_applied(web):
    h, _app, client, key = web
    events = [event(i, "unsubscribe") for i in range(250)]
    body = json.dumps(events).encode()
    assert len(body) > 64 * KIB  # the old global limit, which answered 413 to SendGrid
    response = client.post(EVENTS, content=body, headers=signed(key, body))
    assert response.status_code == 204, response.text
    assert suppressed(h, [e["email"] for e in events]) == {e["email"] for e in events}


def test_the_event_route_takes_a_batch_over_1_mib(web):
    h, _app, client, key = web
    events = [event(i, "open") for i in range(2600)] + [event(9999, "spamreport")]
    body = json.dumps(events).encode()
    assert len(body) > 1024 * KIB
    assert client.post(EVENTS, content=body, headers=signed(key, body)).status_code == 204
    assert suppressed(h, ["customer9999@example.com"]) == {"customer9999@example.com"}


async def stream(app, path: str, body: bytes | int, content_length: str | None,
                 headers: dict[str, str]) -> tuple[int, int]:
    """POST ``body`` (or that many spaces) in 64 KiB chunks straight into the ASGI app, as a server does
    with a chunked body or a Content-Length that lies. Returns (status, bytes the app read)."""
    total = body if isinstance(body, int) else len(body)
    sent = {"bytes": 0}
    status: list[int] = []

    async def receive() -> dict:
        if sent["bytes"] >= total:
            await anyio.sleep(3600)  # the client says nothing more
        start = sent["bytes"]
        size = min(CHUNK, total - start)
        sent["bytes"] += size
        chunk = b" " * size if isinstance(body, int) else body[start:start + size]
        return {"type": "http.request", "body": chunk, "more_body": sent["bytes"] < total}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if content_length is not None:
        raw.append((b"content-length", content_length.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": raw,
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    with anyio.fail_after(30):
        await app(scope, receive, send)
    return status[0], sent["bytes"]


@pytest.mark.parametrize("content_length", ["100", None], ids=["false-content-length", "no-content-length"])
def test_a_body_past_its_routes_limit_is_413_without_reading_the_rest(web, content_length):
    h, app, _client, key = web
    # Under the SendGrid route's limit, streamed: read whole and applied (the old global limit refused it).
    body = json.dumps([event(1, "unsubscribe")]).encode() + b" " * (1024 * KIB)
    status, read = anyio.run(stream, app, EVENTS, body, content_length, signed(key, body))
    assert (status, read) == (204, len(body))
    assert suppressed(h, ["customer1@example.com"]) == {"customer1@example.com"}
    # Past the limit: refused as soon as the count passes it, not after reading all 12 MiB.
    status, read = anyio.run(stream, app, EVENTS, 12 * 1024 * KIB, content_length, signed(key, b"x"))
    assert status == 413 and read <= 4 * 1024 * KIB + CHUNK
    # Every other route keeps the default 64 KiB.
    status, read = anyio.run(stream, app, "/v1/transactions", 12 * 1024 * KIB, content_length,
                             {"authorization": "Bearer limit-token", "content-type": "application/json"})
    assert status == 413 and read <= 64 * KIB + CHUNK
