"""reminder-worker: remind customers to confirm pending transactions; cancel the ones never confirmed.

The Python API is :class:`worker.service.Remind`; see docs/architecture.md for the map.
"""

from .errors import AlreadySettled, ConfigError, Conflict, InvalidInput, NotFound, RemindError
from .service import Registration, Remind
from .settings import Settings

__all__ = ["AlreadySettled", "ConfigError", "Conflict", "InvalidInput", "NotFound", "Registration", "Remind",
           "RemindError", "Settings"]
