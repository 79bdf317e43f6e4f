"""Push through Firebase Cloud Messaging's HTTP v1 API: google-auth's service-account credentials sign the
bearer token, and the post goes out on the senders' shared urllib3 transport (``http.py``).

Not firebase-admin: it has no public way to point it at another endpoint (only the private
``messaging._MessagingService.FCM_URL``), waits 120 s by default, and retries 500/503 up to four times by
itself, on top of dramatiq's retries. Not google-auth's ``AuthorizedSession`` either: it is ``requests``,
about a millisecond of CPU per push more than urllib3 (see ``http.py``). google-auth's public credentials
API (``before_request``, ``refresh``) with its urllib3 token transport does the same: the post goes to any
base URL with our timeout, a 401 fetches a new token and posts once more, and every answer is classified
here, once.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import urllib3
from google.auth.exceptions import RefreshError, TransportError
from google.auth.transport.urllib3 import Request
from google.oauth2 import service_account

from ..errors import PermanentSendError, SendError, TransientSendError
from ..masking import mask_token
from .base import DEFAULT_POOL_SIZE, OutgoingMessage, retry_after
from .http import connection_pool, unanswered
from .http import timeout as timeout_of

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
#: Keep-alive connections to the token endpoint: a token is fetched about once an hour.
TOKEN_POOL_SIZE = 4
#: What FCM answers "too many requests" with (HTTP 429): Google's status, and FCM's error code.
THROTTLED_STATUS, THROTTLED_CODE = "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"


def _error_codes(body: bytes) -> tuple[str | None, str | None]:
    """(Google's ``status``, FCM's ``errorCode``) from an error body, when it has them."""
    try:
        error = json.loads(body or b"{}").get("error") or {}
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(error, dict):
        return None, None
    details = error.get("details") or []
    codes = [d.get("errorCode") for d in details if isinstance(d, dict) and d.get("@type") == FCM_ERROR]
    status = error.get("status")
    return (status if isinstance(status, str) else None), next((c for c in codes if isinstance(c, str)), None)


def _token_failure(exc: TransportError | RefreshError) -> SendError:
    """What a failure to fetch an access token means for the send."""
    if isinstance(exc, TransportError):
        return TransientSendError("FCM access token not fetched: the token endpoint was not reached")
    if exc.retryable:
        return TransientSendError("FCM access token not fetched: the token endpoint failed")
    return PermanentSendError("FCM access token refused: check the service-account credentials")


def _string(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


class FcmSender:
    """Sends each push to one registration token; returns FCM's message ``name``.

    Parameters:
        project_id: the Firebase project.
        credentials_file: a service-account JSON file; its ``token_uri`` is where tokens come from.
        base_url: where FCM is (a fake in tests).
        timeout: seconds to wait for FCM, and for the token endpoint when a token is due.
        pool_size: keep-alive connections kept to FCM: the number of ``send`` calls the caller runs at once
            (from as many threads) on this one sender. The token endpoint is called about once an hour, by
            the threads that find the token due at the same moment, and keeps a small pool.

    What retries, none of which can deliver a message twice: a 401 fetches a new token and posts once more
    (FCM accepted nothing), and fetching a token (about once an hour) is tried up to 3 times on 429/5xx by
    google-auth's token client, 1 s and 2 s apart. The transport never retries, and a full pool opens an
    extra connection rather than making a thread wait (see ``http.py``).

    Throttling: a 429 (``RESOURCE_EXHAUSTED`` / ``QUOTA_EXCEEDED``) is a ``TransientSendError`` with
    ``throttled=True`` and FCM's Retry-After; 5xx are transient and not throttled.
    """

    name = "fcm"

    def __init__(self, project_id: str, credentials_file: str | os.PathLike[str], *,
                 base_url: str = "https://fcm.googleapis.com", timeout: float = 10.0,
                 pool_size: int = DEFAULT_POOL_SIZE) -> None:
        info = json.loads(Path(credentials_file).read_text(encoding="utf-8"))
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.timeout = timeout
        self._credentials = credentials
        self._pool = connection_pool(base_url, pool_size)  # a keep-alive connection for every send in flight
        self._token_request = Request(connection_pool(info["token_uri"], TOKEN_POOL_SIZE))
        self._token_lock = threading.Lock()
        self._token_fetches = 0
        self._token_failure: SendError | None = None

    @staticmethod
    def payload(message: OutgoingMessage) -> dict[str, Any]:
        """The v1 send request; FCM wants every data value as a string."""
        notification = {"body": message.body}
        if message.subject:
            notification["title"] = message.subject
        body: dict[str, Any] = {"token": message.recipient, "notification": notification}
        if message.data:
            body["data"] = {str(key): _string(value) for key, value in message.data.items()}
        return {"message": body}

    def _fresh_token(self, stale: str | None = None) -> None:
        """Fetch an access token when one is due (or the one FCM refused, ``stale``, is still the current
        one), one thread at a time.

        google-auth has no lock: every thread that finds the token due (at start, and about once an hour)
        would sign a JWT and fetch its own token, up to one per send in flight. Here the first fetches it
        and the others wait for it; when that fetch fails, the threads that waited for it fail with the same
        classified error instead of queueing a fetch each (which would hold the last of them for many
        timeouts). The next thread to arrive after that tries again."""
        def due() -> bool:
            return not self._credentials.valid or (stale is not None and self._credentials.token == stale)

        if not due():
            return
        seen = self._token_fetches
        with self._token_lock:
            if not due():
                return
            failure = self._token_failure
            if failure is None or self._token_fetches == seen:
                self._token_fetches += 1
                try:
                    self._credentials.refresh(self._token_request)
                    self._token_failure = None
                    return
                except (TransportError, RefreshError) as exc:
                    failure = self._token_failure = _token_failure(exc)
        raise type(failure)(failure.reason, code=failure.code)

    def _post(self, body: bytes) -> tuple[str | None, urllib3.BaseHTTPResponse]:
        """One post with the current token (fetched first when due: else every thread in flight would fetch
        its own); returns the token it carried and FCM's answer."""
        self._fresh_token()
        headers = {"Content-Type": "application/json"}
        self._credentials.before_request(self._token_request, "POST", self.url, headers)
        token = self._credentials.token
        return token, self._pool.request("POST", self.url, body=body, headers=headers, redirect=False,
                                         timeout=timeout_of(self.timeout))

    def send(self, message: OutgoingMessage) -> str | None:
        body = json.dumps(self.payload(message), separators=(",", ":")).encode("utf-8")
        try:
            token, response = self._post(body)
            if response.status == 401:  # the token was revoked: FCM accepted nothing; a new one, once more
                self._fresh_token(stale=token)
                token, response = self._post(body)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientSendError(unanswered(exc, "FCM", self.timeout)) from None
        except (TransportError, RefreshError) as exc:
            raise _token_failure(exc) from None
        if response.status == 200:
            try:
                return json.loads(response.data).get("name")
            except (ValueError, AttributeError):
                return None
        raise self._classify(response.status, response.data, response.headers, message.recipient)

    def _classify(self, status: int, body: bytes, headers: Mapping[str, str], token: str) -> SendError:
        status_name, error_code = _error_codes(body)
        code = error_code or status_name or str(status)
        if status == 404 or error_code == "UNREGISTERED":
            return PermanentSendError(f"FCM no longer knows the push token {mask_token(token)} (UNREGISTERED)",
                                      code="UNREGISTERED")
        if status == 429 or status_name == THROTTLED_STATUS or error_code == THROTTLED_CODE:
            return TransientSendError(f"FCM rate limit (HTTP {status}, {code})",
                                      retry_after=retry_after(headers.get("Retry-After")), code=code,
                                      throttled=True)
        if status >= 500:
            return TransientSendError(f"FCM answered HTTP {status} ({code})",
                                      retry_after=retry_after(headers.get("Retry-After")), code=code)
        return PermanentSendError(f"FCM refused the push to {mask_token(token)}: HTTP {status} ({code})", code=code)
