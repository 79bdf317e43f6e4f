"""The Python API, and the one place the parts are wired together. CLI, actors and web call this.

    >>> remind = Remind.from_settings(Settings())
    >>> remind.register(payload)            # -> Registration(created=True, ...)
    >>> remind.confirm("tx_1")
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .contacts import CONTACT_FIELD
from .decisions import DECISION_TEMPLATES, Decision, Decisions, check_reason, check_text
from .delivery import Deliverer, DeliveryOptions
from .errors import AlreadySettled, ConfigError, Conflict, InvalidInput, NotFound, SettingsError
from .events import EventSender
from .inflight import LocalSlots, SendPool
from .ingest import Line, Transaction, differing_fields, parse_transaction
from .ladder import CHANNELS, Registry, Schedule, format_duration, load_dir, slots
from .masking import mask_recipient
from .outcomes import Outcomes
from .pricing import Pricing, file_signature, load_pricing
from .render import Templates
from .scheduler import Scheduler, TickResult
from .senders import Sender, check_channels, describe, senders_from_settings
from .settings import Settings
from .store import ESCALATED, PENDING, NewTransaction, Store, make_engine, upgrade
from .store.events import iso
from .store.events import parse_id as parse_event_id
from .store.events import public_id as public_event_id
from .store.events import view as event_view
from .store.repo import Erasure
from .timeline import build as build_timeline

log = logging.getLogger("remind")

#: The status reason of a pending transaction cancelled because its customer's data was erased.
ERASED_REASON = "customer_request"
#: How far the events feed stays behind now on PostgreSQL (see ``Remind.events``).
FEED_SETTLE = timedelta(seconds=2)
#: Settled transactions the retention sweep erases per database transaction, and at most per run.
RETENTION_BATCH, RETENTION_MOST = 500, 50_000


@dataclass(frozen=True)
class Registration:
    transaction_id: str
    created: bool  # False: the same transaction was registered before (a no-op)
    status: str
    schedule: str
    #: The template locale the customer's messages use (negotiated from customer.locale).
    locale: str = "en"
    #: customer.locale when no template locale speaks its language (messages fall back to ``locale``), else None.
    locale_requested: str | None = None


def load_config(settings: Settings) -> tuple[Registry, Templates]:
    """Templates and schedules, validated together; raises ConfigError listing every problem."""
    templates = Templates(settings.templates_dir)
    schedules = load_dir(settings.schedules_dir, templates.missing)
    problems = [p for t in DECISION_TEMPLATES for ch in CHANNELS for p in templates.missing(t, ch)]
    if problems:  # decisions (a cancel, a review) message the customer on any channel
        raise ConfigError(problems)
    return Registry(schedules), templates


def erase_contact(content: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The transaction without the customer's name, phone, email and push tokens. Their masks stay
    (``customer.masked``, by channel) so the timeline still says where each message went; the rest
    (amounts, times, ids) is kept. Also returns each removed value with its mask, to scrub elsewhere.
    Idempotent: erased content comes back unchanged."""
    customer = dict(content["customer"])
    masked: dict[str, str] = dict(customer.get("masked") or {})
    removed: list[tuple[str, str]] = []
    for channel, field in CONTACT_FIELD.items():
        value = customer.get(field)
        values = [v for v in (value if isinstance(value, list | tuple) else [value]) if v]
        if values:
            masked[channel] = mask_recipient(channel, values[0])  # what the timeline shows
            removed += [(v, mask_recipient(channel, v)) for v in values]
    customer.update(name="", phone=None, email=None, push_tokens=[], masked=masked, erased=True)
    return {**content, "customer": customer}, removed


#: A customer id as ingest accepts it, so every id that has transactions can be named for erasure.
_CUSTOMER_ID = TypeAdapter(Line)


def _customer_id_problem(customer_id: str) -> str | None:
    if not 1 <= len(customer_id) <= 128:
        return "1 to 128 characters"
    try:
        customer_id.encode("utf-8")
        _CUSTOMER_ID.validate_python(customer_id)
    except UnicodeEncodeError:
        return "contains invalid Unicode (a lone surrogate); send UTF-8 text"
    except ValidationError as exc:
        return exc.errors()[0]["msg"].removeprefix("Value error, ")
    return None


class Remind:
    """The service. Holds the last good schedules and templates; ``reload`` swaps them only when valid."""

    def __init__(self, settings: Settings, store: Store, registry: Registry, templates: Templates,
                 senders: Mapping[str, Sender], pricing: Pricing | None = None) -> None:
        self.settings = settings
        self.store = store
        self._registry = registry
        self._templates = templates
        self._pricing = pricing if pricing is not None else Pricing.none()
        self._said_no_pricing = False
        self._config_lock = threading.Lock()
        #: What the last hot reload did, for /readyz and /metrics.
        self.config_state: dict[str, Any] = {"ok": True, "error": None, "failures": 0, "at": None, "signature": None}
        self.senders = senders
        # Until a broker is bound (a CLI command): work is left to the next tick of a running scheduler.
        self.enqueue: Callable[[list[int]], None] = lambda ids: store.leave_to_tick(deliveries=ids)
        self.enqueue_events: Callable[[list[int]], None] = lambda ids: store.leave_to_tick(events=ids)
        lease = timedelta(seconds=settings.lease_seconds)
        store.events.deliver = bool(settings.platform_webhook_url)
        store.events.retry_window = timedelta(hours=settings.event_retry_hours)
        store.events.lease = lease
        self.outcomes = Outcomes(store, lambda: self._registry, lambda ids: self.enqueue(ids), lease=lease,
                                 enqueue_events=lambda ids: self.enqueue_events(ids))
        pool = SendPool(settings.send_concurrency)
        self.deliverer = Deliverer(store, lambda: self._templates, senders, DeliveryOptions(
            public_base=settings.public_base, secret_key=settings.secret_key,
            restart_url=settings.restart_url or "",  # none: the notice says how to start again in words
            lease=lease, max_attempts=settings.max_attempts), self.outcomes, pool=pool,
            slots=LocalSlots(settings.inflight_limits))
        self.event_sender = EventSender(store, senders.get("webhook"), settings.platform_webhook_url, pool,
                                        first_backoff=timedelta(milliseconds=settings.min_backoff_ms))
        self.decisions = Decisions(store, lambda: self._registry, lease=lease)
        self.config_state["signature"] = self._config_signature()
        self.scheduler = Scheduler(store, lambda: self._registry, lambda ids: self.enqueue(ids),
                                   batch_size=settings.batch_size, lease=lease,
                                   enqueue_events=lambda ids: self.enqueue_events(ids))

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, migrate: bool = True,
                      senders: Mapping[str, Sender] | None = None, clock=None) -> Remind:
        settings = settings or Settings()
        if not settings.secret_key and not settings.production:
            settings = settings.with_secret()  # development: a key generated once; production processes check theirs
        registry, templates = load_config(settings)
        pricing = load_pricing(settings.pricing_file)
        engine = make_engine(settings.database_url, connect_timeout=settings.db_connect_timeout,
                             tcp_timeout=settings.db_tcp_timeout)
        if migrate:
            upgrade(engine)
        store = Store(engine, clock=clock)
        chosen = {**senders_from_settings(settings, clock=store.clock), **(senders or {})}
        log.debug("senders: %s", describe(chosen))
        return cls(settings, store, registry, templates, chosen, pricing)

    # -- configuration ------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def templates(self) -> Templates:
        return self._templates

    @property
    def pricing(self) -> Pricing:
        """The last good price table (REMIND_PRICING_FILE); ``Pricing.none()`` when there is no file, which
        the first report asking for it says in the logs (once, and once again after a reload loses it)."""
        pricing = self._pricing
        if not pricing.available and not self._said_no_pricing:
            self._said_no_pricing = True
            log.info("no price table at %s (REMIND_PRICING_FILE): message costs are shown as null",
                     self.settings.pricing_file)
        return pricing

    def reload(self) -> None:
        """Load schedules, templates and the price table again (all or nothing); on ConfigError the running
        ones stay in use. In production a schedule may only use channels whose provider credentials are set,
        as at start (``check_channels``)."""
        registry, templates = load_config(self.settings)
        pricing = load_pricing(self.settings.pricing_file)
        try:
            check_channels(self.settings, registry.channels())
        except SettingsError as exc:
            raise ConfigError([f"{self.settings.schedules_dir}: {exc}"]) from None
        with self._config_lock:
            self._registry, self._templates, self._pricing = registry, templates, pricing
            self._said_no_pricing = self._said_no_pricing and not pricing.available

    def _config_signature(self) -> tuple:
        """Every configuration file's (path, mtime, size): read every REMIND_RELOAD_SECONDS by every process,
        with ``os.walk`` (half the CPU of ``Path.rglob`` on the ~200 template files)."""
        files = []
        for folder in (self.settings.schedules_dir, self.settings.templates_dir):
            for root, dirs, names in os.walk(folder):
                dirs.sort()
                for name in sorted(names):
                    path = os.path.join(root, name)
                    try:
                        stat = os.stat(path)
                    except OSError:  # removed between the listing and now: the next look sees it gone
                        continue
                    files.append((path, stat.st_mtime_ns, stat.st_size))
        files.append(file_signature(self.settings.pricing_file) or (str(self.settings.pricing_file), "missing"))
        return tuple(files)

    def reload_if_changed(self, *, reschedule: bool = False) -> bool | None:
        """Hot reload: None when nothing changed, True when the new files are in use, False when they
        were refused (logged with file, line and field; the last good configuration stays).

        ``reschedule`` (schedulers only): transactions on an edited schedule are looked at on the next
        tick, so steps the edit added follow the new ladder; steps already past stay past."""
        signature = self._config_signature()
        if signature == self.config_state["signature"]:
            return None
        self.config_state["signature"] = signature
        before = {s.name: s.version for s in self._registry}
        try:
            try:
                self.reload()
            except (ConfigError, OSError):
                raise
            except Exception as exc:  # noqa: BLE001 - a loader bug must still count as a refused reload
                raise ConfigError([f"{self.settings.schedules_dir}: could not be loaded: {exc!r}"]) from exc
        except OSError as exc:
            exc = ConfigError([f"configuration could not be read: {exc}"])
            self.config_state.update(ok=False, error=exc.problems[0], failures=self.config_state["failures"] + 1,
                                     at=self.store.clock())
            log.error("configuration reload refused: %s", exc.problems[0])
            return False
        except ConfigError as exc:
            self.config_state.update(ok=False, error=exc.problems[0], failures=self.config_state["failures"] + 1,
                                     at=self.store.clock())
            log.error("configuration reload refused; keeping the last good one:\n  %s", "\n  ".join(exc.problems))
            return False
        changed = [s.name for s in self._registry if before.get(s.name) != s.version]
        self.config_state.update(ok=True, error=None, at=self.store.clock())
        log.info("configuration reloaded; changed schedules: %s", ", ".join(changed) or "none")
        if reschedule and changed:
            touched = self.store.reschedule(changed, self.store.clock())
            log.info("%d pending transactions will follow the edited ladders from now on", touched)
        return True

    # -- the platform's calls -------------------------------------------------------------------

    def register(self, payload: Mapping[str, Any] | Transaction, *, now: datetime | None = None) -> Registration:
        """Register a pending transaction. The same id with the same content again is a no-op;
        with different content, Conflict names the fields that differ. A new transaction whose deadline
        has passed already (``expires_at``, or ``created_at`` plus the schedule's final step) is refused
        naming that field: nothing is stored and nothing is sent. A repeat is still a no-op after it."""
        if not isinstance(payload, Mapping | Transaction):
            raise InvalidInput({"(body)": "a JSON object describing one transaction"})
        omitted_created_at = not isinstance(payload, Transaction) and payload.get("created_at") is None
        now = now or self.store.clock()
        tx = parse_transaction(payload, now=now, refuse_past=False)
        content = tx.canonical()
        schedule = self._registry.choose(segment=tx.customer.segment, risk_flag=tx.risk_flag,
                                         amount=tx.amount, currency=tx.currency)
        deadline = schedule.deadline(tx.created_at, tx.expires_at)
        late = _deadline_passed(tx, schedule, now)
        if late:  # a repeat of a registered transaction still answers as one; a new one is refused
            existing = self.store.get_transaction(tx.id)
            if existing is None:
                raise InvalidInput(late)
        else:
            first = [s.at for s in slots(schedule, tx.created_at, deadline, tx.customer.timezone)]
            existing = self.store.insert_transaction(NewTransaction(
                id=tx.id, content=content, customer_id=tx.customer.id, segment=tx.customer.segment,
                risk_flag=tx.risk_flag, amount=tx.amount, currency=tx.currency, schedule=schedule.name,
                schedule_version=schedule.version, created_at=tx.created_at, expires_at=tx.expires_at,
                deadline=deadline, next_due_at=first[0] if first else deadline))
        if existing is None:
            log.info("registered %s on schedule %s, deadline %s", tx.id, schedule.name, deadline.isoformat())
            return Registration(tx.id, True, PENDING, schedule.name, self._templates.negotiate(tx.customer.locale),
                                None if self._templates.speaks(tx.customer.locale) else tx.customer.locale)
        if existing["content"]["customer"].get("erased"):  # the same transaction, but nothing of it is kept
            content = erase_contact(content)[0]
        diff = differing_fields(existing["content"], content, ignore_created_at=omitted_created_at)
        if diff:
            raise Conflict(tx.id, diff)
        return Registration(tx.id, False, existing["status"], existing["schedule"],
                            self._templates.negotiate(tx.customer.locale),
                            None if self._templates.speaks(tx.customer.locale) else tx.customer.locale)

    def confirm(self, tx_id: str, *, by_customer: bool = False, source: str = "platform", actor: str | None = None,
                note: str | None = None) -> dict[str, Any]:
        """Confirm (idempotent). Ops may confirm an escalated transaction after review; the customer's
        own link may not (that would override the review) unless ops asked the customer to verify it.
        A cancelled one cannot be confirmed. ``source``: platform (API), cli, ops, or customer."""
        return self._after(self.decisions.confirm(tx_id, source="customer" if by_customer else source,
                                                  actor=actor, note=note)).row

    def cancel(self, tx_id: str, reason: str, *, source: str = "platform", actor: str | None = None,
               note: str | None = None) -> dict[str, Any]:
        """Cancel: no more reminders, and the customer is told why (``reason``, a code) and how to start
        again. Idempotent; a confirmed transaction stays confirmed."""
        reason = check_reason(reason, default="customer_request")
        return self._after(self.decisions.cancel(tx_id, reason, source=source, actor=actor, note=note)).row

    def _after(self, decision: Decision) -> Decision:
        """Hand what a decision wrote to the workers, after its commit."""
        if decision.deliveries:
            self.enqueue(decision.deliveries)
        if decision.events:
            self.enqueue_events(decision.events)
        return decision

    # -- risk review ------------------------------------------------------------------------------

    def reviews(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """Escalated transactions, oldest escalation first, each with what was sent and what the customer
        and ops did."""
        return [review_view(self.show(row["id"])) for row in self.store.escalated(limit=limit)]

    def review(self, tx_id: str, action: str, *, actor: str | None, note: str | None = None,
               reason: str | None = None) -> dict[str, Any]:
        """One ops action on an escalated transaction: ``contact`` (ask the customer to verify),
        ``approve`` (confirm, tell the customer) or ``decline`` (cancel with ``reason``, tell the customer)."""
        actor = check_text("actor", actor, required=True, longest=128)
        note = check_text("note", note, required=False, longest=1000)
        row = self.store.get_transaction(tx_id)
        if row is None:
            raise NotFound(tx_id)
        if row["status"] != ESCALATED and not (action in ("approve", "decline") and row["settled_source"] == "ops"):
            raise AlreadySettled(tx_id, row["status"])  # reviews act on escalated ones (a repeat is fine)
        if action == "contact":
            self._after(self.decisions.contact(tx_id, actor=actor, note=note))
        elif action == "approve":
            self._after(self.decisions.confirm(tx_id, source="ops", actor=actor, note=note))
        elif action == "decline":
            code = check_reason(reason, default="risk_declined")
            self._after(self.decisions.cancel(tx_id, code, source="ops", actor=actor, note=note))
        else:
            raise InvalidInput({"action": "one of contact, approve, decline"})
        return self.show(tx_id)

    # -- events to the platform -------------------------------------------------------------------

    def events(self, *, after: str | None = None, limit: int = 100, failed_only: bool = False,
               since: datetime | None = None) -> list[dict[str, Any]]:
        """The events feed, oldest first after the event id ``after``. On PostgreSQL the newest
        FEED_SETTLE seconds are left out: two database transactions can commit their events out of id
        order, and a reader's cursor must never pass one that is still being written."""
        cursor = 0
        if after:
            parsed = parse_event_id(after)
            if parsed is None:
                raise InvalidInput({"after": "an event id such as evt_42"})
            cursor = parsed
        if not 1 <= limit <= 1000:
            raise InvalidInput({"limit": "1 to 1000"})
        until = self.store.clock() - FEED_SETTLE if self.store.pg else None
        rows = self.store.events.feed(after=cursor, limit=limit, failed_only=failed_only, since=since, until=until)
        return [event_view(r) for r in rows]

    def resend_events(self, ids: list[str] | None = None, *, failed: bool = False) -> list[str]:
        """Send events again (by id, or every failed one), each with a new retry window. Returns the ids
        found; unknown ids raise NotFound."""
        if not self.settings.platform_webhook_url:
            raise ConfigError(["REMIND_PLATFORM_WEBHOOK_URL: not set, so events cannot be sent"])
        numbers = None
        if ids is not None:
            numbers = [parse_event_id(i) for i in ids]
            bad = [i for i, n in zip(ids, numbers, strict=True) if n is None]
            if bad:
                raise InvalidInput({"id": f"not an event id: {bad[0]!r} (ids look like evt_42)"})
        found = self.store.events.resend(numbers, self.store.clock(), failed_only=failed)
        if numbers is not None:
            missing = sorted(set(numbers) - set(found))
            if missing:
                raise NotFound(public_event_id(missing[0]), "event")
        if found:
            self.enqueue_events(found)
        return [public_event_id(i) for i in found]

    def show(self, tx_id: str) -> dict[str, Any]:
        tx = self.store.get_transaction(tx_id)
        if tx is None:
            raise NotFound(tx_id)
        view = build_timeline(tx, self.store.deliveries_of(tx_id), self._registry.get(tx["schedule"]))
        masked = view["customer"].get("masked")
        if masked:  # erased: the masks kept say where each message went
            for entry in view["timeline"]:
                if entry["recipient"] is None and entry["state"] != "planned":
                    entry["recipient"] = masked.get(entry["channel"])
        view["erased_at"] = tx["erased_at"].isoformat().replace("+00:00", "Z") if tx["erased_at"] else None
        events, history = self.store.events.of(tx_id)
        settled = tx["settled_source"]
        view["settled_by"] = {"source": settled, "actor": tx["settled_actor"]} if settled else None
        view["review_state"] = tx["review_state"]
        view["history"] = [{"at": iso(h["at"]), "action": h["action"], "source": h["source"], "actor": h["actor"],
                            "note": h["note"]} for h in history]
        view["events"] = [{"id": public_event_id(e["id"]), "type": e["type"], "status": e["status"],
                           "attempts": e["attempts"]} for e in events]
        return view

    # -- personal data ------------------------------------------------------------------------------

    def erase_customer(self, customer_id: str) -> Erasure:
        """Erase the name, phone, email and push tokens from every transaction of ``customer_id``
        (idempotent; an unknown customer has nothing to erase). Amounts, statuses and the timeline stay.
        Pending transactions are cancelled (``customer_request``): nobody can be reminded any more, and
        a link sent earlier must not confirm a transfer whose customer asked to be forgotten."""
        problem = _customer_id_problem(customer_id)
        if problem:
            raise InvalidInput({"customer_id": problem})
        result = self.store.erase_customer(customer_id, erase_contact, cancel_reason=ERASED_REASON)
        if result.events:
            self.enqueue_events(result.events)
        if result.erased or result.cancelled:
            log.info("personal data of customer %s erased from %d transactions; %d pending cancelled",
                     customer_id, len(result.erased), len(result.cancelled))
        return result

    def erase_expired(self, now: datetime | None = None) -> int:
        """REMIND_RETENTION_DAYS: erase personal data from transactions settled longer ago, oldest first,
        in short batches (each its own database transaction). Returns how many were erased."""
        days = self.settings.retention_days
        if not days:
            return 0
        before = (now or self.store.clock()) - timedelta(days=days)
        total = 0
        while total < RETENTION_MOST:
            erased = self.store.erase_settled(before, erase_contact, limit=RETENTION_BATCH)
            total += len(erased)
            if len(erased) < RETENTION_BATCH:
                break
        return total

    # -- the engine's calls -----------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> TickResult:
        result = self.scheduler.tick(now)
        # Provider callbacks that came before their message id was written, for a worker that stopped
        # between writing the id and applying them (the worker applies them itself otherwise).
        try:
            self.outcomes.sweep_early_callbacks()
        except Exception:  # noqa: BLE001 - the sweep is a safety net; the next tick tries again
            log.exception("early provider callbacks not swept; the next tick tries again")
        return result

    def deliver(self, delivery_id: int) -> str:
        return self.deliverer.deliver(delivery_id)

    def send_events(self, event_ids: list[int]) -> dict[int, str]:
        return self.event_sender.send(event_ids)


def review_view(view: dict[str, Any]) -> dict[str, Any]:
    """A transaction as the review queue shows it: the facts, what was sent, what happened since."""
    keep = ("id", "status", "status_reason", "amount", "currency", "fee", "payment_method", "schedule",
            "escalated_at", "deadline", "review_state", "history")
    customer = view["customer"]
    return {**{k: view.get(k) for k in keep},
            "customer": {"id": customer["id"], "segment": customer.get("segment"), "locale": customer.get("locale")},
            "sent": [{k: e[k] for k in ("step", "channel", "template", "status", "sent_at", "recipient", "reason")}
                     for e in view["timeline"] if e["state"] not in ("planned",)]}


def _deadline_passed(tx: Transaction, schedule: Schedule, now: datetime) -> dict[str, str]:
    """The fields that put a transaction's deadline at or before ``now``, with why; empty when it is ahead."""
    problems = {}
    stamp, now = "%Y-%m-%dT%H:%M:%SZ", now.astimezone(UTC)
    if tx.expires_at is not None and tx.expires_at <= now:
        problems["expires_at"] = f"the deadline {tx.expires_at:{stamp}} has already passed (now {now:{stamp}})"
    own = tx.created_at + schedule.final.after
    if own <= now:
        problems["created_at"] = (
            f"too old: schedule {schedule.name!r} would have {schedule.final.status} it at {own:{stamp}} "
            f"(created_at + {format_duration(schedule.final.after)}), already passed (now {now:{stamp}})")
    return problems



def utcnow() -> datetime:
    return datetime.now(UTC)


__all__ = ["ConfigError", "Erasure", "Registration", "Remind", "erase_contact", "load_config", "utcnow"]
