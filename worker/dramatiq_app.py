"""Entry module for dramatiq's own worker CLI (`remind worker` runs `dramatiq worker.dramatiq_app`).

It makes the checks every process makes (a strong REMIND_SECRET_KEY, the providers of every channel in
production) even when started as `dramatiq worker.dramatiq_app` directly, and refuses with one line."""

import logging
import sys

import dramatiq
from pydantic import ValidationError

from .broker import bind, make_broker
from .errors import ConfigError, SettingsError
from .logs import setup
from .runner import preflight, prepare, watch_config
from .senders import describe
from .service import Remind
from .settings import Settings, describe_invalid


def _refuse(message: str, code: int) -> None:
    print(f"remind worker: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


try:
    settings = prepare(Settings())
    setup(settings.log_format, settings.log_level)
    remind = Remind.from_settings(settings, migrate=False)
    preflight(remind)
except SettingsError as exc:
    _refuse(str(exc), 78)
except ConfigError as exc:
    _refuse("invalid configuration (`remind schedules check` shows every problem): " + "; ".join(exc.problems), 78)
except ValidationError as exc:
    _refuse("; ".join(describe_invalid(exc)), 78)
broker = make_broker(settings)
dramatiq.set_broker(broker)
actors = bind(remind, broker)
watch_config(remind)
logging.getLogger("remind").info("worker ready: broker redis, senders %s", describe(remind.senders))
