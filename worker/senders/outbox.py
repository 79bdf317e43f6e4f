"""The outbox sender: one JSON object a line in a file, the embedded default's delivery sink."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

from .base import OutgoingMessage


class OutboxSender:
    """Appends each message to ``path`` with one ``write`` under an exclusive lock, so lines from
    many threads and processes never interleave."""

    name = "outbox"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def send(self, message: OutgoingMessage) -> str | None:
        line = {
            "transaction_id": message.transaction_id,
            "step": message.step,
            "channel": message.channel,
            "recipient": message.recipient,
            "subject": message.subject,
            "body": message.body,
            "variant": message.variant,
            "sent_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        if message.html is not None:
            line["html"] = message.html
        if message.data:
            line["data"] = message.data  # push data: the confirmation deep link
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, data)
            finally:
                os.close(fd)
        return None
