"""The one typed settings object, read from the environment (and a `.env` file when present)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import SettingsError
from .ladder.durations import parse_duration
from .logs import LEVELS as LOG_LEVELS

#: Published values (old defaults, examples): a key anyone can read lets anyone forge a confirmation link.
_KNOWN_SECRETS = frozenset({"dev-secret-change-me", "change-me", "changeme", "secret"})
_MIN_SECRET = 16
#: Where development keeps its generated key, next to the SQLite database (gitignored).
SECRET_FILE = ".remind-secret"
#: The variable that holds each access scope's tokens.
TOKEN_VARIABLES = {"platform": "REMIND_API_TOKEN", "ops": "REMIND_OPS_TOKEN", "metrics": "REMIND_METRICS_TOKEN"}


def secret_problem(value: str) -> str | None:
    """Why ``value`` cannot sign confirmation links, or None. Anyone who knows the key can confirm anyone's
    transfer, so a published or guessable key is refused everywhere, development included."""
    if value in _KNOWN_SECRETS:
        return "is a published example value"
    if len(value) < _MIN_SECRET:
        return f"is shorter than {_MIN_SECRET} characters"
    if len(set(value)) < 8:
        return "is too repetitive to be random"
    return None


def describe_invalid(exc: ValidationError) -> list[str]:
    """pydantic's report as one line a variable, without the values (a secret may be one of them)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(message if not where or message.startswith(where) else f"{where}: {message}")
    return list(dict.fromkeys(lines))


def local_secret(path: Path) -> str:
    """The development key: read from ``path``, or generated there once (mode 0600), as Rails keeps
    tmp/local_secret.txt. Links sent before a restart keep working; nobody else knows the key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text(encoding="utf-8").strip()
        if secret_problem(value):
            raise SettingsError("REMIND_SECRET_KEY", f"{path} {secret_problem(value)}; delete it to have a new "
                                "key generated, or set REMIND_SECRET_KEY") from None
        return value
    except OSError as exc:
        raise SettingsError("REMIND_SECRET_KEY", f"cannot create {path} ({exc.strerror}); set "
                            "REMIND_SECRET_KEY to a long random value, e.g. `openssl rand -hex 32`") from None
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value


def parse_rate(text: str) -> tuple[int, int]:
    """``"10/1s"`` -> (10 messages, per 1 second window); windows are whole seconds."""
    count, _, window = text.partition("/")
    try:
        n, seconds = int(count), int(parse_duration(window or "1s").total_seconds())
    except ValueError:
        raise ValueError(f"{text!r} is not a rate such as 10/1s or 600/1m") from None
    if n < 1 or seconds < 1:
        raise ValueError(f"{text!r}: at least 1 message per at least 1 second")
    return n, seconds


class Settings(BaseSettings):
    """Every knob the service has. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    #: ``production`` makes every process refuse to start without a strong secret and provider credentials;
    #: a PostgreSQL DATABASE_URL or a REDIS_URL implies it.
    env: str = Field("development", alias="REMIND_ENV")
    database_url: str = Field("sqlite:///remind.db", alias="DATABASE_URL")
    redis_url: str | None = Field(None, alias="REDIS_URL")
    #: Seconds a Redis command or connection may take before Redis counts as unreachable (every client: the
    #: broker, the in-flight slots, the rate limits, the scheduler's check). Nothing here blocks in Redis: dramatiq
    #: polls with short scripts, so a command that takes this long is lost in the network, not busy.
    redis_timeout: float = Field(5.0, alias="REMIND_REDIS_TIMEOUT", ge=0.5, le=300)
    #: Seconds a new PostgreSQL connection may take before the database counts as unreachable (503, exit 75):
    #: a host that drops packets must not hang a request or a tick for psycopg's 130 s.
    db_connect_timeout: int = Field(5, alias="REMIND_DB_CONNECT_TIMEOUT", ge=2, le=300)
    #: Seconds an open PostgreSQL connection may go silent (packets lost: a failed-over host, a cut link) before
    #: it counts as dropped (libpq's tcp_user_timeout and keepalives): without it a query, and the tick or request
    #: waiting on it, hangs for the kernel's ~15 minutes. A query may run longer: the server's kernel answers.
    db_tcp_timeout: int = Field(30, alias="REMIND_DB_TCP_TIMEOUT", ge=2, le=3600)
    schedules_dir: Path = Field(Path("schedules"), alias="REMIND_SCHEDULES_DIR")
    templates_dir: Path = Field(Path("templates"), alias="REMIND_TEMPLATES_DIR")
    #: Message prices (worker/pricing.py); a missing file means no costs (reports show null).
    pricing_file: Path = Field(Path("pricing.yaml"), alias="REMIND_PRICING_FILE")
    outbox: Path = Field(Path("outbox.jsonl"), alias="REMIND_OUTBOX")
    #: Sinks for channels without provider credentials. Unset: outbox,console in development, none in production.
    dev_sender: str | None = Field(None, alias="REMIND_DEV_SENDER")
    tick_seconds: float = Field(5.0, alias="REMIND_TICK_SECONDS", gt=0)
    reload_seconds: float = Field(2.0, alias="REMIND_RELOAD_SECONDS", ge=0)  # 0: no hot reload
    lease_seconds: float = Field(300.0, alias="REMIND_LEASE_SECONDS", gt=0)
    batch_size: int = Field(1000, alias="REMIND_BATCH_SIZE", gt=0)
    #: Most deliveries one worker message carries (their database round trips are shared).
    delivery_batch: int = Field(20, alias="REMIND_DELIVERY_BATCH", gt=0, le=500)
    max_attempts: int = Field(8, alias="REMIND_MAX_ATTEMPTS", gt=0)
    #: How long an event to the platform is retried (backoff up to an hour) before it is recorded as
    #: failed; `remind events resend` starts a new window. Stripe retries for 3 days.
    event_retry_hours: float = Field(72.0, alias="REMIND_EVENT_RETRY_HOURS", gt=0, le=24 * 30)
    #: The first retry's wait; dramatiq's backoff doubles it (with jitter) up to 5 minutes.
    min_backoff_ms: int = Field(1000, alias="REMIND_MIN_BACKOFF_MS", gt=0)
    #: Worker threads per process, each running one message (a batch of up to REMIND_DELIVERY_BATCH) at a time:
    #: 16 x 20 keeps the send pool full when providers take ~200 ms (a batch waits for its slowest send).
    worker_threads: int = Field(16, alias="REMIND_WORKER_THREADS", gt=0)
    #: Signs confirmation links. Unset: development generates one into SECRET_FILE; production refuses to start.
    secret_key: str = Field("", alias="REMIND_SECRET_KEY")
    public_url: str = Field("http://127.0.0.1:8000", alias="REMIND_PUBLIC_URL")
    restart_url: str | None = Field(None, alias="REMIND_RESTART_URL")
    platform_webhook_url: str | None = Field(None, alias="REMIND_PLATFORM_WEBHOOK_URL")
    webhook_secret: str | None = Field(None, alias="REMIND_WEBHOOK_SECRET")
    queue_name: str = Field("remind", alias="REMIND_QUEUE")
    redis_namespace: str = Field("remind", alias="REMIND_REDIS_NAMESPACE")
    log_format: str = Field("text", alias="REMIND_LOG_FORMAT")
    log_level: str = Field("info", alias="REMIND_LOG_LEVEL")  # debug: a line per delivery sent, too
    #: Provider calls one worker process keeps in flight at once (its send pool; the senders' connection
    #: pools are sized to it).
    send_concurrency: int = Field(256, alias="REMIND_SEND_CONCURRENCY", gt=0, le=2048)
    #: Requests in flight to each provider, shared by every worker process (0: no limit). Twilio allows an
    #: account 100 at once by default and answers 429 / 20429 beyond.
    inflight_sms: int = Field(100, alias="REMIND_INFLIGHT_SMS", ge=0)
    inflight_email: int = Field(100, alias="REMIND_INFLIGHT_EMAIL", ge=0)
    inflight_push: int = Field(100, alias="REMIND_INFLIGHT_PUSH", ge=0)
    rate_sms: str | None = Field(None, alias="REMIND_RATE_SMS")
    rate_email: str | None = Field(None, alias="REMIND_RATE_EMAIL")
    rate_push: str | None = Field(None, alias="REMIND_RATE_PUSH")
    # Providers: a channel uses its real provider when these credentials are set.
    twilio_account_sid: str | None = Field(None, alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: str | None = Field(None, alias="TWILIO_AUTH_TOKEN")
    twilio_messaging_service_sid: str | None = Field(None, alias="TWILIO_MESSAGING_SERVICE_SID")
    twilio_from_number: str | None = Field(None, alias="TWILIO_FROM_NUMBER")
    twilio_api_base_url: str = Field("https://api.twilio.com", alias="TWILIO_API_BASE_URL")
    sendgrid_api_key: str | None = Field(None, alias="SENDGRID_API_KEY")
    sendgrid_from_email: str | None = Field(None, alias="SENDGRID_FROM_EMAIL")
    sendgrid_event_public_key: str | None = Field(None, alias="SENDGRID_EVENT_PUBLIC_KEY")
    sendgrid_api_base_url: str = Field("https://api.sendgrid.com", alias="SENDGRID_API_BASE_URL")
    fcm_project_id: str | None = Field(None, alias="FCM_PROJECT_ID")
    fcm_credentials_file: Path | None = Field(None, alias="FCM_CREDENTIALS_FILE")
    fcm_api_base_url: str = Field("https://fcm.googleapis.com", alias="FCM_API_BASE_URL")
    provider_timeout: float = Field(10.0, alias="REMIND_PROVIDER_TIMEOUT", gt=0)
    #: Unset: 0.0.0.0 when PORT is set (a platform such as Heroku routes to it), else 127.0.0.1.
    host: str | None = Field(None, alias="REMIND_HOST")
    port: int | None = Field(None, alias="PORT", ge=0, le=65535)
    #: Each scope's bearer tokens, comma-separated so a new one can be rolled out before the old is removed:
    #: the platform's (/v1 transactions and erasure), ops' (stats, /ops) and Prometheus' (/metrics).
    api_tokens: str = Field("", alias="REMIND_API_TOKEN")
    ops_tokens: str = Field("", alias="REMIND_OPS_TOKEN")
    metrics_tokens: str = Field("", alias="REMIND_METRICS_TOKEN")
    max_body_bytes: int = Field(65536, alias="REMIND_MAX_BODY_BYTES", gt=0)
    #: Days after a transaction settles before its customer's name, phone, email and push tokens are erased
    #: (0: kept until erased on request).
    retention_days: int = Field(90, alias="REMIND_RETENTION_DAYS", ge=0)
    sms_segment_budget: int = Field(3, alias="REMIND_SMS_SEGMENT_BUDGET", gt=0)  # `schedules check` warns above

    @field_validator("env")
    @classmethod
    def _known_env(cls, value: str) -> str:
        if value not in ("development", "production"):
            raise ValueError("REMIND_ENV is development or production")
        return value

    @field_validator("secret_key")
    @classmethod
    def _not_published(cls, value: str) -> str:
        if value in _KNOWN_SECRETS:
            raise ValueError(f"REMIND_SECRET_KEY {secret_problem(value)}: set a long random value "
                             "(`openssl rand -hex 32`), or leave it unset in development")
        return value

    @field_validator("dev_sender")
    @classmethod
    def _known_sinks(cls, value: str | None) -> str | None:
        if value is None:
            return None
        sinks = [s.strip() for s in value.split(",") if s.strip()]
        unknown = [s for s in sinks if s not in ("outbox", "console")]
        if not sinks or unknown:
            raise ValueError(f"REMIND_DEV_SENDER takes outbox and/or console, not {unknown or value!r}")
        return ",".join(sinks)

    @field_validator("rate_sms", "rate_email", "rate_push")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value:
            parse_rate(value)
        return value or None

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("REMIND_LOG_FORMAT is text or json")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"REMIND_LOG_LEVEL is one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @property
    def inflight_limits(self) -> dict[str, int]:
        return {"sms": self.inflight_sms, "email": self.inflight_email, "push": self.inflight_push}

    @property
    def public_base(self) -> str:
        return self.public_url.rstrip("/")

    @property
    def production(self) -> bool:
        """Customers are real here: REMIND_ENV=production, or a shared database or broker implies it."""
        return self.env == "production" or not self.database_url.startswith("sqlite") or bool(self.redis_url)

    @property
    def dev_sinks(self) -> str | None:
        """The sinks standing in for providers: what REMIND_DEV_SENDER says, else outbox,console in
        development and none in production (a missing credential must not pass for a sent message)."""
        if self.dev_sender:
            return self.dev_sender
        return None if self.production else "outbox,console"

    @property
    def listen_host(self) -> str:
        if self.host:
            return self.host
        return "0.0.0.0" if self.port is not None else "127.0.0.1"

    @property
    def listen_port(self) -> int:
        return 8000 if self.port is None else self.port

    @property
    def secret_file(self) -> Path:
        """SECRET_FILE beside the SQLite database file (the working folder for an in-memory database)."""
        rest = self.database_url.split("?", 1)[0].partition("://")[2]  # sqlite:///rel.db, sqlite:////abs.db
        path = rest[1:] if rest.startswith("/") else ""
        return (Path(path).parent if path and path != ":memory:" else Path(".")) / SECRET_FILE

    def with_secret(self) -> Settings:
        """These settings with the key a process signs links with. Raises SettingsError naming
        REMIND_SECRET_KEY when it is weak, or unset in production."""
        if self.secret_key:
            problem = secret_problem(self.secret_key)
            if problem:
                raise SettingsError("REMIND_SECRET_KEY", f"{problem}: anyone who guesses it can confirm any "
                                    "transfer; set a long random value, e.g. `openssl rand -hex 32`")
            return self
        if self.production:
            raise SettingsError("REMIND_SECRET_KEY", "required in production (REMIND_ENV=production, a PostgreSQL "
                                "DATABASE_URL or REDIS_URL): set a long random value, e.g. `openssl rand -hex 32`")
        return self.model_copy(update={"secret_key": local_secret(self.secret_file)})

    def folder_problems(self) -> list[SettingsError]:
        """The schedules and templates folders that are missing, each naming its setting and what to do."""
        problems = []
        for setting, what, folder in (("REMIND_SCHEDULES_DIR", "schedules", self.schedules_dir),
                                      ("REMIND_TEMPLATES_DIR", "templates", self.templates_dir)):
            if not Path(folder).is_dir():
                shown = folder if Path(folder).is_absolute() else f"./{folder}"
                problems.append(SettingsError(setting, f"the {what} folder {shown} does not exist; set {setting} "
                                              f"to your {what} folder, or run from the folder that holds {what}/"))
        return problems

    @property
    def api_token_list(self) -> list[str]:
        """Several tokens may be valid at once, so a new one can be rolled out before the old is removed."""
        return self.token_lists["platform"]

    @property
    def token_lists(self) -> dict[str, list[str]]:
        """Each scope's valid tokens (platform, ops, metrics); a token of one scope never opens another."""
        return {scope: [t.strip() for t in raw.split(",") if t.strip()] for scope, raw in
                (("platform", self.api_tokens), ("ops", self.ops_tokens), ("metrics", self.metrics_tokens))}

    @model_validator(mode="after")
    def _scopes_apart(self) -> Settings:
        lists = self.token_lists
        for a, b in (("platform", "ops"), ("platform", "metrics"), ("ops", "metrics")):
            if set(lists[a]) & set(lists[b]):
                raise ValueError(f"{TOKEN_VARIABLES[a]} and {TOKEN_VARIABLES[b]} share a token: each scope needs "
                                 "its own, or the platform's token would open ops (or ops' the platform API)")
        return self
