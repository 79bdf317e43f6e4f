"""Sending events to the platform: Standard Webhooks, retried with backoff for REMIND_EVENT_RETRY_HOURS.

Events are written by whatever changed the transaction (``worker/decisions.py``, the tick, outcomes);
this module only sends them. Retries are planned in SQL (``events.next_attempt_at``), not as delayed
broker messages, so a platform that is down for days, or a broker restart, loses none: the tick hands
every event whose time came back to the workers.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from .errors import SendError
from .inflight import SendPool
from .senders import OutgoingMessage, Sender
from .store import Store
from .store.events import iso, public_id

log = logging.getLogger("remind.events")

#: The longest wait between two attempts, and the most a platform's Retry-After can ask for.
MAX_BACKOFF = timedelta(hours=1)
MAX_RETRY_AFTER = timedelta(hours=6)


def body(row: dict[str, Any]) -> str:
    """What the platform receives; the same bytes on every attempt."""
    return json.dumps({"type": row["type"], "timestamp": iso(row["created_at"]), "data": row["data"]},
                      sort_keys=True)


def next_attempt(attempts: int, now: datetime, give_up_at: datetime | None, *, first: timedelta,
                 retry_after: float | None = None, jitter: Callable[[], float] = random.random) -> datetime | None:
    """When to try again after ``attempts`` failed ones: exponential backoff from ``first`` up to an hour
    (or what the platform's Retry-After asks, up to 6 h), never later than ``give_up_at``, where the last
    attempt is made. None: that was the last attempt."""
    if give_up_at is None or now >= give_up_at:
        return None
    if retry_after is not None:
        wait = min(timedelta(seconds=max(retry_after, 0)), MAX_RETRY_AFTER)
    else:
        wait = min(first * (2 ** min(attempts - 1, 30)), MAX_BACKOFF)
        wait *= 0.8 + 0.4 * jitter()  # platforms coming back up do not get every retry at once
    return min(now + wait, give_up_at)


class EventSender:
    """Sends claimed events, several at once on the send pool, and records each outcome."""

    def __init__(self, store: Store, sender: Sender | None, url: str | None, pool: SendPool, *,
                 first_backoff: timedelta) -> None:
        self.store = store
        self.sender = sender
        self.url = url
        self.pool = pool
        self.first_backoff = first_backoff

    def send(self, ids: Sequence[int]) -> dict[int, str]:
        """Send these events (the ones still pending; a duplicate message does nothing).
        Returns {event id: delivered | retrying | failed}."""
        if self.sender is None or not self.url:
            return {}
        rows = self.store.events.claim(ids, self.store.clock())
        moved = self._moved_on(rows)
        if moved:
            self.store.events.superseded(list(moved))
            rows = [r for r in rows if r["id"] not in moved]
        return {row["id"]: outcome for row, outcome in zip(rows, self.pool.run(self._send_one, rows), strict=True)}

    def _moved_on(self, rows: list[dict[str, Any]]) -> set[int]:
        """Status events whose transaction has another status now (escalated, then settled by ops before
        the escalation went out): sending them would tell the platform a state that is over."""
        status_events = [r for r in rows if r["type"].startswith("transaction.")]
        if not status_events:
            return set()
        now = self.store.statuses(sorted({r["data"]["id"] for r in status_events}))
        moved = set()
        for r in status_events:
            current = now.get(r["data"]["id"], r["data"]["status"])
            if current != r["data"]["status"]:
                log.info("%s %s not sent: %s is %s now; its newer event says so", public_id(r["id"]), r["type"],
                         r["data"]["id"], current)
                moved.add(r["id"])
        return moved

    def _send_one(self, row: dict[str, Any]) -> str:
        message = OutgoingMessage(row["data"]["id"], row["type"], "webhook", self.url or "", body(row),
                                  idempotency_key=public_id(row["id"]))
        try:
            self.sender.send(message)
        except SendError as exc:
            now = self.store.clock()
            retry_at = next_attempt(row["attempts"], now, row["give_up_at"], first=self.first_backoff,
                                    retry_after=getattr(exc, "retry_after", None))
            self.store.events.not_delivered(row["id"], exc.reason, retry_at)
            if retry_at is None:
                log.error("%s %s: gave up after %d attempts: %s; `remind events resend %s` sends it again",
                          public_id(row["id"]), row["type"], row["attempts"], exc.reason, public_id(row["id"]))
                return "failed"
            log.warning("%s %s: attempt %d failed (%s); next at %s", public_id(row["id"]), row["type"],
                        row["attempts"], exc.reason, iso(retry_at))
            return "retrying"
        self.store.events.delivered(row["id"], self.store.clock())
        return "delivered"
