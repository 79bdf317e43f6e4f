"""Status webhooks from the providers: verified with each SDK's own validator, or 403 and nothing changes."""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from ..masking import mask_email, mask_phone
from ..service import Remind

log = logging.getLogger("remind.webhooks")

#: Signed events older (or newer) than this are refused, so a captured request cannot be replayed later.
REPLAY_WINDOW = 300

STOP_WORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"}
START_WORDS = {"START", "UNSTOP", "YES"}
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def forbidden(why: str) -> JSONResponse:
    return JSONResponse({"error": "forbidden", "detail": why}, status_code=403)


def router(remind: Remind) -> APIRouter:
    hooks = APIRouter(prefix="/webhooks", include_in_schema=False)
    settings = remind.settings

    async def twilio_params(request: Request, path: str) -> dict[str, str] | None:
        from twilio.request_validator import RequestValidator

        if not settings.twilio_auth_token:
            return None
        form = await request.form()
        params = {k: str(v) for k, v in form.items()}
        url = f"{settings.public_base}{path}"  # what Twilio signed: the public URL we gave it
        signature = request.headers.get("x-twilio-signature", "")
        if not RequestValidator(settings.twilio_auth_token).validate(url, params, signature):
            return None
        return params

    @hooks.post("/twilio/status")
    async def twilio_status(request: Request):
        params = await twilio_params(request, "/webhooks/twilio/status")
        if params is None:
            return forbidden("missing or invalid X-Twilio-Signature")
        sid, status = params.get("MessageSid", ""), params.get("MessageStatus", "")
        # Kept when it beats the worker's write of the message id, and applied once that is written.
        await run_in_threadpool(remind.outcomes.status_callback, "twilio", sid, status, params.get("ErrorCode") or None)
        return Response(status_code=204)

    @hooks.post("/twilio/inbound")
    async def twilio_inbound(request: Request):
        params = await twilio_params(request, "/webhooks/twilio/inbound")
        if params is None:
            return forbidden("missing or invalid X-Twilio-Signature")
        sender, word = params.get("From", ""), params.get("Body", "").strip().upper()
        if word in STOP_WORDS:
            await run_in_threadpool(remind.store.suppress, None, "sms", sender, None, f"replied {word} by SMS")
            log.info("SMS opt-out from %s", mask_phone(sender))
        elif word in START_WORDS:
            await run_in_threadpool(remind.store.unsuppress, "sms", sender)
            log.info("SMS opt-in again from %s", mask_phone(sender))
        return Response(TWIML_EMPTY, media_type="application/xml")

    @hooks.post("/sendgrid/events")
    async def sendgrid_events(request: Request):
        from sendgrid.helpers.eventwebhook import EventWebhook

        if not settings.sendgrid_event_public_key:
            return forbidden("SENDGRID_EVENT_PUBLIC_KEY is not set; events cannot be verified")
        body = (await request.body()).decode("utf-8", "replace")
        signature = request.headers.get("x-twilio-email-event-webhook-signature", "")
        timestamp = request.headers.get("x-twilio-email-event-webhook-timestamp", "")
        try:
            ok = EventWebhook(settings.sendgrid_event_public_key).verify_signature(body, signature, timestamp)
        except Exception:  # noqa: BLE001 - a malformed signature is a forged request
            ok = False
        if not ok:
            return forbidden("missing or invalid event webhook signature")
        if abs(time.time() - float(timestamp or 0)) > REPLAY_WINDOW:
            return forbidden("stale event webhook timestamp (a replay?)")
        try:
            events = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "bad_json", "detail": "the body is not JSON"}, status_code=400)
        batch = [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []
        await run_in_threadpool(_sendgrid_batch, remind, batch)  # one hop for the batch, not one per event
        return Response(status_code=204)

    return hooks


#: SendGrid ``dropped`` reasons that are about the address (the others, such as "Spam Content" or
#: "Invalid SMTPAPI header", are about the message).
DROPPED_FOR_THE_ADDRESS = {"bounced address", "unsubscribed address", "spam reporting address", "invalid"}


def sendgrid_suppression(event: dict) -> str | None:
    """Why this event means the address must not be mailed again, or None. Unsubscribes and spam
    reports; hard bounces and blocks (``bounce`` with type bounce or blocked); drops for the address."""
    kind = str(event.get("event", ""))
    if kind in ("spamreport", "unsubscribe", "group_unsubscribe"):
        return f"email {kind}"
    if kind == "bounce" and str(event.get("type") or "bounce") in ("bounce", "blocked"):
        return f"email hard {event.get('type') or 'bounce'}"
    if kind == "dropped" and str(event.get("reason", "")).strip().lower() in DROPPED_FOR_THE_ADDRESS:
        return f"email dropped: {str(event.get('reason')).strip()}"
    return None


def _sendgrid_batch(remind: Remind, events: list[dict]) -> None:
    """Suppressions first, in one database transaction for the batch, so a bounce's fallback already
    sees the address gone; then each event's delivery outcome."""
    stops = [(str(e["email"]), why) for e in events if e.get("email") and (why := sendgrid_suppression(e))]
    if stops:
        with remind.store.begin() as conn:
            for email, why in stops:
                if remind.store.suppress(conn, "email", email, None, why):
                    log.info("email suppressed (%s): %s", why, mask_email(email))
    for event in events:
        _sendgrid_outcome(remind, event)


def _sendgrid_outcome(remind: Remind, event: dict) -> None:
    kind = str(event.get("event", ""))
    key = str(event.get("delivery_key", ""))
    delivery_id = int(key[3:]) if key.startswith("dl_") and key[3:].isdigit() and len(key) <= 20 else None
    if delivery_id is None:
        return
    if kind in ("delivered", "bounce", "dropped"):
        remind.outcomes.note(delivery_id, "sendgrid", kind, None)
    if kind == "delivered":
        remind.outcomes.delivered(delivery_id)
    elif kind in ("bounce", "dropped"):
        reason = str(event.get("reason") or event.get("type") or kind)[:200]
        remind.outcomes.failed(delivery_id, f"sendgrid reported {kind}: {reason}", code=kind)
