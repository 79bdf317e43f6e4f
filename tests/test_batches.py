"""First attempts travel in batches: the batch shares database round trips, never decisions. Each
delivery in it ends exactly as it would alone, and a duplicate batch sends nothing twice."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from support import T0, transaction

from worker.broker import chunks
from worker.errors import PermanentSendError, TransientSendError
from worker.inflight import SendPool
from worker.senders import OutboxSender


class ByToken:
    """A push sender whose answer depends on the token: refused for good, failing once, or fine."""

    name = "by-token"

    def __init__(self, outbox) -> None:
        self.inner = OutboxSender(outbox)
        self.calls: list[str] = []

    def send(self, message):
        self.calls.append(message.recipient)
        if message.recipient == "refused-token":
            raise PermanentSendError("provider code INVALID_ARGUMENT", code="INVALID_ARGUMENT")
        if message.recipient == "flaky-token" and self.calls.count("flaky-token") == 1:
            raise TransientSendError("provider said 503", retry_after=2.0)
        return self.inner.send(message)


def nudge(h, tx_id):
    """The stored deliveries of the first step, by channel."""
    return {d["channel"]: d for d in h.remind.store.deliveries_of(tx_id) if d["step"] == "nudge"}


def test_each_delivery_in_a_batch_ends_as_it_would_alone(make_harness, tmp_path):
    push = ByToken(tmp_path / "outbox.jsonl")
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(start_worker=False, senders={"sms": outbox, "email": outbox, "push": push})
    tokens = {"tx_confirmed": "token-a", "tx_refused": "refused-token", "tx_flaky": "flaky-token", "tx_fine": "token-b"}
    for tx_id, token in tokens.items():
        h.remind.register(transaction(tx_id, customer={"push_tokens": [token]}))
    ids = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    assert len(ids) == 4
    h.remind.confirm("tx_confirmed")  # after the tick, before the worker picks the batch up

    h.at(minutes=16, seconds=5)
    result = h.remind.deliverer.deliver_many(ids)

    assert sorted(result.outcomes.values()) == ["failed", "retrying", "sent", "skipped"]
    assert list(result.retry) == [nudge(h, "tx_flaky")["push"]["id"]]
    assert result.retry[nudge(h, "tx_flaky")["push"]["id"]].retry_after == 2.0
    assert nudge(h, "tx_confirmed")["push"]["status"] == "skipped"
    assert nudge(h, "tx_confirmed")["push"]["reason"] == "not sent: the transaction was confirmed first"
    refused = nudge(h, "tx_refused")
    assert refused["push"]["status"] == "failed" and refused["push"]["reason"].endswith("falling back to sms")
    assert refused["sms"]["status"] == "queued"  # the fallback is a delivery of its own, enqueued
    flaky = nudge(h, "tx_flaky")["push"]
    assert flaky["status"] == "queued" and flaky["reason"] == "retrying: provider said 503" and flaky["attempts"] == 1
    fine = nudge(h, "tx_fine")["push"]
    assert fine["status"] == "sent" and fine["attempts"] == 1
    assert sorted(push.calls) == ["flaky-token", "refused-token", "token-b"]  # nothing for the confirmed one

    # The same batch again (a redelivered message): only the delivery still queued goes out.
    again = h.remind.deliverer.deliver_many(ids)
    assert again.outcomes == {flaky["id"]: "sent"} and not again.retry
    assert sorted(push.calls) == ["flaky-token", "flaky-token", "refused-token", "token-b"]
    assert nudge(h, "tx_flaky")["push"]["attempts"] == 2
    sent = [(line["transaction_id"], line["channel"]) for line in h.lines()]
    assert sorted(sent) == [("tx_fine", "push"), ("tx_flaky", "push")]


def test_a_batch_of_duplicate_ids_sends_once(make_harness):
    h = make_harness(start_worker=False)
    h.remind.register(transaction())
    [delivery_id] = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    result = h.remind.deliverer.deliver_many([delivery_id, delivery_id])
    assert result.outcomes == {delivery_id: "sent"}
    assert len(h.lines()) == 1


def test_the_actors_retry_a_batch_member_alone_until_it_is_sent(make_harness, tmp_path):
    push = ByToken(tmp_path / "outbox.jsonl")
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(senders={"sms": outbox, "email": outbox, "push": push})
    for tx_id, token in {"tx_a": "token-a", "tx_b": "flaky-token", "tx_c": "token-c"}.items():
        h.remind.register(transaction(tx_id, customer={"push_tokens": [token]}))
    h.at(minutes=16).tick()
    assert sorted(push.calls) == ["flaky-token", "flaky-token", "token-a", "token-c"]
    assert [nudge(h, t)["push"]["status"] for t in ("tx_a", "tx_b", "tx_c")] == ["sent"] * 3
    assert nudge(h, "tx_b")["push"]["attempts"] == 2


def test_a_tick_spreads_small_batches_and_caps_large_ones():
    assert chunks([1, 2, 3], 20) == [[1], [2], [3]]  # few deliveries: one per thread, in parallel
    assert [len(b) for b in chunks(list(range(40)), 20)] == [5] * 8
    large = chunks(list(range(10_000)), 20)
    assert len(large) == 500 and {len(b) for b in large} == {20}
    assert [i for b in large for i in b] == list(range(10_000))  # order kept: a step's channels stay together


class Dies(BaseException):
    """The worker process dying in the middle of a provider call (SIGKILL cannot be caught; this can)."""


class HangsUntilKilled:
    """A provider that takes every request and never answers, until the test "kills" the worker."""

    name = "hangs"

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.killed = threading.Event()

    def send(self, message):
        self.entered.release()
        self.killed.wait(30)
        raise Dies()


def test_a_worker_killed_with_sends_in_flight_loses_exactly_those_and_the_lease_sends_the_rest(
        make_harness, tmp_path):
    hangs = HangsUntilKilled()
    h = make_harness(start_worker=False, senders={"push": hangs}, lease_seconds=30)
    for i in range(10):
        h.remind.register(transaction(f"tx_{i}"))
    ids = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    assert len(ids) == 10
    h.remind.deliverer.pool = SendPool(4)  # room for 4 sends in flight in this process
    dying = threading.Thread(target=lambda: pytest.raises(Dies, h.remind.deliverer.deliver_many, ids), daemon=True)
    dying.start()
    try:
        for _ in range(4):
            assert hangs.entered.acquire(timeout=10)
        assert not hangs.entered.acquire(timeout=0.3)  # the pool holds the others back
        status = [nudge(h, f"tx_{i}")["push"]["status"] for i in range(10)]
        assert sorted(status) == ["queued"] * 6 + ["sending"] * 4  # the worker dies here

        result = h.remind.tick(T0 + timedelta(minutes=17))  # the lease ran out
        assert result.lost_in_send == 4 and result.recovered == 6
        h.remind.senders["push"] = h.remind.deliverer.senders["push"] = OutboxSender(tmp_path / "outbox.jsonl")
        h.remind.deliverer.pool = SendPool(8)  # the worker that picks up the re-enqueued messages
        assert set(h.remind.deliverer.deliver_many(result.enqueued).outcomes.values()) == {"sent"}
    finally:
        hangs.killed.set()
        dying.join(10)
    pushes = [nudge(h, f"tx_{i}")["push"] for i in range(10)]
    lost = [p for p in pushes if p["status"] == "failed"]
    assert len(lost) == 4 and all("outcome unknown" in p["reason"] for p in lost)  # never resent
    assert sorted(line["transaction_id"] for line in h.lines()) == sorted(
        p["transaction_id"] for p in pushes if p["status"] == "sent")
    assert len(h.lines()) == 6


class ConfirmsMidBatch:
    """While the first push is out, the customer confirms another transaction of the same batch."""

    name = "confirms"

    def __init__(self, outbox, confirm) -> None:
        self.inner = OutboxSender(outbox)
        self.confirm = confirm

    def send(self, message):
        if message.transaction_id == "tx_a":
            self.confirm("tx_b")
        return self.inner.send(message)


def test_a_confirmation_during_the_batch_stops_its_later_reminders(make_harness, tmp_path):
    box = {}
    push = ConfirmsMidBatch(tmp_path / "outbox.jsonl", lambda tx_id: box["h"].remind.confirm(tx_id))
    h = box["h"] = make_harness(start_worker=False, senders={"push": push})
    h.remind.deliverer.pool = SendPool(1)  # tx_b's reminder waits for room while tx_a's is out
    for tx_id in ("tx_a", "tx_b"):
        h.remind.register(transaction(tx_id))
    ids = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    result = h.remind.deliverer.deliver_many(ids)
    assert sorted(result.outcomes.values()) == ["sent", "skipped"]
    assert nudge(h, "tx_b")["push"]["reason"] == "not sent: the transaction was confirmed first"
    assert [line["transaction_id"] for line in h.lines()] == ["tx_a"]


class RaisesFor:
    """A sender that breaks (not a provider answer: a bug) for one transaction, and sends the rest."""

    name = "raises"

    def __init__(self, outbox, tx_id: str) -> None:
        self.inner = OutboxSender(outbox)
        self.tx_id = tx_id

    def send(self, message):
        if message.transaction_id == self.tx_id:
            raise RuntimeError("a bug in the sender")
        return self.inner.send(message)


def test_a_send_that_raises_fails_alone_and_is_not_resent(make_harness, tmp_path):
    push = RaisesFor(tmp_path / "outbox.jsonl", "tx_b")
    h = make_harness(start_worker=False, senders={"push": push})
    for tx_id in ("tx_a", "tx_b", "tx_c"):
        h.remind.register(transaction(tx_id))
    ids = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    result = h.remind.deliverer.deliver_many(ids)
    assert sorted(result.outcomes.values()) == ["failed", "sent", "sent"] and not result.retry
    broken = nudge(h, "tx_b")
    assert set(broken) == {"push"}  # the provider may have it: no fallback, no resend
    assert broken["push"]["reason"] == "outcome unknown: the send raised RuntimeError; not resent"
    assert sorted(line["transaction_id"] for line in h.lines()) == ["tx_a", "tx_c"]


def test_a_delivery_that_cannot_be_prepared_falls_back_without_holding_up_the_batch(make_harness, tmp_path):
    outbox = OutboxSender(tmp_path / "outbox.jsonl")
    h = make_harness(start_worker=False, senders={"sms": outbox, "email": outbox, "push": outbox})
    for tx_id in ("tx_a", "tx_b"):
        h.remind.register(transaction(tx_id))
    ids = h.remind.tick(T0 + timedelta(minutes=16)).enqueued
    templates = h.remind.deliverer.templates

    class Broken:  # odd data for one transaction makes rendering raise (not a TemplateError)
        def __getattr__(self, name):
            return getattr(templates(), name)

        def render(self, template, channel, locale, facts):
            if facts["transaction_id"] == "tx_b":
                raise ValueError("odd data")
            return templates().render(template, channel, locale, facts)

    h.remind.deliverer.templates = Broken
    result = h.remind.deliverer.deliver_many(ids)
    assert sorted(result.outcomes.values()) == ["failed", "sent"]
    broken = nudge(h, "tx_b")
    assert broken["push"]["status"] == "failed"
    assert broken["push"]["reason"] == "could not be prepared: ValueError; falling back to sms"
    assert broken["sms"]["status"] == "queued"
