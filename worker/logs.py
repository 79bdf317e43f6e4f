"""Readable log lines by default, one JSON object a line when REMIND_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


#: REMIND_LOG_LEVEL's values. At info a worker logs one line per batch; at debug also one per delivery sent
#: (recipients masked).
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(fmt: str = "text", level: int | str = logging.INFO) -> None:
    if isinstance(level, str):
        level = LEVELS.get(level.lower(), logging.INFO)  # a wrong name is refused by Settings, naming it
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # twilio.http_client logs request URLs at INFO and python_http_client whole payloads at DEBUG:
    # both may carry phone numbers or addresses, so they stay at WARNING.
    for noisy in ("dramatiq", "apscheduler", "httpx", "alembic", "twilio", "python_http_client", "urllib3",
                  "google"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
