"""Senders, one module per provider or sink, chosen by configuration here and only here."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from ..errors import SettingsError
from ..settings import Settings
from .base import FanOut, OutgoingMessage, Sender
from .console import ConsoleSender
from .outbox import OutboxSender
from .webhook import WebhookSender

log = logging.getLogger("remind.senders")

__all__ = ["ConsoleSender", "FanOut", "OutboxSender", "OutgoingMessage", "Sender", "WebhookSender",
           "check_channels", "missing_credentials", "senders_from_settings"]


def missing_credentials(settings: Settings) -> dict[str, list[str]]:
    """For each channel, the provider settings still missing (an empty list: the provider is configured)."""
    sms = [n for n, v in (("TWILIO_ACCOUNT_SID", settings.twilio_account_sid),
                          ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token)) if not v]
    if not (settings.twilio_messaging_service_sid or settings.twilio_from_number):
        sms.append("TWILIO_MESSAGING_SERVICE_SID or TWILIO_FROM_NUMBER")
    email = [n for n, v in (("SENDGRID_API_KEY", settings.sendgrid_api_key),
                            ("SENDGRID_FROM_EMAIL", settings.sendgrid_from_email)) if not v]
    push = [n for n, v in (("FCM_PROJECT_ID", settings.fcm_project_id),
                           ("FCM_CREDENTIALS_FILE", settings.fcm_credentials_file)) if not v]
    if settings.fcm_credentials_file and not settings.fcm_credentials_file.is_file():
        push.append(f"FCM_CREDENTIALS_FILE (no file {settings.fcm_credentials_file})")
    return {"sms": sms, "email": email, "push": push}


def check_channels(settings: Settings, channels: Iterable[str]) -> None:
    """At start, in production: every channel a schedule uses has its provider's credentials, unless
    REMIND_DEV_SENDER stands in for them explicitly. Otherwise reminders would be recorded as sent while
    they only reached a file. Raises SettingsError naming the first missing variable."""
    if not settings.production or settings.dev_sinks:
        return
    missing = missing_credentials(settings)
    lacking = {c: missing[c] for c in sorted(set(channels) & set(missing)) if missing[c]}
    if lacking:
        first = next(iter(lacking))
        listed = "; ".join(f"{', '.join(names)} ({channel})" for channel, names in lacking.items())
        raise SettingsError(lacking[first][0], f"required in production: a schedule sends {first}. Missing for the "
                            f"channels your schedules use: {listed}. REMIND_DEV_SENDER=outbox writes those "
                            "messages to a file instead, on purpose")


def _dev_sender(settings: Settings) -> Sender | None:
    if not settings.dev_sinks:
        return None
    sinks: list[Sender] = []
    for name in settings.dev_sinks.split(","):
        sinks.append(OutboxSender(settings.outbox) if name == "outbox" else ConsoleSender())
    return sinks[0] if len(sinks) == 1 else FanOut(sinks)


def senders_from_settings(settings: Settings, *, clock=None) -> Mapping[str, Sender]:
    """The sender for each channel: a real provider when its credentials are set, else the dev sink (none
    in production unless REMIND_DEV_SENDER says so: a delivery on such a channel fails, naming it).

    The SDKs are imported only for the providers in use."""
    dev = _dev_sender(settings)
    chosen: dict[str, Sender] = {"sms": dev, "email": dev, "push": dev} if dev else {}
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
            raise SettingsError("SENDGRID_FROM_EMAIL", "required with SENDGRID_API_KEY: a verified sender address")
        chosen["email"] = SendGridSender(settings.sendgrid_api_key, settings.sendgrid_from_email,
                                         base_url=settings.sendgrid_api_base_url, timeout=timeout,
                                         pool_size=pool)
    if settings.fcm_project_id and settings.fcm_credentials_file:
        from .fcm_push import FcmSender

        try:
            chosen["push"] = FcmSender(settings.fcm_project_id, settings.fcm_credentials_file,
                                       base_url=settings.fcm_api_base_url, timeout=timeout, pool_size=pool)
        except (OSError, ValueError) as exc:  # google-auth's MalformedError is a ValueError
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SettingsError("FCM_CREDENTIALS_FILE", f"{settings.fcm_credentials_file} is not a usable service "
                                f"account key ({reason}); download one from the Firebase console") from None
    if settings.platform_webhook_url:
        secret = settings.webhook_secret or ""
        if not secret.startswith("whsec_"):
            raise SettingsError("REMIND_WEBHOOK_SECRET", "required with REMIND_PLATFORM_WEBHOOK_URL: whsec_ followed "
                                "by a base64 key, the platform's Standard Webhooks secret")
        chosen["webhook"] = WebhookSender(secret, timeout=timeout, pool_size=pool)
    return chosen


def describe(senders: Mapping[str, Sender]) -> str:
    """One line for the start-up log: which sender each channel uses."""
    return ", ".join(f"{channel}={sender.name}" for channel, sender in senders.items())
