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
    """No transaction (or event) has that id."""

    def __init__(self, transaction_id: str, what: str = "transaction") -> None:
        self.transaction_id = transaction_id
        super().__init__(f"no {what} {transaction_id}")


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


class SettingsError(RemindError):
    """A setting stops a process from starting: ``setting`` names the variable, the message what to do."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        self.message = message
        super().__init__(f"{setting}: {message}")


class Unavailable(RemindError):
    """The database or Redis cannot be reached right now; the same call may succeed in a minute."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"the {what} is unreachable ({reason}); try again in a minute (repeating is safe)")

    @classmethod
    def of(cls, exc: BaseException) -> Unavailable | None:
        """``exc`` as an outage when it is one (a refused or dropped connection, a locked SQLite file), else
        None: a bug or a constraint violation must not pass for an outage."""
        import redis.exceptions
        import sqlalchemy.exc

        if isinstance(exc, cls):
            return exc
        if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return cls("Redis broker", cls._first_line(exc))
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and (exc.connection_invalidated or isinstance(
                exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)):
            reason = cls._first_line(exc.orig or exc)
            if type(exc.orig).__module__ == "sqlite3" and not reason.startswith(cls._SQLITE_OUTAGES):
                return None  # "no such table" and the like are bugs, not outages
            return cls("database", reason)
        if isinstance(exc, sqlalchemy.exc.TimeoutError):  # the connection pool stayed empty
            return cls("database", "no free connection in the pool")
        return None


    #: SQLite errors that mean "busy or not there", unlike "no such table".
    _SQLITE_OUTAGES = ("database is locked", "unable to open database file", "disk I/O error")

    @staticmethod
    def _first_line(exc: BaseException) -> str:
        text = str(exc).strip().splitlines()
        return text[0][:200] if text else type(exc).__name__
