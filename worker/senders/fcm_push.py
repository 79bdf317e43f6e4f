"""Push through Firebase Cloud Messaging's HTTP v1 API, posted with google-auth's ``AuthorizedSession``.

Not firebase-admin: it has no public way to point it at another endpoint (only the private
``messaging._MessagingService.FCM_URL``), waits 120 s by default, and retries 500/503 up to four times by
itself, on top of dramatiq's retries. AuthorizedSession posts to any base URL with our timeout, through
public API only, and every answer is classified here, once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import requests
from google.auth.exceptions import RefreshError, TransportError
from google.auth.transport.requests import AuthorizedSession, Request
from google.oauth2 import service_account
from requests.adapters import HTTPAdapter

from ..errors import PermanentSendError, SendError, TransientSendError
from ..masking import mask_token
from .base import OutgoingMessage, read_environment_once, retry_after

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def _error_codes(response: requests.Response) -> tuple[str | None, str | None]:
    """(Google's ``status``, FCM's ``errorCode``) from an error body, when it has them."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(error, dict):
        return None, None
    details = error.get("details") or []
    codes = [d.get("errorCode") for d in details if isinstance(d, dict) and d.get("@type") == FCM_ERROR]
    status = error.get("status")
    return (status if isinstance(status, str) else None), next((c for c in codes if isinstance(c, str)), None)


def _string(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


class FcmSender:
    """Sends each push to one registration token; returns FCM's message ``name``.

    Parameters:
        project_id: the Firebase project.
        credentials_file: a service-account JSON file; its ``token_uri`` is where tokens come from.
        base_url: where FCM is (a fake in tests).
        timeout: seconds to wait for FCM, and for the token endpoint when a token is due.

    What still retries inside google-auth, none of which can deliver a message twice: a 401 makes the
    session fetch a new token and post once more (FCM accepted nothing; limited to one here), and fetching
    a token (about once an hour) is tried up to 3 times on 429/5xx by google-auth's token client, 1 s and
    2 s apart. The transport never retries: both sessions use requests' adapters with ``max_retries=0``
    (AuthorizedSession's own token session would retry connection errors 3 times, so ours replaces it).
    """

    name = "fcm"

    def __init__(self, project_id: str, credentials_file: str | os.PathLike[str], *,
                 base_url: str = "https://fcm.googleapis.com", timeout: float = 10.0) -> None:
        info = json.loads(Path(credentials_file).read_text(encoding="utf-8"))
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.timeout = timeout
        token_session = requests.Session()
        self.session = AuthorizedSession(credentials, max_refresh_attempts=1, auth_request=Request(token_session))
        for session in (token_session, self.session):  # room for every worker thread, no retries
            for prefix in ("https://", "http://"):
                session.mount(prefix, HTTPAdapter(pool_maxsize=32, max_retries=0))
        read_environment_once(token_session, info["token_uri"])
        read_environment_once(self.session, base_url)

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

    def send(self, message: OutgoingMessage) -> str | None:
        try:
            response = self.session.post(self.url, json=self.payload(message), timeout=self.timeout)
        except requests.Timeout:
            raise TransientSendError(f"FCM did not answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise TransientSendError(f"FCM not reached: {type(exc).__name__}") from None
        except TransportError:
            raise TransientSendError("FCM access token not fetched: the token endpoint was not reached") from None
        except RefreshError as exc:
            if exc.retryable:
                raise TransientSendError("FCM access token not fetched: the token endpoint failed") from None
            raise PermanentSendError("FCM access token refused: check the service-account credentials") from None
        if response.status_code == 200:
            try:
                return response.json().get("name")
            except (ValueError, AttributeError):
                return None
        raise self._classify(response, message.recipient)

    def _classify(self, response: requests.Response, token: str) -> SendError:
        status = response.status_code
        status_name, error_code = _error_codes(response)
        code = error_code or status_name or str(status)
        if status == 404 or error_code == "UNREGISTERED":
            return PermanentSendError(f"FCM no longer knows the push token {mask_token(token)} (UNREGISTERED)",
                                      code="UNREGISTERED")
        if status == 429 or status >= 500:
            return TransientSendError(f"FCM answered HTTP {status} ({code})",
                                      retry_after=retry_after(response.headers.get("Retry-After")), code=code)
        return PermanentSendError(f"FCM refused the push to {mask_token(token)}: HTTP {status} ({code})", code=code)
