"""One-tap confirmation links: a signed token that names the transaction and dies at its deadline."""

from __future__ import annotations

from datetime import UTC, datetime

from itsdangerous import BadSignature, URLSafeSerializer

_SALT = "remind.confirm.v1"


class InvalidToken(Exception):
    """The token was tampered with, is not ours, or has expired (``expired`` tells which)."""

    def __init__(self, message: str, *, expired: bool = False, transaction_id: str | None = None) -> None:
        super().__init__(message)
        self.expired = expired
        self.transaction_id = transaction_id


def make_token(secret: str, transaction_id: str, deadline: datetime) -> str:
    return URLSafeSerializer(secret, salt=_SALT).dumps({"t": transaction_id, "e": int(deadline.timestamp())})


def read_token(secret: str, token: str, *, now: datetime | None = None) -> str:
    """The transaction id in a valid, unexpired token; InvalidToken otherwise."""
    try:
        data = URLSafeSerializer(secret, salt=_SALT).loads(token)
        tx_id, expires = str(data["t"]), int(data["e"])
    except (BadSignature, KeyError, TypeError, ValueError):
        raise InvalidToken("this link is not valid") from None
    if (now or datetime.now(UTC)).timestamp() >= expires:
        raise InvalidToken("this link has expired", expired=True, transaction_id=tx_id)
    return tx_id


def confirm_url(public_base: str, secret: str, transaction_id: str, deadline: datetime) -> str:
    return f"{public_base}/c/{make_token(secret, transaction_id, deadline)}"
