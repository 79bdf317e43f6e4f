"""The Python API, and the one place the parts are wired together. CLI, actors and web call this.

    >>> remind = Remind.from_settings(Settings())
    >>> remind.register(payload)            # -> Registration(created=True, ...)
    >>> remind.confirm("tx_1")
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .contacts import CONTACT_FIELD
from .delivery import Deliverer, DeliveryOptions
from .errors import AlreadySettled, ConfigError, Conflict, InvalidInput, NotFound
from .inflight import LocalSlots, SendPool
from .ingest import Line, Transaction, differing_fields, parse_transaction
from .ladder import Registry, Schedule, format_duration, load_dir, slots
from .masking import mask_recipient
from .outcomes import Outcomes
from .render import Templates
from .scheduler import Scheduler, TickResult
from .senders import Sender, describe, senders_from_settings
from .settings import Settings
from .store import CANCELLED, CONFIRMED, ESCALATED, PENDING, NewTransaction, Store, make_engine, upgrade
from .store.repo import Erasure
from .timeline import build as build_timeline

log = logging.getLogger("remind")

#: The status reason of a pending transaction cancelled because its customer's data was erased.
ERASED_REASON = "customer_request"
#: Settled transactions the retention sweep erases per database transaction, and at most per run.
RETENTION_BATCH, RETENTION_MOST = 500, 50_000


@dataclass(frozen=True)
class Registration:
    transaction_id: str
    created: bool  # False: the same transaction was registered before (a no-op)
    status: str
    schedule: str


def load_config(settings: Settings) -> tuple[Registry, Templates]:
    """Templates and schedules, validated together; raises ConfigError listing every problem."""
    templates = Templates(settings.templates_dir)
    schedules = load_dir(settings.schedules_dir, templates.missing)
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
                 senders: Mapping[str, Sender]) -> None:
        self.settings = settings
        self.store = store
        self._registry = registry
        self._templates = templates
        self._config_lock = threading.Lock()
        #: What the last hot reload did, for /readyz and /metrics.
        self.config_state: dict[str, Any] = {"ok": True, "error": None, "failures": 0, "at": None, "signature": None}
        self.senders = senders
        self.enqueue: Callable[[list[int]], None] = _no_broker
        self.outcomes = Outcomes(store, lambda: self._registry, lambda ids: self.enqueue(ids),
                                 webhook=bool(settings.platform_webhook_url),
                                 lease=timedelta(seconds=settings.lease_seconds))
        self.deliverer = Deliverer(store, lambda: self._templates, senders, DeliveryOptions(
            public_base=settings.public_base, secret_key=settings.secret_key,
            restart_url=settings.restart_url or settings.public_base + "/",
            webhook_url=settings.platform_webhook_url, lease=timedelta(seconds=settings.lease_seconds),
            max_attempts=settings.max_attempts, webhook_max_attempts=settings.webhook_max_attempts),
            self.outcomes, pool=SendPool(settings.send_concurrency), slots=LocalSlots(settings.inflight_limits))
        self.config_state["signature"] = self._config_signature()
        self.scheduler = Scheduler(store, lambda: self._registry, lambda ids: self.enqueue(ids),
                                   batch_size=settings.batch_size,
                                   lease=timedelta(seconds=settings.lease_seconds),
                                   webhook=bool(settings.platform_webhook_url))

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, migrate: bool = True,
                      senders: Mapping[str, Sender] | None = None, clock=None) -> Remind:
        settings = settings or Settings()
        if not settings.secret_key and not settings.production:
            settings = settings.with_secret()  # development: a key generated once; production processes check theirs
        registry, templates = load_config(settings)
        engine = make_engine(settings.database_url)
        if migrate:
            upgrade(engine)
        store = Store(engine, clock=clock)
        chosen = {**senders_from_settings(settings, clock=store.clock), **(senders or {})}
        log.debug("senders: %s", describe(chosen))
        return cls(settings, store, registry, templates, chosen)

    # -- configuration ------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def templates(self) -> Templates:
        return self._templates

    def reload(self) -> None:
        """Load schedules and templates again; on ConfigError the running ones stay in use."""
        registry, templates = load_config(self.settings)
        with self._config_lock:
            self._registry, self._templates = registry, templates

    def _config_signature(self) -> tuple:
        files = []
        for folder in (self.settings.schedules_dir, self.settings.templates_dir):
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    files.append((str(path), stat.st_mtime_ns, stat.st_size))
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
            return Registration(tx.id, True, PENDING, schedule.name)
        if existing["content"]["customer"].get("erased"):  # the same transaction, but nothing of it is kept
            content = erase_contact(content)[0]
        diff = differing_fields(existing["content"], content, ignore_created_at=omitted_created_at)
        if diff:
            raise Conflict(tx.id, diff)
        return Registration(tx.id, False, existing["status"], existing["schedule"])

    def confirm(self, tx_id: str, *, by_customer: bool = False) -> dict[str, Any]:
        """Confirm (idempotent). Ops may confirm an escalated transaction after review; the customer's
        own link may not (that would override the review). A cancelled one cannot be confirmed."""
        allowed = (PENDING,) if by_customer else (PENDING, ESCALATED)
        previous, row = self.store.settle(tx_id, CONFIRMED, None, allowed_from=allowed)
        if previous is None:
            raise NotFound(tx_id)
        if row["status"] != CONFIRMED:
            raise AlreadySettled(tx_id, row["status"])
        if previous != CONFIRMED:
            log.info("confirmed %s", tx_id)
        return row

    def cancel(self, tx_id: str, reason: str) -> dict[str, Any]:
        """A platform-side cancel: no more reminders. Idempotent; a confirmed transaction stays confirmed."""
        previous, row = self.store.settle(tx_id, CANCELLED, reason, allowed_from=(PENDING, ESCALATED))
        if previous is None:
            raise NotFound(tx_id)
        if row["status"] != CANCELLED:
            raise AlreadySettled(tx_id, row["status"])
        if previous != CANCELLED:
            log.info("cancelled %s by the platform: %s", tx_id, reason)
        return row

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


def _no_broker(ids: list[int]) -> None:
    raise RuntimeError("no broker is bound: call worker.broker.bind(remind, broker) first")


def utcnow() -> datetime:
    return datetime.now(UTC)


__all__ = ["ConfigError", "Erasure", "Registration", "Remind", "erase_contact", "load_config", "utcnow"]
