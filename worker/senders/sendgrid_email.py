"""Email through Twilio SendGrid's v3 Mail Send API, with the official ``sendgrid`` SDK.

The SDK has no timeout argument (``client.timeout`` carries down to ``mail.send``) and reports a timeout
or a refused connection as the builtin ``TimeoutError`` / ``URLError`` rather than its own ``HTTPError``,
so both are classified here. ``custom_args`` go in the personalization: SendGrid returns them with every
event webhook for that recipient, which is how an event finds its delivery again.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Mapping
from urllib.error import URLError

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import CustomArg, From, Mail, To

from ..errors import PermanentSendError, SendError, TransientSendError
from ..masking import mask_email
from .base import OutgoingMessage
from .base import retry_after as parse_retry_after

_FIELD = re.compile(r"[A-Za-z0-9_.\[\]-]{1,80}")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: Retry-After (delta-seconds or an HTTP date), else SendGrid's X-RateLimit-Reset."""
    wait = parse_retry_after(headers.get("Retry-After"))
    if wait is not None:
        return wait
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            return max(0.0, float(reset) - time.time())
        except ValueError:
            return None
    return None


def _error_fields(body: bytes | None) -> list[str]:
    """The ``field`` names of SendGrid's ``{"errors": [...]}`` (its messages may quote an address)."""
    try:
        errors = json.loads(body or b"{}").get("errors") or []
    except (ValueError, AttributeError):
        return []
    fields = [e.get("field") for e in errors if isinstance(e, dict)]
    return [f for f in dict.fromkeys(fields) if isinstance(f, str) and _FIELD.fullmatch(f)][:3]


class SendGridSender:
    """Sends each email with ``SendGridAPIClient.send``; returns SendGrid's ``X-Message-Id``.

    Parameters:
        api_key: a SendGrid API key with Mail Send permission (sent as a bearer token).
        from_email: the verified sender, ``noreply@example.com`` or ``Name <noreply@example.com>``.
        base_url: where the v3 API is (a fake in tests).
        timeout: seconds to wait for SendGrid (connect and each read).
    """

    name = "sendgrid"

    def __init__(self, api_key: str, from_email: str, *, base_url: str = "https://api.sendgrid.com",
                 timeout: float = 10.0) -> None:
        if not api_key:
            raise ValueError("SendGridSender needs an API key")
        self.from_email = from_email
        self.timeout = timeout
        self.client = SendGridAPIClient(api_key, host=base_url.rstrip("/"))
        self.client.client.timeout = timeout  # no constructor argument; carried down to mail.send

    @staticmethod
    def custom_args(message: OutgoingMessage) -> dict[str, str]:
        """What SendGrid echoes back in its event webhooks for this message."""
        return {"delivery_key": message.idempotency_key, "transaction_id": message.transaction_id,
                "step": message.step}

    def build(self, message: OutgoingMessage) -> Mail:
        mail = Mail(from_email=From(self.from_email), to_emails=To(message.recipient), subject=message.subject,
                    plain_text_content=message.body, html_content=message.html)
        for key, value in self.custom_args(message).items():
            mail.add_custom_arg(CustomArg(key, value, p=0))
        return mail

    def send(self, message: OutgoingMessage) -> str | None:
        try:
            body = self.build(message).get()
        except (KeyError, ValueError, TypeError) as exc:  # the helpers fail so on an address without one "@"
            raise PermanentSendError(f"not sent: {mask_email(message.recipient)} is not an email address "
                                     f"({type(exc).__name__} in the SendGrid helper)") from None
        try:
            response = self.client.send(body)
        except HTTPError as exc:
            raise self._classify(exc, message.recipient) from None
        except (OSError, http.client.HTTPException) as exc:  # TimeoutError, URLError, ConnectionError, ...
            reason = exc.reason if isinstance(exc, URLError) and isinstance(exc.reason, Exception) else exc
            if isinstance(reason, TimeoutError):
                raise TransientSendError(f"SendGrid did not answer within {self.timeout:g} s") from None
            raise TransientSendError(f"SendGrid not reached: {type(reason).__name__}") from None
        return response.headers.get("X-Message-Id")

    def _classify(self, exc: HTTPError, to: str) -> SendError:
        status = int(exc.status_code)
        headers = exc.headers or {}
        if status == 429:
            return TransientSendError("SendGrid rate limit (HTTP 429)", retry_after=retry_after(headers), code="429")
        if status >= 500:
            return TransientSendError(f"SendGrid answered HTTP {status}", retry_after=retry_after(headers),
                                      code=str(status))
        fields = _error_fields(exc.body)
        detail = f" ({', '.join(fields)})" if fields else ""
        return PermanentSendError(f"SendGrid refused the email to {mask_email(to)}: HTTP {status}{detail}",
                                  code=str(status))
