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


def senders_from_settings(settings: Settings) -> Mapping[str, Sender]:
    """The sender for each channel: a real provider when its credentials are set, else the dev sink."""
    dev = _dev_sender(settings)
    chosen: dict[str, Sender] = {"sms": dev, "email": dev, "push": dev}
    if settings.platform_webhook_url:
        secret = settings.webhook_secret or ""
        if not secret.startswith("whsec_"):
            raise ValueError("REMIND_WEBHOOK_SECRET (whsec_...) is required with REMIND_PLATFORM_WEBHOOK_URL")
        chosen["webhook"] = WebhookSender(secret)
    return chosen


def describe(senders: Mapping[str, Sender]) -> str:
    return ", ".join(f"{channel}={sender.name}" for channel, sender in senders.items())
