"""The README's first command ends in `remind demo`: it must settle both transactions and exit 0.

The test runs it with `--speed 3`: the same ladder (2 s, 5 s, 8 s, cancelled at 12 s) on the service's clock,
which runs three times as fast as the wall clock, so it takes 4 s rather than 12."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import ROOT


def test_remind_demo_settles_both_transactions_and_writes_the_outbox(tmp_path):
    remind = Path(sys.executable).parent / "remind"
    assert remind.exists() or shutil.which("remind"), "the console script is installed with the package"
    # Outside the checkout, with nothing set: what the demo needs ships with the package.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMIND_", "DATABASE_URL", "REDIS_URL"))}
    assert not (tmp_path / "templates").exists() and not tmp_path.is_relative_to(ROOT)
    done = subprocess.run([str(remind), "demo", "--speed", "3"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=70)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in (tmp_path / "outbox.jsonl").read_text().splitlines()]
    confirms = [x for x in lines if x["transaction_id"].startswith("demo_confirms")]
    ignores = [x for x in lines if x["transaction_id"].startswith("demo_ignores")]
    assert [(x["step"], x["channel"]) for x in confirms] == [("nudge", "push")]
    assert {x["channel"] for x in ignores} == {"sms", "email", "push"}
    assert [x["step"] for x in ignores][-1] == "cancel"
    assert "confirmed, 1 messages sent" in done.stdout and "cancelled, 8 messages sent" in done.stdout
    assert "+8613800138000" not in done.stdout + done.stderr  # printed messages mask recipients
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outbox.jsonl"]  # its database and key are gone
