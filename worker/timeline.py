"""What `remind tx show` and `GET /v1/transactions/{id}` print: the transaction, its status, timeline."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .contacts import CONTACT_FIELD
from .ladder import Schedule, choose_variant, notice_times, slots
from .masking import mask_recipient


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def build(tx: dict[str, Any], deliveries: list[dict[str, Any]], schedule: Schedule | None) -> dict[str, Any]:
    """One entry per delivery that exists, plus the steps still planned for a pending transaction."""
    content = tx["content"]
    entries = []
    for d in deliveries:
        recipient = None
        if d["channel"] in CONTACT_FIELD:
            value = content["customer"].get(CONTACT_FIELD[d["channel"]])
            if isinstance(value, list):
                value = value[0] if value else None
            recipient = mask_recipient(d["channel"], value) if value else None
        entries.append({
            "step": d["step"], "kind": d["kind"], "channel": d["channel"], "template": d["template"],
            "variant": d["variant"], "due_at": _iso(d["due_at"]), "sent_at": _iso(d["sent_at"]),
            "status": {"queued": "planned", "sending": "planned"}.get(d["status"], d["status"]),
            "state": d["status"], "attempts": d["attempts"], "reason": d["reason"], "recipient": recipient,
        })
    if tx["status"] == "pending" and schedule is not None:
        seen = {(d["step"], d["channel"]) for d in deliveries}
        zone = content["customer"].get("timezone") or "UTC"
        for slot in slots(schedule, tx["created_at"], tx["deadline"], zone):
            if tx["handled_until"] and slot.at <= tx["handled_until"]:
                continue
            variant, template = choose_variant(slot.step, tx["id"])
            for channel in slot.channels:
                if (slot.step.id, channel) in seen:
                    continue
                entries.append({"step": slot.step.id, "kind": "reminder", "channel": channel,
                                "template": template, "variant": variant, "due_at": _iso(slot.at),
                                "sent_at": None, "status": "planned", "state": "planned", "attempts": 0,
                                "reason": slot.note, "recipient": None})
        final = schedule.final
        for channels, at, note in notice_times(schedule, tx["deadline"], zone):  # quiet hours hold some
            entries.append({"step": final.action, "kind": "notice", "channel": ",".join(channels),
                            "template": final.template, "variant": "default", "due_at": _iso(at),
                            "sent_at": None, "status": "planned", "state": "planned", "attempts": 0,
                            "reason": f"{final.reason}; {note}" if note else final.reason, "recipient": None})
    entries.sort(key=lambda e: (e["due_at"] or "", e["step"], e["channel"]))
    return {
        **content,
        "status": tx["status"],
        "status_reason": tx["status_reason"],
        "schedule": tx["schedule"],
        "schedule_version": tx["schedule_version"],
        "deadline": _iso(tx["deadline"]),
        "registered_at": _iso(tx["registered_at"]),
        "next_due_at": _iso(tx["next_due_at"]),
        "confirmed_at": _iso(tx["confirmed_at"]),
        "cancelled_at": _iso(tx["cancelled_at"]),
        "escalated_at": _iso(tx["escalated_at"]),
        "timeline": entries,
    }


def to_text(view: dict[str, Any]) -> str:
    """The same, for a person."""
    c = view["customer"]
    lines = [
        f"{view['id']}  {view['status'].upper()}" + (f" ({view['status_reason']})" if view["status_reason"] else ""),
        f"  customer   {c['name']} ({c['id']}), {c.get('locale')}, {c.get('timezone')}, segment "
        f"{c.get('segment') or '-'}",
        f"  amount     {view['amount']} {view['currency']} + fee {view['fee']} via {view['payment_method']}",
        f"  schedule   {view['schedule']} (version {view['schedule_version']}), deadline {view['deadline']}",
    ]
    for key in ("confirmed_at", "cancelled_at", "escalated_at"):
        if view[key]:
            lines.append(f"  {key:<10} {view[key]}")
    lines.append("  timeline")
    for e in view["timeline"]:
        when = e["sent_at"] or e["due_at"]
        extra = f" — {e['reason']}" if e["reason"] else ""
        lines.append(f"    {when}  {e['step']:<14} {e['channel']:<8} {e['status']:<9}"
                     f"{' ' + e['recipient'] if e['recipient'] else ''}{extra}")
    if view.get("history"):
        lines.append("  history")
        for h in view["history"]:
            who = h["source"] + (f" ({h['actor']})" if h["actor"] else "")
            lines.append(f"    {h['at']}  {h['action']:<14} by {who}{' — ' + h['note'] if h['note'] else ''}")
    if view.get("events"):
        lines.append("  events to the platform")
        for e in view["events"]:
            lines.append(f"    {e['id']:<10} {e['type']:<24} {e['status']} ({e['attempts']} attempts)")
    return "\n".join(lines)
