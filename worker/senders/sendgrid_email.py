"""Email through SendGrid's v3 Mail Send API, with the official ``sendgrid`` SDK on a pooled transport.

The SDK builds the request (``Mail`` helpers, URL, headers, the JSON body) as it always does; only the
last step changes. Its ``python_http_client.Client`` opens every request with a new ``urllib`` opener:
a new TCP (and TLS) connection per email, and ``urllib.request.build_opener()`` alone costs about 0.3 ms
of CPU per call (it reads the proxy settings again each time). ``_PooledClient`` sends the same request
through one ``urllib3.PoolManager`` shared by every thread, keeping ``pool_size`` keep-alive connections,
and reports failures as the SDK and urllib do: ``python_http_client``'s own ``HTTPError`` subclasses
(status, reason, body, headers) for an answer that is not 2xx, the builtin ``TimeoutError`` for a timeout,
``URLError`` wrapping the socket error when SendGrid is not reached. So ``SendGridSender`` classifies them
as before. ``custom_args`` go in the personalization: SendGrid returns them with every event webhook for
that recipient, which is how an event finds its delivery again.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.error import HTTPError as UrllibHTTPError
from urllib.error import URLError

import python_http_client
import urllib3
from python_http_client.exceptions import HTTPError, handle_error
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import CustomArg, From, Mail, To

from ..errors import PermanentSendError, SendError, TransientSendError
from ..masking import mask_email
from .base import DEFAULT_POOL_SIZE, OutgoingMessage
from .base import retry_after as parse_retry_after
from .http import connection_pool, socket_error
from .http import timeout as timeout_of

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


class _Answer:
    """A urllib3 response as ``python_http_client.Response`` reads one (``getcode``, ``read``, ``info``)."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response

    def getcode(self) -> int:
        return self._response.status

    def read(self) -> bytes:
        return self._response.data

    def info(self) -> urllib3.HTTPHeaderDict:
        return self._response.headers


class _PooledClient(python_http_client.Client):
    """``python_http_client.Client`` sending through a shared ``urllib3.PoolManager``, safe to use from
    many threads at once.

    URL segments (``client.mail.send``) and the URL are the SDK's own; the verb builds headers and body
    exactly as the SDK's does (``json.dumps(request_body).encode("utf-8")``, ``Content-Type:
    application/json`` unless another is set). Unlike the SDK, per-call ``request_headers`` are merged into
    that call only, not into the headers every thread shares."""

    def __init__(self, *args: Any, pool: urllib3.PoolManager, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = pool

    def _build_client(self, name: str | None = None) -> _PooledClient:
        url_path = self._url_path + [name] if name else self._url_path
        return _PooledClient(host=self.host, version=self._version, request_headers=self.request_headers,
                             url_path=url_path, append_slash=self.append_slash, timeout=self.timeout,
                             pool=self._pool)

    def __getattr__(self, name: str) -> Any:
        if name not in self.methods:
            return super().__getattr__(name)  # a URL segment, or ``version``
        method = name.upper()

        def http_request(request_body: Any = None, query_params: Mapping[str, Any] | None = None,
                         request_headers: Mapping[str, str] | None = None, timeout: float | None = None,
                         **_: Any) -> python_http_client.client.Response:
            headers = {**self.request_headers, **(request_headers or {})}
            if request_body is None:
                data = None
            elif headers.get("Content-Type", "application/json") != "application/json":
                data = request_body.encode("utf-8")
            else:
                headers.setdefault("Content-Type", "application/json")
                data = json.dumps(request_body).encode("utf-8")
            return self._send(method, self._build_url(query_params), headers, data, timeout or self.timeout)

        return http_request

    def _send(self, method: str, url: str, headers: dict[str, str], data: bytes | None,
              timeout: float | None) -> python_http_client.client.Response:
        try:
            response = self._pool.request(method, url, body=data, headers=headers, redirect=False,
                                          timeout=timeout_of(timeout))
        except urllib3.exceptions.NewConnectionError as exc:  # a ConnectTimeoutError, but refused or unresolved
            raise URLError(socket_error(exc)) from None
        except urllib3.exceptions.TimeoutError:
            raise TimeoutError(f"no answer within {timeout} s") from None
        except urllib3.exceptions.HTTPError as exc:
            raise URLError(socket_error(exc)) from None
        if not 200 <= response.status < 300:  # what urllib raises for, and the SDK turns into its own errors
            error = handle_error(UrllibHTTPError(url, response.status, response.reason or "", response.headers,
                                                 io.BytesIO(response.data)))
            raise error from None
        return python_http_client.client.Response(_Answer(response))

class SendGridSender:
    """Sends each email with ``SendGridAPIClient.send``; returns SendGrid's ``X-Message-Id``.

    Parameters:
        api_key: a SendGrid API key with Mail Send permission (sent as a bearer token).
        from_email: the verified sender, ``noreply@example.com`` or ``Name <noreply@example.com>``.
        base_url: where the v3 API is (a fake in tests).
        timeout: seconds to wait for SendGrid (connect and each read).
        pool_size: keep-alive connections kept to SendGrid: the number of ``send`` calls the caller runs at
            once (from as many threads) on this one sender.

    A 429 is a ``TransientSendError`` with ``throttled=True`` and the wait SendGrid asks for; 5xx are
    transient and not throttled. Do not call ``client.set_sendgrid_data_residency``: it rebuilds the SDK's
    client, dropping the base URL, the timeout and the pool (pass the region's ``base_url`` instead).
    """

    name = "sendgrid"

    def __init__(self, api_key: str, from_email: str, *, base_url: str = "https://api.sendgrid.com",
                 timeout: float = 10.0, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        if not api_key:
            raise ValueError("SendGridSender needs an API key")
        self.from_email = from_email
        self.timeout = timeout
        self.client = SendGridAPIClient(api_key, host=base_url.rstrip("/"))
        sdk = self.client.client  # the SDK's own client, for its headers (bearer key, User-Agent, Accept)
        self.client.client = _PooledClient(host=sdk.host, request_headers=dict(sdk.request_headers),
                                           version=sdk._version, timeout=timeout,
                                           pool=connection_pool(base_url, pool_size))

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
            return TransientSendError("SendGrid rate limit (HTTP 429)", retry_after=retry_after(headers), code="429",
                                      throttled=True)
        if status >= 500:
            return TransientSendError(f"SendGrid answered HTTP {status}", retry_after=retry_after(headers),
                                      code=str(status))
        fields = _error_fields(exc.body)
        detail = f" ({', '.join(fields)})" if fields else ""
        return PermanentSendError(f"SendGrid refused the email to {mask_email(to)}: HTTP {status}{detail}",
                                  code=str(status))
