"""Entry module for dramatiq's own worker CLI (`remind worker` runs `dramatiq worker.dramatiq_app`)."""

import logging

import dramatiq

from .broker import bind, make_broker
from .logs import setup
from .runner import watch_config
from .senders import describe
from .service import Remind
from .settings import Settings

settings = Settings()
setup(settings.log_format)
remind = Remind.from_settings(settings, migrate=False)
broker = make_broker(settings)
dramatiq.set_broker(broker)
actors = bind(remind, broker)
watch_config(remind)
logging.getLogger("remind").info("worker ready: broker redis, senders %s", describe(remind.senders))
