"""SMS through Twilio Programmable Messaging, with the official ``twilio`` SDK.

The SDK has no base-URL setting and rewrites hosts itself from TWILIO_EDGE / TWILIO_REGION, so edge and
region are cleared and every request goes through ``_HttpClient``, which points it at ``base_url``.
A reminder never arrives after its deadline: ``ValidityPeriod`` is the whole seconds left until
``expires_at`` (Twilio drops a message still queued then), and one whose deadline has passed is not sent.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import urllib3
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http import HttpClient
from twilio.http.response import Response
from twilio.rest import Client

from ..errors import PermanentSendError, SendError, TransientSendError
from ..masking import mask_phone
from .base import DEFAULT_POOL_SIZE, OutgoingMessage, retry_after
from .http import connection_pool, unanswered
from .http import timeout as timeout_of

#: When neither the caller nor the SDK names a timeout (seconds).
DEFAULT_TIMEOUT = 10.0
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


class _HttpClient(HttpClient):
    """The SDK's transport on a shared ``urllib3`` pool (see ``http.py``): every request goes to ``base_url``
    (scheme, host and path prefix), form-encoded as ``TwilioHttpClient`` encodes it, with HTTP basic auth;
    each thread's last response headers are kept, since ``TwilioRestException`` carries none (Retry-After).

    The SDK builds the request as always (``MessageList.create``: parameter names, serialisation, its
    User-Agent and Accept headers) and turns the answer into a message or a ``TwilioRestException``. Failures
    to reach Twilio are urllib3's own errors (``TimeoutError``, ``ProtocolError``, ``NewConnectionError``),
    which ``TwilioSender`` classifies. Twilio's own transport would log each request and response at INFO
    (URLs and headers); this one does not log."""

    def __init__(self, base_url: str, timeout: float, *, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        super().__init__(logging.getLogger("twilio.http_client"), False, timeout)
        target = urlsplit(base_url)
        if target.scheme not in ("http", "https") or not target.netloc:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        self._target = (target.scheme, target.netloc, target.path.rstrip("/"))
        self._pool = connection_pool(base_url, pool_size)
        self._auth: tuple[tuple[str, str], str] | None = None
        self._local = threading.local()

    def _authorization(self, auth: tuple[str, str]) -> str:
        if self._auth is None or self._auth[0] != auth:
            self._auth = (auth, urllib3.make_headers(basic_auth=f"{auth[0]}:{auth[1]}")["authorization"])
        return self._auth[1]

    def request(self, method: str, url: str, params: dict[str, object] | None = None,
                data: dict[str, object] | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None, timeout: float | None = None,
                allow_redirects: bool = False) -> Response:
        scheme, netloc, prefix = self._target
        parts = urlsplit(url)
        query = "&".join(q for q in (parts.query, urlencode(params or {}, doseq=True)) if q)
        url = urlunsplit((scheme, netloc, prefix + parts.path, query, ""))
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = self._authorization(auth)
        body = None
        if data:
            if headers.get("Content-Type") in ("application/json", "application/scim+json"):
                body = json.dumps(data).encode("utf-8")
            else:
                headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
                body = urlencode(data, doseq=True).encode("utf-8")
        self._local.headers = {}
        answer = self._pool.request(method.upper(), url, body=body, headers=headers, redirect=allow_redirects,
                                    timeout=timeout_of(timeout or self.timeout or DEFAULT_TIMEOUT))
        self._local.headers = answer.headers
        return Response(answer.status, answer.data.decode("utf-8", errors="replace"), answer.headers)

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
        # The Messages resource, built once: the SDK imports every v2010 resource module the first time
        # ``client.messages`` is read (tens of ms of CPU, in the middle of the first batch) and walks
        # ``api.v2010.account`` again on every later read.
        self._messages = self.client.messages

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
            created = self._messages.create(**params)
        except (TwilioRestException, TwilioServiceException) as exc:
            raise self._classify(exc.status, exc.code, message.recipient) from None
        except urllib3.exceptions.HTTPError as exc:
            raise TransientSendError(unanswered(exc, "Twilio", self.timeout)) from None
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
