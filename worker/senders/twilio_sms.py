"""SMS through Twilio Programmable Messaging, with the official ``twilio`` SDK.

The SDK has no base-URL setting and rewrites hosts itself from TWILIO_EDGE / TWILIO_REGION, so edge and
region are cleared and every request goes through ``_HttpClient``, which points it at ``base_url``.
A reminder never arrives after its deadline: ``ValidityPeriod`` is the whole seconds left until
``expires_at`` (Twilio drops a message still queued then), and one whose deadline has passed is not sent.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from ..errors import PermanentSendError, SendError, TransientSendError
from ..masking import mask_phone
from .base import DEFAULT_POOL_SIZE, OutgoingMessage, mount_pool, read_environment_once, retry_after

#: Twilio's accepted ``ValidityPeriod``, in seconds.
MIN_VALIDITY, MAX_VALIDITY = 1, 36_000
#: Twilio's "too many requests" code (HTTP 429).
RATE_LIMITED = 20429
#: What the codes the pipeline acts on mean, in our words (Twilio's own messages quote the number).
REFUSALS = {
    21211: "not a valid phone number",
    21610: "the recipient has opted out (replied STOP)",
    21614: "not a mobile number",
    20003: "Twilio refused the account SID / auth token",
}


class _HttpClient(TwilioHttpClient):
    """Sends every request to ``base_url`` (scheme, host and path prefix), and keeps each thread's last
    response headers, since ``TwilioRestException`` carries none (Retry-After).

    One instance serves every sending thread: its ``requests.Session`` pools ``pool_size`` keep-alive
    connections for http and https (the SDK mounts only https, with ``min(32, cpus + 4)``, so at more
    threads than that requests would open and throw away a connection per send). See ``mount_pool`` for
    why a full pool does not block."""

    def __init__(self, base_url: str, timeout: float, *, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        super().__init__(timeout=timeout)
        target = urlsplit(base_url)
        if target.scheme not in ("http", "https") or not target.netloc:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        self._target = (target.scheme, target.netloc, target.path.rstrip("/"))
        if self.session is not None:
            mount_pool(self.session, pool_size)
            read_environment_once(self.session, base_url)
        self._local = threading.local()

    def request(self, method: str, url: str, params: dict[str, object] | None = None,
                data: dict[str, object] | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None, timeout: float | None = None,
                allow_redirects: bool = False) -> Response:
        scheme, netloc, prefix = self._target
        parts = urlsplit(url)
        url = urlunsplit((scheme, netloc, prefix + parts.path, parts.query, parts.fragment))
        self._local.headers = {}
        response = super().request(method, url, params=params, data=data, headers=headers, auth=auth,
                                   timeout=timeout, allow_redirects=allow_redirects)
        self._local.headers = response.headers or {}
        return response

    def last_headers(self) -> Mapping[str, str]:
        return getattr(self._local, "headers", None) or {}


class TwilioSender:
    """Sends each SMS with ``client.messages.create``; returns the Message SID.

    Parameters:
        account_sid, auth_token: the account's credentials (HTTP basic auth).
        messaging_service_sid, from_number: the sender, at least one; both are passed when both are set
            (Twilio then uses that number from the service's pool).
        status_callback: the URL Twilio posts delivery status to.
        base_url: where the REST API is (a fake in tests); honoured for every request.
        timeout: seconds to wait for Twilio (connect and each read).
        pool_size: keep-alive connections kept to Twilio: the number of ``send`` calls the caller runs at
            once (from as many threads) on this one sender.
        clock: the time ``expires_at`` is measured against (default: now in UTC).
    """

    name = "twilio"

    def __init__(self, account_sid: str, auth_token: str, *, messaging_service_sid: str | None = None,
                 from_number: str | None = None, status_callback: str | None = None,
                 base_url: str = "https://api.twilio.com", timeout: float = 10.0,
                 pool_size: int = DEFAULT_POOL_SIZE, clock: Callable[[], datetime] | None = None) -> None:
        if not (messaging_service_sid or from_number):
            raise ValueError("TwilioSender needs a messaging_service_sid or a from_number")
        if not (account_sid and auth_token):
            raise ValueError("TwilioSender needs an account SID and an auth token")
        self.messaging_service_sid = messaging_service_sid
        self.from_number = from_number
        self.status_callback = status_callback
        self.timeout = timeout
        self.clock = clock or (lambda: datetime.now(UTC))
        self._http = _HttpClient(base_url, timeout, pool_size=pool_size)
        self.client = Client(account_sid, auth_token, http_client=self._http)
        self.client.edge = None  # else TWILIO_EDGE / TWILIO_REGION from the environment rewrite every host
        self.client.region = None

    def validity_period(self, message: OutgoingMessage) -> int | None:
        """Whole seconds until the deadline, at most Twilio's 36000; PermanentSendError when none are left."""
        if message.expires_at is None:
            return None
        left = math.floor((message.expires_at - self.clock()).total_seconds())
        if left < MIN_VALIDITY:
            raise PermanentSendError("not sent: the reminder's deadline has passed")
        return min(left, MAX_VALIDITY)

    def send(self, message: OutgoingMessage) -> str | None:
        params: dict[str, Any] = {"to": message.recipient, "body": message.body}
        if self.messaging_service_sid:
            params["messaging_service_sid"] = self.messaging_service_sid
        if self.from_number:
            params["from_"] = self.from_number
        if self.status_callback:
            params["status_callback"] = self.status_callback
        validity = self.validity_period(message)
        if validity is not None:
            params["validity_period"] = validity
        try:
            created = self.client.messages.create(**params)
        except (TwilioRestException, TwilioServiceException) as exc:
            raise self._classify(exc.status, exc.code, message.recipient) from None
        except requests.Timeout:
            raise TransientSendError(f"Twilio did not answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise TransientSendError(f"Twilio not reached: {type(exc).__name__}") from None
        return created.sid

    def _classify(self, status: int | None, code: int | None, to: str) -> SendError:
        status = int(status or 0)
        code_text = str(code if code is not None else status)
        wait = retry_after(self._http.last_headers().get("Retry-After"))
        if code == RATE_LIMITED or status == 429:
            return TransientSendError(f"Twilio rate limit (HTTP {status}, code {code_text})", retry_after=wait,
                                      code=code_text, throttled=True)
        if status >= 500 or status == 0:
            return TransientSendError(f"Twilio answered HTTP {status} (code {code_text})", retry_after=wait,
                                      code=code_text)
        what = REFUSALS.get(code or 0, f"HTTP {status}")
        return PermanentSendError(f"Twilio refused the SMS to {mask_phone(to)}: {what} (code {code_text})",
                                  code=code_text)
