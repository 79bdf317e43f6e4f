"""One-tap confirmation links: a signed token that names the transaction and dies at its deadline.

The token is short on purpose (it sits in every SMS, where 70 characters is a whole UCS-2 segment):
``<transaction id, base64url>.<expiry, base36 seconds>.<HMAC-SHA256, first 128 bits, base64url>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

_CONTEXT = b"remind.confirm.v2"


class InvalidToken(Exception):
    """The token was tampered with, is not ours, or has expired (``expired`` tells which)."""

    def __init__(self, message: str, *, expired: bool = False, transaction_id: str | None = None) -> None:
        super().__init__(message)
        self.expired = expired
        self.transaction_id = transaction_id


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, body: str) -> str:
    if not secret:  # an empty key is a key everyone knows: nothing is signed or accepted with it
        raise ValueError("no signing key (REMIND_SECRET_KEY)")
    key = hashlib.sha256(_CONTEXT + secret.encode()).digest()  # a key for this purpose only
    return _b64(hmac.new(key, body.encode(), hashlib.sha256).digest()[:16])


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def make_token(secret: str, transaction_id: str, deadline: datetime) -> str:
    body = f"{_b64(transaction_id.encode())}.{_base36(int(deadline.timestamp()))}"
    return f"{body}.{_sign(secret, body)}"


def read_token(secret: str, token: str, *, now: datetime | None = None) -> str:
    """The transaction id in a valid, unexpired token; InvalidToken otherwise (compared in constant time)."""
    try:
        tx_part, exp_part, signature = token.split(".")
        body = f"{tx_part}.{exp_part}"
        if not hmac.compare_digest(signature.encode(), _sign(secret, body).encode()):
            raise ValueError("bad signature")
        tx_id, expires = _unb64(tx_part).decode(), int(exp_part, 36)
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken("this link is not valid") from None
    if (now or datetime.now(UTC)).timestamp() >= expires:
        raise InvalidToken("this link has expired", expired=True, transaction_id=tx_id)
    return tx_id


def confirm_url(public_base: str, secret: str, transaction_id: str, deadline: datetime) -> str:
    return f"{public_base}/c/{make_token(secret, transaction_id, deadline)}"
