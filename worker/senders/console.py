"""The console sender: prints each message for a person watching `remind run` or `remind demo`."""

from __future__ import annotations

import re
import sys
import threading
from typing import TextIO

from ..masking import mask_recipient
from .base import OutgoingMessage

#: The confirmation token is a credential: the console shows that a link is there, not the link.
_LINK = re.compile(r"/c/[A-Za-z0-9_.\-]+")

_ICONS = {"sms": "SMS", "email": "EMAIL", "push": "PUSH", "webhook": "WEBHOOK"}


class ConsoleSender:
    """Recipients are masked here too: the console is a log."""

    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def send(self, message: OutgoingMessage) -> str | None:
        stream = self.stream or sys.stdout
        head = (f"── {_ICONS.get(message.channel, message.channel)} to "
                f"{mask_recipient(message.channel, message.recipient)} · {message.transaction_id} · "
                f"step {message.step} · variant {message.variant}")
        lines = [head]
        if message.subject:
            lines.append(f"   {message.subject}")
        lines.extend(f"   {_LINK.sub('/c/…', line)}" for line in message.body.splitlines() if line.strip())
        with self._lock:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        return None
