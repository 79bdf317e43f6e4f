"""What a schedule would send, before it is saved: the timeline, the rendered texts, the SMS cost.

Pure: configuration and a (sample) transaction in, a Preview out; no database, no broker, no sender.
It renders with the same code a delivery uses (``render.facts_for``, ``Templates.render``,
``links.confirm_url``, ``contacts.choose``), so what ops read here is what customers get.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from jinja2 import TemplateError

from .contacts import addresses, choose
from .ingest import parse_transaction
from .ladder import CHANNELS, Registry, Schedule, Step, format_duration, notice_times, slots, step_times
from .links import confirm_url
from .render import PARTS, Templates, facts_for
from .settings import Settings
from .sms import SmsInfo, segments

if TYPE_CHECKING:
    from .service import Remind

SAMPLE_ID = "tx_20261125_0001"



def _preview_key(settings) -> str:
    """The key a preview signs its sample link with: the real one when set, else a throwaway one (a
    preview's link only shows the shape and length of the real one; it must not open anything)."""
    return settings.secret_key or secrets.token_hex(32)

def sample_transaction(now: datetime) -> dict[str, Any]:
    """The platform contract's sample (as in the README, the demo and the tests), created ``now``."""
    return {
        "id": SAMPLE_ID,
        "customer": {"id": "c_42", "name": "Li Wei", "phone": "+8613800138000", "email": "li.wei@example.com",
                     "push_tokens": ["fcm-token-1"], "locale": "zh-CN", "timezone": "Asia/Shanghai",
                     "segment": "returning"},
        "amount": "1000.00", "currency": "CNY", "fee": "12.50", "payment_method": "Bank card ending 1234",
        "expected_arrival": (now + timedelta(days=1)).isoformat(), "created_at": now.isoformat(),
        "risk_flag": False, "metadata": {"channel": "app"},
    }


@dataclass(frozen=True)
class Message:
    """One channel of one step: what is sent, or why nothing is."""

    channel: str
    sent: bool
    reason: str | None  # why skipped, or which channel it replaces
    subject: str | None = None  # email subject, push title
    body: str = ""  # SMS text, email plain text, push body
    html: str | None = None
    sms: SmsInfo | None = None
    recipients: int = 0  # push: one message per token


@dataclass(frozen=True)
class PreviewStep:
    id: str
    kind: str  # "reminder", "cancel" or "escalate"
    template: str
    offset: timedelta  # from created_at
    due_at: datetime  # UTC
    local: str  # due_at in the customer's zone, for people
    dropped: str | None = None  # why this step will not happen
    note: str | None = None  # why the send time differs from the ladder's (quiet hours, later)
    messages: tuple[Message, ...] = ()


@dataclass(frozen=True)
class Preview:
    schedule: Schedule
    would_choose: str  # the schedule the registry would pick for this transaction
    transaction: dict[str, Any]  # canonical form
    sample: bool
    template_locale: str
    zone: str
    created_at: datetime
    deadline: datetime
    steps: tuple[PreviewStep, ...]
    totals: dict[str, int] = field(default_factory=dict)  # messages per transaction, by channel
    skipped: dict[str, str] = field(default_factory=dict)  # channel -> why it never sends

    @property
    def sms_segments(self) -> int:
        return sum(m.sms.segments for s in self.steps for m in s.messages if m.sent and m.sms)

    def to_json(self) -> dict[str, Any]:
        def message(m: Message) -> dict[str, Any]:
            sms = m.sms and {"encoding": m.sms.encoding, "characters": m.sms.characters, "units": m.sms.units,
                             "segments": m.sms.segments}
            return {"channel": m.channel, "sent": m.sent, "reason": m.reason, "subject": m.subject, "body": m.body,
                    "html": m.html, "sms": sms, "recipients": m.recipients}

        return {
            "schedule": self.schedule.name, "version": self.schedule.version, "source": self.schedule.source,
            "would_choose": self.would_choose, "sample": self.sample, "transaction": self.transaction,
            "template_locale": self.template_locale, "timezone": self.zone,
            "created_at": self.created_at.isoformat(), "deadline": self.deadline.isoformat(),
            "steps": [{"id": s.id, "kind": s.kind, "template": s.template, "after": format_duration(s.offset),
                       "due_at": s.due_at.isoformat(), "local": s.local, "dropped": s.dropped, "note": s.note,
                       "messages": [message(m) for m in s.messages]} for s in self.steps],
            "totals": self.totals, "sms_segments": self.sms_segments, "skipped": self.skipped,
        }


#: (channels, when they go out, why that is not the ladder's own time)
SendTime = tuple[tuple[str, ...], datetime, str | None]


def send_times(schedule: Schedule, step: Step, due_at: datetime, zone: ZoneInfo, *,
               deadline: datetime | None = None) -> list[SendTime]:
    """When each of the step's channels goes out, with a note when that is not ``due_at``: the
    scheduler's own rule (quiet hours, final warning) from worker.ladder.slots, so preview and
    reality cannot drift apart."""
    created = due_at - step.after
    deadline = deadline or created + schedule.final.after
    return [(s.channels, s.at, s.note) for s in slots(schedule, created, deadline, zone) if s.step.id == step.id]


def _local(value: datetime, zone: ZoneInfo) -> str:
    local = value.astimezone(zone)
    return local.strftime("%Y-%m-%d %H:%M:%S" if local.second else "%Y-%m-%d %H:%M")


def _config(source: Remind | tuple[Registry, Templates], settings: Settings | None):
    if isinstance(source, tuple):
        registry, templates = source
        return registry, templates, settings or Settings()
    return source.registry, source.templates, settings or source.settings


def preview(source: Remind | tuple[Registry, Templates], schedule_name: str,
            tx_payload: Mapping[str, Any] | None = None, locale: str | None = None,
            now: datetime | None = None, *, settings: Settings | None = None) -> Preview:
    """Preview ``schedule_name`` for ``tx_payload`` (default: the sample transaction created ``now``).

    ``source`` is a Remind or the (registry, templates) pair of ``service.load_config``; ``locale``
    overrides the customer's. Raises KeyError for an unknown schedule, InvalidInput for a bad payload.
    """
    registry, templates, settings = _config(source, settings)
    schedule = registry.get(schedule_name)
    if schedule is None:
        raise KeyError(schedule_name)
    now = (now or datetime.now(UTC).replace(second=0, microsecond=0)).astimezone(UTC)  # whole minutes read better
    payload: Any = sample_transaction(now) if tx_payload is None else tx_payload
    if locale and isinstance(payload, Mapping) and isinstance(payload.get("customer"), Mapping):
        payload = {**payload, "customer": {**payload["customer"], "locale": locale}}
    tx = parse_transaction(payload, now=now)
    content = tx.canonical()
    customer = content["customer"]
    zone = ZoneInfo(tx.customer.timezone)
    created = tx.created_at or now
    deadline = schedule.deadline(created, tx.expires_at)
    link = confirm_url(settings.public_base, _preview_key(settings), tx.id, deadline)
    restart = settings.restart_url or ""

    def render(step_id: str, template: str, channels: tuple[str, ...], at: datetime, reason: str = ""):
        facts = facts_for(content, templates=templates, now=at, deadline=deadline, confirm_url=link,
                          restart_url=restart, step=step_id, reason=reason)
        out = []
        for c in choose(channels, schedule.fallback_for(step_id), customer, set()):
            if not c.send:
                out.append(Message(c.channel, False, c.reason))
                continue
            r = templates.render(template, c.channel, tx.customer.locale, facts)
            out.append(Message(c.channel, True, c.reason, r.subject, r.body, r.html,
                               segments(r.body) if c.channel == "sms" else None,
                               len(addresses(customer, c.channel))))
        return tuple(out)

    due = {s.id: at for s, at in step_times(schedule, created, deadline)}
    steps: list[PreviewStep] = []
    for step in schedule.steps:
        at = created + step.after
        if step.id not in due:
            steps.append(PreviewStep(step.id, "reminder", step.template, step.after, at, _local(at, zone),
                                     dropped=f"at or after the deadline {_local(deadline, zone)} (expires_at)"))
            continue
        for channels, send_at, note in send_times(schedule, step, due[step.id], zone, deadline=deadline):
            steps.append(PreviewStep(step.id, "reminder", step.template, step.after, send_at, _local(send_at, zone),
                                     note=note, messages=render(step.id, step.template, channels, send_at)))
    final = schedule.final
    early = None if deadline == created + final.after else "at expires_at, before the schedule's own time"
    for channels, at, held in notice_times(schedule, deadline, zone):  # the status changes at the deadline
        note = "; ".join(n for n in (early, held) if n) or None
        steps.append(PreviewStep(final.action, final.action, final.template, deadline - created, at,
                                 _local(at, zone), note=note,
                                 messages=render(final.action, final.template, channels, at, final.reason)))

    steps.sort(key=lambda s: s.due_at)  # stable: dropped steps (past an early expires_at) end up last
    sent = [m for s in steps for m in s.messages if m.sent]
    totals = {c: sum(m.recipients for m in sent if m.channel == c) for c in CHANNELS}
    skipped = {m.channel: m.reason or "" for s in steps for m in s.messages if not m.sent}
    chosen = registry.choose(segment=tx.customer.segment, risk_flag=tx.risk_flag, amount=tx.amount,
                             currency=tx.currency).name
    return Preview(schedule, chosen, content, tx_payload is None, templates.negotiate(tx.customer.locale),
                   zone.key, created, deadline, tuple(steps), totals, skipped)


def to_text(p: Preview) -> str:
    """The preview for a person: a header, one block per step and channel, then the totals."""
    c, z = p.transaction["customer"], f"({p.zone})"
    lines = [
        f"schedule {p.schedule.name} (version {p.schedule.version}, {p.schedule.source}): "
        f"{p.schedule.final.action} at {format_duration(p.schedule.final.after)}",
        f"transaction {p.transaction['id']}{' (sample)' if p.sample else ''}: {c['name']}, {c['locale']} "
        f"(templates {p.template_locale}), {c['timezone']}, segment {c.get('segment') or '-'}; "
        f"{p.transaction['amount']} {p.transaction['currency']} + fee {p.transaction['fee']} "
        f"via {p.transaction['payment_method']}",
        f"created {_local(p.created_at, ZoneInfo(p.zone))} {z}, deadline {_local(p.deadline, ZoneInfo(p.zone))} {z}",
    ]
    if p.would_choose != p.schedule.name:
        lines.append(f"note: this transaction would run on {p.would_choose!r}, not {p.schedule.name!r}")
    for s in p.steps:
        head = f"+{format_duration(s.offset)}  {s.local} {z}  {s.id}" + (f"  ({s.note})" if s.note else "")
        if s.dropped:
            lines += ["", f"{head}  dropped: {s.dropped}"]
        for m in s.messages:
            label = m.channel.upper()
            if not m.sent:
                lines += ["", f"{head}  {label}  skipped: {m.reason}"]
                continue
            extra = f"  ({m.reason})" if m.reason else ""
            if m.sms:
                extra += f"  [{m.sms.encoding}, {m.sms.segments} segment{'s' * (m.sms.segments != 1)}, " \
                         f"{m.sms.characters} chars]"
            if m.channel == "push" and m.recipients != 1:
                extra += f"  [{m.recipients} tokens]"
            lines += ["", f"{head}  {label}{extra}"]
            if m.subject:
                lines.append(f"    {m.subject}")
                lines.append("    " + "-" * min(len(m.subject), 60))
            lines += [f"    {line}".rstrip() for line in m.body.splitlines()]
    counts = ", ".join(f"{ch} {n}" + (f" ({p.sms_segments} segments)" if ch == "sms" and n else "")
                       for ch, n in p.totals.items())
    lines += ["", f"messages per transaction: {counts}"]
    for ch, why in p.skipped.items():
        lines.append(f"skipped: {ch} ({why})")
    return "\n".join(lines)


def sms_budget_warnings(templates: Templates, budget: int, settings: Settings,
                        now: datetime | None = None) -> list[str]:
    """Render every part of every template folder in every locale with the sample transaction (a real-length
    confirmation link, the locale's own formatting); one warning per SMS over ``budget`` segments, and per
    part that does not render (templates no schedule uses are not checked when loading)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    content = parse_transaction(sample_transaction(now)).canonical()
    deadline = now + timedelta(days=1)
    link = confirm_url(settings.public_base, _preview_key(settings), SAMPLE_ID, deadline)
    restart = settings.restart_url or ""
    warnings: list[str] = []
    for locale in templates.locales:
        local = {**content, "customer": {**content["customer"], "locale": locale}}
        facts = facts_for(local, templates=templates, locale=locale, now=now, deadline=deadline,
                          confirm_url=link, restart_url=restart, step="reminder", reason="not_confirmed")
        for folder in sorted(p for p in (templates.directory / locale).iterdir() if p.is_dir()):
            for part in (part for parts in PARTS.values() for part in parts):
                path: Path = folder / part
                if not path.is_file():
                    continue
                try:
                    text = templates.env.get_template(f"{locale}/{folder.name}/{part}").render(facts).strip()
                except TemplateError as exc:
                    warnings.append(f"{path}: does not render with the sample transaction: {exc}")
                    continue
                info = segments(text) if part == "sms.txt" else None
                if info and info.segments > budget:
                    warnings.append(f"{path}: {info.segments} SMS segments ({info.encoding}, {info.characters} "
                                    f"chars with sample data), over the budget of {budget} "
                                    f"(REMIND_SMS_SEGMENT_BUDGET)")
    return warnings
