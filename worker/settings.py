"""The one typed settings object, read from the environment (and a `.env` file when present)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .ladder.durations import parse_duration

_KNOWN_SECRETS = frozenset({"dev-secret-change-me", "change-me", "changeme", "secret"})


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

    database_url: str = Field("sqlite:///remind.db", alias="DATABASE_URL")
    redis_url: str | None = Field(None, alias="REDIS_URL")
    schedules_dir: Path = Field(Path("schedules"), alias="REMIND_SCHEDULES_DIR")
    templates_dir: Path = Field(Path("templates"), alias="REMIND_TEMPLATES_DIR")
    outbox: Path = Field(Path("outbox.jsonl"), alias="REMIND_OUTBOX")
    dev_sender: str = Field("outbox,console", alias="REMIND_DEV_SENDER")
    tick_seconds: float = Field(5.0, alias="REMIND_TICK_SECONDS", gt=0)
    reload_seconds: float = Field(2.0, alias="REMIND_RELOAD_SECONDS", ge=0)  # 0: no hot reload
    lease_seconds: float = Field(300.0, alias="REMIND_LEASE_SECONDS", gt=0)
    batch_size: int = Field(1000, alias="REMIND_BATCH_SIZE", gt=0)
    #: Most deliveries one worker message carries (their database round trips are shared).
    delivery_batch: int = Field(20, alias="REMIND_DELIVERY_BATCH", gt=0, le=500)
    max_attempts: int = Field(8, alias="REMIND_MAX_ATTEMPTS", gt=0)
    webhook_max_attempts: int = Field(20, alias="REMIND_WEBHOOK_MAX_ATTEMPTS", gt=0)
    #: The first retry's wait; dramatiq's backoff doubles it (with jitter) up to 5 minutes.
    min_backoff_ms: int = Field(1000, alias="REMIND_MIN_BACKOFF_MS", gt=0)
    worker_threads: int = Field(8, alias="REMIND_WORKER_THREADS", gt=0)
    secret_key: str = Field("dev-secret-change-me", alias="REMIND_SECRET_KEY")
    public_url: str = Field("http://127.0.0.1:8000", alias="REMIND_PUBLIC_URL")
    restart_url: str | None = Field(None, alias="REMIND_RESTART_URL")
    platform_webhook_url: str | None = Field(None, alias="REMIND_PLATFORM_WEBHOOK_URL")
    webhook_secret: str | None = Field(None, alias="REMIND_WEBHOOK_SECRET")
    queue_name: str = Field("remind", alias="REMIND_QUEUE")
    redis_namespace: str = Field("remind", alias="REMIND_REDIS_NAMESPACE")
    log_format: str = Field("text", alias="REMIND_LOG_FORMAT")
    #: Provider calls one worker process keeps in flight at once (its send pool; the senders' connection
    #: pools are sized to it).
    send_concurrency: int = Field(128, alias="REMIND_SEND_CONCURRENCY", gt=0, le=2048)
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
    host: str = Field("127.0.0.1", alias="REMIND_HOST")
    port: int = Field(8000, alias="PORT", ge=0, le=65535)
    api_tokens: str = Field("", alias="REMIND_API_TOKEN")
    max_body_bytes: int = Field(65536, alias="REMIND_MAX_BODY_BYTES", gt=0)
    sms_segment_budget: int = Field(3, alias="REMIND_SMS_SEGMENT_BUDGET", gt=0)  # `schedules check` warns above

    @field_validator("dev_sender")
    @classmethod
    def _known_sinks(cls, value: str) -> str:
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

    @property
    def inflight_limits(self) -> dict[str, int]:
        return {"sms": self.inflight_sms, "email": self.inflight_email, "push": self.inflight_push}

    @property
    def public_base(self) -> str:
        return self.public_url.rstrip("/")

    def weak_secret(self) -> str | None:
        """Why REMIND_SECRET_KEY cannot sign confirmation links here, or None. A known or short key lets
        anyone forge a link and confirm someone else's transfer."""
        if self.secret_key in _KNOWN_SECRETS or len(self.secret_key) < 16:
            return "REMIND_SECRET_KEY is a known default or shorter than 16 characters; set a long random value"
        return None

    @property
    def local_only(self) -> bool:
        """The embedded default on a laptop: no Redis, serving on loopback."""
        return not self.redis_url and self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def api_token_list(self) -> list[str]:
        """Several tokens may be valid at once, so a new one can be rolled out before the old is removed."""
        return [t.strip() for t in self.api_tokens.split(",") if t.strip()]
