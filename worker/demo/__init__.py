"""`remind demo`: two transactions on a second-scale ladder, on the embedded default.

One customer confirms after the first reminder (the rest stop); the other never does (reminders
escalate across push, SMS and email, then the transaction is cancelled with a notice). ``--speed``
runs the service's clock faster than the wall clock, so the same ladder plays out in less time.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..runner import Embedded
from ..service import Remind
from ..settings import Settings

DEMO_SCHEDULE = Path(__file__).parent / "demo.yaml"
#: The templates the package ships (a link to the top-level templates/ in the source tree, files in a
#: wheel), so the demo runs from any directory.
SHIPPED_TEMPLATES = Path(__file__).parent / "templates"


def demo_transactions(now: datetime) -> list[dict]:
    arrival = (now + timedelta(days=1)).isoformat()
    return [
        {"id": f"demo_confirms_{now:%H%M%S}",
         "customer": {"id": "c_1", "name": "Li Wei", "phone": "+8613800138000", "email": "li.wei@example.com",
                      "push_tokens": ["demo-device-token-li-wei"], "locale": "zh-CN",
                      "timezone": "Asia/Shanghai", "segment": "new"},
         "amount": "1000.00", "currency": "CNY", "fee": "12.50", "payment_method": "Bank card ending 1234",
         "expected_arrival": arrival, "created_at": now.isoformat()},
        {"id": f"demo_ignores_{now:%H%M%S}",
         "customer": {"id": "c_2", "name": "Ana Silva", "phone": "+14155550123", "email": "ana@example.com",
                      "push_tokens": ["demo-device-token-ana"], "locale": "en", "timezone": "America/New_York",
                      "segment": "returning"},
         "amount": "250.00", "currency": "USD", "fee": "3.99", "payment_method": "Visa ending 4242",
         "expected_arrival": arrival, "created_at": now.isoformat()},
    ]


class DemoClock:
    """The service's clock in the demo: the wall clock's pace times ``speed``, from the moment it is made. The
    store, the ladder and the deadlines all read it, so the demo's ladder is the same at any speed, only shorter
    in real seconds (the ticks, on the wall clock, come ``speed`` times as often)."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._start = datetime.now(UTC)
        self._started = time.monotonic()

    def __call__(self) -> datetime:
        return self._start + timedelta(seconds=(time.monotonic() - self._started) * self.speed)


def run_demo(base: Settings, say: Callable[[str], None], timeout: float = 55.0, *, speed: float = 1.0) -> bool:
    """Run the demo; True when both transactions settled within ``timeout`` real seconds. It keeps nothing but
    the outbox: a fresh database, the package's templates (unless REMIND_TEMPLATES_DIR is set) and a key nobody
    else knows. ``speed`` > 1 runs the service's clock that many times faster than the wall clock."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    work = Path(tempfile.mkdtemp(prefix="remind-demo-"))
    try:
        schedules = work / "schedules"
        schedules.mkdir()
        shutil.copy(DEMO_SCHEDULE, schedules / "demo.yaml")
        templates = base.templates_dir if "templates_dir" in base.model_fields_set else SHIPPED_TEMPLATES
        settings = base.model_copy(update={
            "env": "development", "database_url": f"sqlite:///{work / 'demo.db'}", "redis_url": None,
            "schedules_dir": schedules, "templates_dir": templates, "secret_key": secrets.token_urlsafe(32),
            "tick_seconds": 0.5 / speed, "worker_threads": 4, "platform_webhook_url": None,
            # never the real providers: the demo's customers are made up
            "twilio_account_sid": None, "sendgrid_api_key": None, "fcm_project_id": None})
        problems = settings.folder_problems()
        if problems:
            raise problems[0]
        settings.outbox.unlink(missing_ok=True)
        clock = DemoClock(speed)
        remind = Remind.from_settings(settings, clock=clock)
        engine = Embedded(remind).start()
        try:
            now = clock()
            confirms, ignores = (tx["id"] for tx in demo_transactions(now))
            for tx in demo_transactions(now):
                remind.register(tx)
                say(f"registered {tx['id']}: {tx['amount']} {tx['currency']} for {tx['customer']['name']}")
            confirmed = False
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not confirmed and any(e["status"] == "sent" for e in remind.show(confirms)["timeline"]):
                    remind.confirm(confirms)
                    confirmed = True
                    say(f"the customer confirmed {confirms} after the first reminder: its reminders stop")
                if confirmed and not remind.store.unsettled([confirms, ignores]):
                    break
                time.sleep(0.2 / speed)
            else:
                say("the demo did not settle in time")
                return False
        finally:
            engine.stop()
        for tx_id in (confirms, ignores):
            view = remind.show(tx_id)
            sent = sum(1 for e in view["timeline"] if e["status"] == "sent")
            say(f"{tx_id}: {view['status']}, {sent} messages sent")
        say(f"every message is in {settings.outbox}")
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)
