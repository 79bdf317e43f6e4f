"""Fixtures per real backend. A missing Redis or PostgreSQL skips on a laptop and fails under CI=true."""

from __future__ import annotations

import os
import socket
import uuid  # noqa: F401
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes import FcmFake, SendGridFake, TwilioFake
from support import (
    HOOK_SECRET,
    REDIS_URL,
    Clock,
    Harness,
    Platform,
    folder_digest,
    make_settings,
    private_database,
    reset_database,
    unavailable,
)

from worker.broker import InProcessWorker, bind, make_broker
from worker.service import Remind


@pytest.fixture(scope="session", autouse=True)
def config_loaded_once_per_content() -> Iterator[None]:
    """Loading and checking schedules and templates takes ~0.4 s, and most tests load the same shipped
    folders: each successful load is kept for the session under its folders' paths and file bytes, so an
    edited file (a reload test) is loaded afresh and a refused one is never cached."""
    import worker.service as service

    real = service.load_config
    loaded: dict[tuple, tuple] = {}

    def load_config(settings, *args, **kwargs):
        if args or kwargs:
            return real(settings, *args, **kwargs)
        key = (folder_digest(settings.schedules_dir), folder_digest(settings.templates_dir))
        if key not in loaded:
            loaded[key] = real(settings)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "load_config", load_config)
        yield


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    with private_database(f"remind_test_{os.getpid()}") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as exc:  # noqa: BLE001
        unavailable("Redis", exc)
    return REDIS_URL


@pytest.fixture(params=["sqlite+stub", "postgres+redis"])
def backend(request, tmp_path) -> tuple[str, str | None]:
    """(database URL, Redis URL or None): the embedded default, and the production pair."""
    if request.param == "sqlite+stub":
        return f"sqlite:///{tmp_path / 'remind.db'}", None
    pg = request.getfixturevalue("postgres_url")
    reset_database(pg)
    return pg, request.getfixturevalue("redis_url")


@pytest.fixture
def make_harness(tmp_path, backend) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []
    database_url, redis = backend

    def build(*, start_worker: bool = True, senders=None, **overrides) -> Harness:
        # retries wait REMIND_MIN_BACKOFF_MS (1 s in production) and more: milliseconds keep the suite quick
        settings = make_settings(tmp_path, database_url, redis_url=redis, **{"min_backoff_ms": 20, **overrides})
        clock = Clock()
        remind = Remind.from_settings(settings, clock=clock, senders=senders)
        broker = make_broker(settings)
        bind(remind, broker)
        if redis:
            broker.flush_all()
        worker = InProcessWorker(broker, threads=settings.worker_threads).start() if start_worker else None
        h = Harness(remind, clock, settings.outbox, worker, settings.queue_name, [broker])
        made.append(h)
        return h

    yield build
    for h in made:
        if h.worker:
            h.worker.stop()
        else:
            h.extra[0].close()
        h.remind.store.engine.dispose()


# -- provider fakes (tests/fakes): real HTTP servers on 127.0.0.1 that check requests like the APIs do --

#: Long enough to outlast every client timeout the tests set; ``stop()`` releases held requests at once.
HANG_SECONDS = 5.0


@pytest.fixture
def twilio_fake() -> Iterator[TwilioFake]:
    """Twilio's Messages API; ``account_sid``, ``auth_token``, ``messaging_service_sid``, ``from_number``."""
    with TwilioFake(hang_seconds=HANG_SECONDS) as fake:
        yield fake
    assert not fake.errors, f"the fake itself failed: {fake.errors}"


@pytest.fixture
def sendgrid_fake() -> Iterator[SendGridFake]:
    """SendGrid's Mail Send; ``api_key``."""
    with SendGridFake(hang_seconds=HANG_SECONDS) as fake:
        yield fake
    assert not fake.errors, f"the fake itself failed: {fake.errors}"


@pytest.fixture
def fcm_fake(tmp_path: Path) -> Iterator[FcmFake]:
    """FCM HTTP v1 and its token endpoint; ``project_id``, ``credentials_file`` (a fresh service account)."""
    with FcmFake(hang_seconds=HANG_SECONDS) as fake:
        fake.write_credentials(tmp_path / "fcm-service-account.json")
        yield fake
    assert not fake.errors, f"the fake itself failed: {fake.errors}"


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the platform's side, for events and reviews --------------------------------------------------------

@pytest.fixture
def hooks() -> Iterator[Platform]:
    """The platform's webhook endpoint (verifies every signature; ``down`` makes it answer 503)."""
    p = Platform()
    yield p
    p.server.shutdown()


@pytest.fixture
def service(make_harness, hooks):
    """A service with a platform URL and platform/ops tokens, and an HTTP client on its app (https: the
    /ops cookie is Secure)."""
    from starlette.testclient import TestClient

    from worker.web.app import create_app

    h = make_harness(platform_webhook_url=hooks.url, webhook_secret=HOOK_SECRET, api_tokens="plat-token",
                     ops_tokens="ops-token")
    with TestClient(create_app(h.remind), base_url="https://testserver") as client:
        yield h, client
