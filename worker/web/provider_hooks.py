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
        d = await run_in_threadpool(remind.store.delivery_by_provider_id, sid)
        if d is None:
            log.info("twilio status %s for an unknown message", status)
            return Response(status_code=204)
        if status == "delivered":
            await run_in_threadpool(remind.outcomes.delivered, d["id"])
        elif status in ("undelivered", "failed"):
            code = params.get("ErrorCode") or None
            await run_in_threadpool(remind.outcomes.failed, d["id"],
                                    f"twilio reported {status}" + (f" (error {code})" if code else ""), code=code)
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
        for event in events if isinstance(events, list) else []:
            if isinstance(event, dict):
                await run_in_threadpool(_sendgrid_event, remind, event)
        return Response(status_code=204)

    return hooks


def _sendgrid_event(remind: Remind, event: dict) -> None:
    kind, email = str(event.get("event", "")), str(event.get("email", ""))
    key = str(event.get("delivery_key", ""))
    delivery_id = int(key[3:]) if key.startswith("dl_") and key[3:].isdigit() else None
    if kind in ("spamreport", "unsubscribe", "group_unsubscribe") and email:
        remind.store.suppress(None, "email", email, None, f"email {kind}")
        log.info("email opt-out (%s) from %s", kind, mask_email(email))
    if delivery_id is None:
        return
    if kind == "delivered":
        remind.outcomes.delivered(delivery_id)
    elif kind in ("bounce", "dropped"):
        reason = str(event.get("reason") or event.get("type") or kind)[:200]
        remind.outcomes.failed(delivery_id, f"sendgrid reported {kind}: {reason}", code=kind)
