"""One small error hierarchy: every failure the service reports on purpose is a RemindError."""

from __future__ import annotations


class RemindError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInput(RemindError):
    """A transaction payload failed validation; ``problems`` maps each field path to what is wrong."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {msg}" for field, msg in problems.items()))


class Conflict(RemindError):
    """The id is registered already with different content; ``fields`` names what differs."""

    def __init__(self, transaction_id: str, fields: list[str]) -> None:
        self.transaction_id = transaction_id
        self.fields = fields
        super().__init__(
            f"transaction {transaction_id} is registered already with different "
            f"{', '.join(fields)}"
        )


class NotFound(RemindError):
    """No transaction has that id."""

    def __init__(self, transaction_id: str) -> None:
        self.transaction_id = transaction_id
        super().__init__(f"no transaction {transaction_id}")


class AlreadySettled(RemindError):
    """The transaction reached another final status first (e.g. confirm after cancel)."""

    def __init__(self, transaction_id: str, status: str) -> None:
        self.transaction_id = transaction_id
        self.status = status
        super().__init__(f"transaction {transaction_id} is already {status}")


class ConfigError(RemindError):
    """A schedule or template is invalid; each problem names the file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SendError(RemindError):
    """A sender could not hand a message to its provider."""

    #: True when trying again later may succeed (timeouts, 5xx, rate limits).
    transient: bool = False

    def __init__(self, reason: str, *, retry_after: float | None = None, code: str | None = None,
                 throttled: bool = False) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.code = code
        #: The provider said "too many requests" (HTTP 429, Twilio 20429): the message was not looked at,
        #: so waiting and trying again does not use up one of the delivery's attempts.
        self.throttled = throttled
        super().__init__(reason)


class TransientSendError(SendError):
    """The provider failed in a way that a later attempt may not (retried with backoff)."""

    transient = True


class PermanentSendError(SendError):
    """The provider refused the message for good (invalid number, opted out): never retried."""
