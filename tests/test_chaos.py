"""The fault run at CI size: two schedulers and two workers on the real Redis and PostgreSQL while
workers are SIGKILLed, Redis restarts and providers fail; nothing lost, nothing sent twice."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT


@pytest.mark.timeout(300)
def test_chaos_small(postgres_url, redis_url):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--small"], capture_output=True,
                          text=True, timeout=280, cwd=ROOT)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert last.startswith("chaos: transactions=150 ")
    counts = dict(part.split("=") for part in last.removeprefix("chaos: ").split())
    assert int(counts["sent"]) > 300
    assert all(counts[k] == "0" for k in ("duplicates", "lost", "reminded_after_confirm", "confirmed_then_cancelled",
                                          "cancelled_twice", "webhooks_missing"))
