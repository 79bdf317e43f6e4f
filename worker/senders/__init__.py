"""Senders, one module per provider or sink, chosen by configuration here and only here."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..settings import Settings
from .base import FanOut, OutgoingMessage, Sender
from .console import ConsoleSender
from .outbox import OutboxSender
from .webhook import WebhookSender

log = logging.getLogger("remind.senders")

__all__ = ["ConsoleSender", "FanOut", "OutboxSender", "OutgoingMessage", "Sender", "WebhookSender",
           "senders_from_settings"]


def _dev_sender(settings: Settings) -> Sender:
    sinks: list[Sender] = []
    for name in settings.dev_sender.split(","):
        sinks.append(OutboxSender(settings.outbox) if name == "outbox" else ConsoleSender())
    return sinks[0] if len(sinks) == 1 else FanOut(sinks)


def senders_from_settings(settings: Settings, *, clock=None) -> Mapping[str, Sender]:
    """The sender for each channel: a real provider when its credentials are set, else the dev sink.

    The SDKs are imported only for the providers in use."""
    dev = _dev_sender(settings)
    chosen: dict[str, Sender] = {"sms": dev, "email": dev, "push": dev}
    timeout = settings.provider_timeout
    pool = settings.send_concurrency  # one keep-alive connection per send the process may have in flight
    if settings.twilio_account_sid and settings.twilio_auth_token:
        from .twilio_sms import TwilioSender

        chosen["sms"] = TwilioSender(
            settings.twilio_account_sid, settings.twilio_auth_token,
            messaging_service_sid=settings.twilio_messaging_service_sid, from_number=settings.twilio_from_number,
            status_callback=f"{settings.public_base}/webhooks/twilio/status", base_url=settings.twilio_api_base_url,
            timeout=timeout, clock=clock, pool_size=pool)
    if settings.sendgrid_api_key:
        from .sendgrid_email import SendGridSender

        if not settings.sendgrid_from_email:
            raise ValueError("SENDGRID_FROM_EMAIL is required with SENDGRID_API_KEY")
        chosen["email"] = SendGridSender(settings.sendgrid_api_key, settings.sendgrid_from_email,
                                         base_url=settings.sendgrid_api_base_url, timeout=timeout,
                                         pool_size=pool)
    if settings.fcm_project_id and settings.fcm_credentials_file:
        from .fcm_push import FcmSender

        chosen["push"] = FcmSender(settings.fcm_project_id, settings.fcm_credentials_file,
                                   base_url=settings.fcm_api_base_url, timeout=timeout, pool_size=pool)
    if settings.platform_webhook_url:
        secret = settings.webhook_secret or ""
        if not secret.startswith("whsec_"):
            raise ValueError("REMIND_WEBHOOK_SECRET (whsec_...) is required with REMIND_PLATFORM_WEBHOOK_URL")
        chosen["webhook"] = WebhookSender(secret, timeout=timeout, pool_size=pool)
    return chosen


def describe(senders: Mapping[str, Sender]) -> str:
    """One line for the start-up log: which sender each channel uses."""
    return ", ".join(f"{channel}={sender.name}" for channel, sender in senders.items())
