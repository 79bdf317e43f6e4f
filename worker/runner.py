"""Long-running process shapes: the embedded all-in-one, the scheduler alone. Thin by design."""

from __future__ import annotations

import logging
import signal
import threading
import time

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.blocking import BlockingScheduler

from .broker import InProcessWorker, RedisRestarts, bind, make_broker
from .errors import SettingsError, Unavailable
from .senders import check_channels
from .service import Remind
from .settings import Settings

log = logging.getLogger("remind.runner")

#: Seconds between retention sweeps (REMIND_RETENTION_DAYS); a job apart from the tick, so the tick stays fast.
RETENTION_SECONDS = 300


def prepare(settings: Settings) -> Settings:
    """What every long-running process checks before it builds anything: folders, then the signing key (a
    development key is generated into a local file). Raises SettingsError naming the setting."""
    problems = settings.folder_problems()
    if problems:
        raise problems[0]
    settings = settings.with_secret()
    if settings.production and not settings.dev_sinks and "public_url" not in settings.model_fields_set:
        raise SettingsError("REMIND_PUBLIC_URL", "required in production: the https:// address customers open "
                            "confirmation links on")
    return settings


def preflight(remind: Remind) -> None:
    """After the schedules are loaded: in production every channel they use must reach a real provider."""
    check_channels(remind.settings, remind.registry.channels())


class _Outages:
    """What a periodic job logs while the database or Redis is down: one warning when the outage starts and one
    line when the job works again, instead of a traceback every few seconds. Anything else stays a traceback."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def failed(self, job: str, exc: Exception) -> bool:
        """True when ``exc`` is an outage (logged once); False for anything else (the caller logs it)."""
        outage = Unavailable.of(exc)
        if outage is None:
            return False
        if job not in self._since:
            self._since[job] = time.monotonic()
            log.warning("%s: the %s is unreachable (%s); trying again every few seconds", job, outage.what,
                        outage.reason)
        return True

    def worked(self, job: str) -> None:
        since = self._since.pop(job, None)
        if since is not None:
            log.info("%s: working again after %.0f s", job, time.monotonic() - since)


_outages = _Outages()


def _tick(remind: Remind, restarts: RedisRestarts | None = None) -> None:
    if restarts is not None:
        try:
            restarts()
        except Exception as exc:  # the tick goes on: deadlines settle in SQL even while Redis is down
            if not _outages.failed("Redis check", exc):
                log.exception("Redis check failed")
        else:
            _outages.worked("Redis check")
    try:
        result = remind.tick()
    except Exception as exc:  # a failed tick must not kill the scheduler; the next one retries
        if not _outages.failed("tick", exc):
            log.exception("tick failed")
        return
    _outages.worked("tick")
    if result:
        log.info("tick: %d due, %d enqueued, %d skipped late, %d settled, %d recovered",
                 result.claimed, len(result.enqueued), result.skipped, result.settled, result.recovered)


def _retention(remind: Remind) -> None:
    try:
        erased = remind.erase_expired()
    except Exception as exc:  # the next sweep tries again
        if not _outages.failed("retention sweep", exc):
            log.exception("retention sweep failed")
        return
    _outages.worked("retention sweep")
    if erased:
        log.info("retention: personal data erased from %d transactions settled over %d days ago", erased,
                 remind.settings.retention_days)


def _reload(remind: Remind, reschedule: bool) -> None:
    try:
        remind.reload_if_changed(reschedule=reschedule)
    except Exception:  # a reload must never stop the process
        log.exception("configuration reload crashed; keeping the last good one")


def _add_tick(scheduler, remind: Remind) -> None:
    # Each process keeps its tick in memory (APScheduler 3 cannot share a job store between
    # processes); the database claim is what coordinates several schedulers.
    restarts = RedisRestarts(remind.settings, remind) if remind.settings.redis_url else None
    scheduler.add_job(_tick, "interval", args=[remind, restarts], seconds=remind.settings.tick_seconds,
                      id="tick", max_instances=1, coalesce=True, misfire_grace_time=None)
    if remind.settings.retention_days:
        scheduler.add_job(_retention, "interval", args=[remind], seconds=RETENTION_SECONDS, id="retention",
                          max_instances=1, coalesce=True, misfire_grace_time=None)
    if remind.settings.reload_seconds:
        scheduler.add_job(_reload, "interval", args=[remind, True], seconds=remind.settings.reload_seconds,
                          id="reload", max_instances=1, coalesce=True, misfire_grace_time=None)


def watch_config(remind: Remind) -> threading.Thread | None:
    """Hot reload for processes without a scheduler (web, dramatiq workers): a daemon thread."""
    interval = remind.settings.reload_seconds
    if not interval:
        return None

    def loop() -> None:
        while True:
            time.sleep(interval)
            _reload(remind, False)

    thread = threading.Thread(target=loop, name="config-reload", daemon=True)
    thread.start()
    return thread


def web_server(remind: Remind, host: str | None = None, port: int | None = None):
    """A uvicorn server for the web app (not started)."""
    import uvicorn

    from .web.app import create_app

    config = uvicorn.Config(create_app(remind), host=host or remind.settings.listen_host,
                            port=remind.settings.listen_port if port is None else port, log_level="warning",
                            server_header=False, proxy_headers=True)
    return uvicorn.Server(config)


class Embedded:
    """Scheduler, dramatiq workers and (optionally) the web app in one process: `remind run`, `remind demo`."""

    def __init__(self, remind: Remind, *, web: bool = False, port: int | None = None) -> None:
        self.remind = remind
        self.broker = make_broker(remind.settings)
        self.actors = bind(remind, self.broker)
        self.worker = InProcessWorker(self.broker, threads=remind.settings.worker_threads)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.server = web_server(remind, port=port) if web else None
        self._web_thread: threading.Thread | None = None

    def start(self) -> Embedded:
        self.worker.start()
        _add_tick(self.scheduler, self.remind)
        self.scheduler.start()
        if self.server is not None:
            self.server.install_signal_handlers = lambda: None  # the main thread owns signals
            self._web_thread = threading.Thread(target=self.server.run, name="web", daemon=True)
            self._web_thread.start()
            log.info("serving HTTP on http://%s:%s", self.server.config.host, self.server.config.port)
        return self

    def stop(self) -> None:
        if self.server is not None and self._web_thread is not None:
            self.server.should_exit = True
            self._web_thread.join(timeout=10)
        self.scheduler.shutdown(wait=True)
        self.worker.stop()


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def run_scheduler(remind: Remind) -> None:
    """`remind scheduler`: ticks forever, enqueueing to the configured broker."""
    broker = make_broker(remind.settings)
    bind(remind, broker)
    scheduler = BlockingScheduler(timezone="UTC")
    _add_tick(scheduler, remind)
    log.info("scheduler ticking every %ss", remind.settings.tick_seconds)
    scheduler.start()
