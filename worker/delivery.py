"""Deliver one delivery: re-check the transaction, render, send, record. Idempotent by construction:
only a delivery still ``queued`` is sent, and the row lock makes duplicates wait and then do nothing.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from jinja2 import TemplateError

from .contacts import CONTACT_FIELD, all_pairs, usable
from .decisions import notice_status
from .errors import PermanentSendError, SendError, TransientSendError, Unavailable
from .inflight import Gather, ProviderSlots, SendPool, Unlimited
from .links import confirm_url
from .masking import mask_recipient
from .outcomes import Outcomes
from .pricing import calling_code
from .render import Templates, facts_for
from .senders import OutgoingMessage, Sender
from .sms import segments
from .store import PENDING, Store

log = logging.getLogger("remind.delivery")

#: How long a customer asked by ops to verify a transfer has to answer by the link.
REVIEW_ANSWER_TIME = timedelta(hours=48)


def required_status(d: dict[str, Any]) -> tuple[str, ...]:
    """The status its transaction must still have when a delivery goes out: a reminder while it is
    pending; a notice only while the transaction still has that notice's own outcome, so an "under
    review" notice never follows a cancellation, nor a cancellation notice a confirmation."""
    if d["kind"] == "reminder":
        return (PENDING,)
    status = notice_status(d["step"])
    return (status,) if status else ()


@dataclass(frozen=True)
class DeliveryOptions:
    public_base: str
    secret_key: str
    restart_url: str
    lease: timedelta
    max_attempts: int


def build_messages(d: dict[str, Any], tx: dict[str, Any], templates: Templates, opts: DeliveryOptions,
                   now: datetime, recipients: list[str],
                   facts_cache: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[OutgoingMessage]:
    """The rendered message(s) for one delivery: one per usable push token, else exactly one.

    ``facts_cache`` shares the signed link and formatted facts between the channels of one step."""
    content = tx["content"]
    key = (tx["id"], d["step"])
    facts = facts_cache.get(key) if facts_cache is not None else None
    if facts is None:
        # A review contact goes out after the deadline (that is when the transaction escalated): its link
        # and the time it names are the customer's time to answer, from now.
        deadline = max(tx["deadline"], now + REVIEW_ANSWER_TIME) if d["step"].startswith("contact") else tx["deadline"]
        link = confirm_url(opts.public_base, opts.secret_key, tx["id"], deadline)
        facts = facts_for(content, templates=templates, now=now, deadline=deadline, confirm_url=link,
                          restart_url=opts.restart_url, step=d["step"], reason=tx["status_reason"] or "")
        if facts_cache is not None:
            facts_cache[key] = facts
    link = facts["confirm_url"]
    locale = content["customer"].get("locale") or "en"
    rendered = templates.render(d["template"], d["channel"], locale, facts)
    data = {"confirm_url": link, "transaction_id": tx["id"]} if d["kind"] == "reminder" or d["step"].startswith(
        "contact") else {"transaction_id": tx["id"]}
    if d["kind"] == "notice" and tx["status"] == "cancelled" and facts["restart_url"]:
        data["restart_url"] = facts["restart_url"]  # the platform's page for starting again, when it has one
    return [OutgoingMessage(tx["id"], d["step"], d["channel"], r, rendered.body, rendered.subject,
                            rendered.html, d["variant"], data, idempotency_key=f"dl_{d['id']}",
                            expires_at=tx["deadline"] if d["kind"] == "reminder" else None)
            for r in recipients]


@dataclass
class _Ready:
    """A delivery rendered and waiting for its claim and provider call."""

    d: dict[str, Any]
    tx: dict[str, Any]
    messages: list[OutgoingMessage]
    sender: Sender | None
    required: tuple[str, ...] | None  # the transaction statuses it may still go out in
    failure: str | None = None  # why it cannot go out (recorded once it is claimed)
    attempts: int = 0  # set by the claim


def _skip(d: dict[str, Any], why: str) -> dict[str, Any]:
    return {"id": d["id"], "status": "skipped", "lease_until": None, "reason": f"not sent: {why}"}


@dataclass
class BatchResult:
    """What a batch did: an outcome per delivery id, and the ones to send again (with their error)."""

    outcomes: dict[int, str] = field(default_factory=dict)
    retry: dict[int, TransientSendError] = field(default_factory=dict)
    #: Held back by a provider's limit (ours or its 429): sent again after a pause, no attempt used.
    throttled: dict[int, TransientSendError] = field(default_factory=dict)


class Deliverer:
    def __init__(self, store: Store, templates: Callable[[], Templates], senders: Mapping[str, Sender],
                 opts: DeliveryOptions, outcomes: Outcomes, *, pool: SendPool | None = None,
                 slots: ProviderSlots | None = None, slot_wait: float = 5.0) -> None:
        self.store = store
        self.templates = templates
        self.senders = senders
        self.opts = opts
        self.outcomes = outcomes
        #: Sends a batch's deliveries at once; slots: the providers' in-flight limits (see inflight.py).
        self.pool = pool or SendPool(1)
        self.slots: ProviderSlots = slots or Unlimited()
        #: How long a send waits for room at its provider before it is handed back as throttled.
        self.slot_wait = slot_wait
        #: Claims and results of the sends in flight, gathered into one statement per round trip.
        self._claim = Gather(self._claim_bulk)
        self._record = Gather(self._record_bulk)
        #: Set by the broker wiring: throttle(channel) -> False when the provider's rate limit is reached.
        self.throttle: Callable[[str], bool] | None = None

    def deliver(self, delivery_id: int) -> str:
        """Send one delivery; returns the outcome. Raises TransientSendError after recording it,
        so the caller (the actor) retries with backoff."""
        result = self.deliver_many([delivery_id])
        again = result.retry.get(delivery_id) or result.throttled.get(delivery_id)
        if again is not None:
            raise again
        return result.outcomes.get(delivery_id, "duplicate")

    def deliver_many(self, ids: Sequence[int]) -> BatchResult:
        """Send a batch. One read decides and renders every delivery of the batch; then the pool sends
        them all at once, each on its own: wait for room at its provider, claim (queued -> sending,
        re-checking its transaction under a share lock), send, and write its result as the provider
        answers. So each delivery is decided exactly as if it came alone, no database connection is
        held while a provider call is in flight, and a worker killed mid-batch leaves only the sends
        in flight as "outcome unknown"; the ones not yet claimed stay queued, and the lease sends them.

        Only the worker that claimed a delivery finishes it (sent, failed, retrying): a duplicate
        message finds it claimed and leaves it alone. Transient failures are recorded (back to
        ``queued``) and returned in ``retry``; deliveries the providers' limits held back are returned
        in ``throttled``, with none of their attempts used. The caller schedules both."""
        result = BatchResult()
        items: list[_Ready] = []
        with self.store.begin() as conn:
            rows, txs = self.store.queued_deliveries(conn, ids)
            now = self.store.clock()
            pairs = {p for tx in txs.values() for p in all_pairs(tx["content"]["customer"])}
            suppressed = self.store.suppressed(conn, pairs) if pairs else set()
            skipped: list[dict[str, Any]] = []
            facts_cache: dict[tuple[str, str], dict[str, Any]] = {}
            for d in rows:
                tx = txs[d["transaction_id"]]
                required = required_status(d)
                if required is not None and tx["status"] not in required:
                    skipped.append(_skip(d, f"the transaction was {tx['status']} first"))
                    result.outcomes[d["id"]] = "skipped"
                    continue
                if d["kind"] == "reminder" and tx["deadline"] <= now:  # the tick is about to settle it
                    skipped.append(_skip(d, "the deadline passed first"))
                    result.outcomes[d["id"]] = "skipped"
                    continue
                items.append(self._prepare(d, tx, required, suppressed, now, facts_cache))
            self.store.update_deliveries(conn, skipped, if_status="queued")
        for delivery_id, outcome, again, written in self.pool.run(self._deliver_one, items):
            if written is not None:
                written.result()  # the result is in the store before anyone sends this delivery again
            result.outcomes[delivery_id] = outcome
            if again is not None:
                (result.throttled if again.throttled else result.retry)[delivery_id] = again
        if result.outcomes:
            log.info("batch of %d: %s", len(result.outcomes), ", ".join(
                f"{n} {outcome}" for outcome, n in sorted(Counter(result.outcomes.values()).items())))
        return result

    def _deliver_one(self, item: _Ready) -> tuple[int, str, TransientSendError | None, Future | None]:
        """One delivery of a batch, on a pool thread: room at the provider, claim, send, record (the
        record is handed over without waiting: the batch collects it before it returns)."""
        delivery_id, channel = item.d["id"], item.d["channel"]
        slot = "-"
        if item.failure is None:
            if self.throttle is not None and not self.throttle(channel):
                # Left queued with its lease: the caller sends it again after the pause.
                return delivery_id, "throttled", TransientSendError(
                    f"{channel} rate limit reached", retry_after=0.5 + random.random(), throttled=True), None
            try:
                slot = self.slots.acquire(channel, self.slot_wait)
            except Exception as exc:  # noqa: BLE001 - Redis away: nothing claimed, try again later
                log.warning("%s: no in-flight slot (%s); will retry", channel, type(exc).__name__)
                slot = None
            if slot is None:
                return delivery_id, "throttled", TransientSendError(
                    f"{channel}: the provider's limit of requests in flight is reached",
                    retry_after=0.5 + random.random(), throttled=True), None
        held = [slot]

        def release() -> None:  # as soon as the provider answered, before the result is written
            if held:
                self.slots.release(channel, held.pop())

        try:
            return self._claim_and_send(item, release)
        finally:
            release()

    def _claim_and_send(self, item: _Ready, release: Callable[[], None]) -> tuple[
            int, str, TransientSendError | None, Future | None]:
        delivery_id = item.d["id"]
        attempts = self._claim((delivery_id, item.required))
        if attempts is None:
            return delivery_id, self._not_claimed(item), None, None
        item.attempts = attempts
        if item.failure is not None:
            log.error("delivery %s of %s failed: %s", delivery_id, item.tx["id"], item.failure)
            self.outcomes.failed(delivery_id, item.failure)
            return delivery_id, "failed", None, None
        try:
            outcome, record, again = self._send(item, release)
        except Exception as exc:  # noqa: BLE001 - one broken send must not sink the batch
            log.exception("%s %s %s: the send raised", item.d["transaction_id"], item.d["step"], item.d["channel"])
            outcome, again, record = "failed", None, {
                "id": delivery_id, "status": "failed", "lease_until": None,
                "reason": f"outcome unknown: the send raised {type(exc).__name__}; not resent"}
        return delivery_id, outcome, again, self._record.submit(record) if record is not None else None

    def _claim_bulk(self, claims: list[tuple[int, tuple[str, ...] | None]]) -> list[int | None]:
        """The attempt number of each claim, None where it was not claimed. An id asked twice at once
        (duplicate messages in one process) is given to the first asker only."""
        now = self.store.clock()
        with self.store.autocommit() as conn:
            claimed = self.store.claim_deliveries(conn, claims, now, now + self.opts.lease)
        return [claimed.pop(delivery_id, None) for delivery_id, _ in claims]

    def _record_bulk(self, records: list[dict[str, Any]]) -> list[None]:
        # Only over our own claim: a status callback (delivered) or the lease (failed) may have
        # written first, and their word stands.
        early = self._while_the_database_is_down(lambda: self._write_results(records), len(records))
        self.outcomes.apply_early_callbacks(early)  # status callbacks that came before the provider id
        return [None] * len(records)

    def _write_results(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self.store.autocommit() as conn:
            self.store.update_deliveries(conn, records, if_status="sending")
            return self.store.take_early_callbacks(conn, [r["provider_id"] for r in records if r.get("provider_id")])

    def _while_the_database_is_down(self, write: Callable[[], Any], count: int) -> Any:
        """``write()``, tried again while the database is unreachable, for up to a lease: the provider has
        these messages, and without their result the lease would record them as "outcome unknown"."""
        give_up = time.monotonic() + self.opts.lease.total_seconds()
        pause = 0.5
        while True:
            try:
                return write()
            except Exception as exc:
                outage = Unavailable.of(exc)
                if outage is None or time.monotonic() + pause > give_up:
                    raise
                log.warning("the results of %d sends wait for the database: %s", count, outage.reason)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _prepare(self, d: dict[str, Any], tx: dict[str, Any], required: tuple[str, ...] | None,
                 suppressed: set[tuple[str, str]], now: datetime,
                 facts_cache: dict[tuple[str, str], dict[str, Any]]) -> _Ready:
        """Render one delivery, or say why it cannot go out (a failure, recorded once it is claimed)."""
        sender = self.senders.get(d["channel"])
        try:
            recipients: list[str] = []
            if d["channel"] in CONTACT_FIELD:
                recipients, why = usable(tx["content"]["customer"], d["channel"], suppressed)
            if sender is None:
                raise PermanentSendError(f"no sender is configured for channel {d['channel']}")
            if d["channel"] in CONTACT_FIELD and not recipients:
                raise PermanentSendError(f"not sent: {why}")
            messages = build_messages(d, tx, self.templates(), self.opts, now, recipients, facts_cache)
        except PermanentSendError as exc:
            return _Ready(d, tx, [], sender, required, failure=exc.reason)
        except TemplateError as exc:
            return _Ready(d, tx, [], sender, required, failure=f"template error: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug or odd data here fails this delivery, not the batch
            log.exception("%s %s %s: could not be prepared", d["transaction_id"], d["step"], d["channel"])
            return _Ready(d, tx, [], sender, required, failure=f"could not be prepared: {type(exc).__name__}")
        return _Ready(d, tx, messages, sender, required)

    def _not_claimed(self, item: _Ready) -> str:
        """Between the batch's read and the claim, another worker took the delivery (a duplicate
        message), or its transaction moved on (confirmed, say): then it is skipped, as it would be alone."""
        tx = self.store.get_transaction(item.tx["id"])
        if item.required is not None and tx is not None and tx["status"] not in item.required:
            self.store.update_deliveries(None, [_skip(item.d, f"the transaction was {tx['status']} first")],
                                         if_status="queued")
            return "skipped"
        return "duplicate"

    def _send_all(self, d: dict[str, Any], tx: dict[str, Any], messages: list[OutgoingMessage],
                  sender: Sender) -> list[str | None]:
        """Send each message. A push token reported unregistered is dropped for good. When some of a
        customer's devices got the push, the delivery is sent: retrying would push the others twice."""
        provider_ids: list[str | None] = []
        errors: list[SendError] = []
        for message in messages:
            try:
                provider_ids.append(sender.send(message))
            except SendError as exc:
                if d["channel"] == "push" and exc.code == "UNREGISTERED":
                    self.store.suppress(None, "push", message.recipient, tx["customer_id"],
                                        "the push provider reported the token unregistered")
                elif len(messages) == 1:
                    raise
                errors.append(exc)
        if not provider_ids:
            if all(e.code == "UNREGISTERED" for e in errors):
                raise PermanentSendError("every push token was reported unregistered", code="UNREGISTERED")
            raise next((e for e in errors if e.transient), errors[0])
        if errors:
            log.warning("%s %s push: %d of %d devices failed (%s); the others got it", d["transaction_id"],
                        d["step"], len(errors), len(messages), errors[0].reason)
        return provider_ids

    def _send(self, item: _Ready, release: Callable[[], None]) -> tuple[
            str, dict[str, Any] | None, TransientSendError | None]:
        """Call the provider for one delivery: (outcome, the row change to write, the error to retry).
        A permanent failure is handed to Outcomes here, which writes it (and may fall back)."""
        d, messages = item.d, item.messages
        limit = self.opts.max_attempts
        try:
            try:
                provider_ids = self._send_all(d, item.tx, messages, item.sender)
            finally:
                release()
        except TransientSendError as exc:
            now = self.store.clock()
            if exc.throttled:  # the provider did not look at it: this attempt does not count
                log.warning("%s %s %s throttled by the provider, will retry: %s", d["transaction_id"], d["step"],
                            d["channel"], exc.reason)
                return "throttled", {"id": d["id"], "status": "queued", "reason": f"retrying: {exc.reason}",
                                     "attempts": item.attempts - 1, "lease_until": now + self.opts.lease}, exc
            if item.attempts >= limit:
                self.outcomes.failed(d["id"], f"gave up after {item.attempts} attempts: {exc.reason}")
                log.error("%s %s %s gave up after %d attempts: %s", d["transaction_id"], d["step"],
                          d["channel"], item.attempts, exc.reason)
                return "failed", None, None
            retry = {"id": d["id"], "status": "queued", "reason": f"retrying: {exc.reason}",
                     "lease_until": now + self.opts.lease}
            log.warning("%s %s %s attempt %d failed, will retry: %s", d["transaction_id"], d["step"],
                        d["channel"], item.attempts, exc.reason)
            return "retrying", retry, exc
        except PermanentSendError as exc:
            self.outcomes.failed(d["id"], exc.reason, code=exc.code)
            log.error("%s %s %s refused: %s", d["transaction_id"], d["step"], d["channel"], exc.reason)
            return "failed", None, None
        now = self.store.clock()
        keep = d["reason"] if d["reason"] and not d["reason"].startswith("retrying") else None
        billed = sum(segments(m.body).segments for m in messages) if d["channel"] == "sms" else None
        sent = {"id": d["id"], "status": "sent", "sent_at": now, "lease_until": None, "reason": keep,
                "segments": billed, "provider_id": next((p for p in provider_ids if p), None),
                "country_code": calling_code(messages[0].recipient) if billed is not None and messages else None}
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sent %s %s to %s · %s", d["step"], d["channel"],
                      ", ".join(mask_recipient(m.channel, m.recipient) for m in messages) or "-", d["transaction_id"])
        return "sent", sent, None
