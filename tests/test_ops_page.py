"""The ops page under a real uvicorn server, rendered by headless Chromium (Debian's `chromium`).
The screenshot is kept at tests/artifacts/ops.png (git-ignored) and under the test's tmp dir."""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from support import IN_CI, ROOT, T0, Harness, transaction

from worker.stats import summarize
from worker.web.app import create_app
from worker.web.ops import render_page

TOKEN = "ops-token"
ARTIFACTS = ROOT / "tests" / "artifacts"
TICKS = (5, 15, 30, 60, 120, 240, 360, 480, 1200, 1440)  # minutes: every step of the shipped ladders


def fill(h: Harness) -> None:
    """40 transactions on the shipped schedules; each confirms at a fixed random minute or never."""
    rng = random.Random(7)
    confirms: list[tuple[int, str]] = []
    for i in range(40):
        kind = ("returning", "new", "risk")[i % 3]
        tx = transaction(f"tx_{i:02d}", risk_flag=kind == "risk", customer={"segment": kind if kind != "risk"
                                                                            else "returning"})
        h.remind.register(tx)
        if rng.random() < 0.6:
            confirms.append((rng.choice((3, 10, 20, 45, 50, 90, 150, 200, 300, 420, 700, 1300)), tx["id"]))
    events = sorted([(m, "tick", "") for m in TICKS] + [(m, "confirm", tx) for m, tx in confirms])
    for minute, what, tx_id in events:
        h.at(minutes=minute)
        if what == "tick":
            h.tick()
        elif h.remind.store.get_transaction(tx_id)["status"] in ("pending", "escalated"):
            h.remind.confirm(tx_id)
    h.at(minutes=TICKS[-1] + 5)


@pytest.fixture
def server(make_harness) -> Iterator[tuple[str, Harness]]:
    h = make_harness(ops_tokens=TOKEN)
    fill(h)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(h.remind), log_level="warning", server_header=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", h
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def browser() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing browser is a failure, not a skip)")
        pytest.skip(message)
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("backend", ["sqlite+stub"], indirect=True)
def test_ops_page_renders_in_headless_chromium(browser, server, tmp_path):
    base, _ = server
    url = f"{base}/ops"
    response = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    html = response.text
    for chart in ('class="chart funnel"', 'class="chart histogram"', 'class="chart ladder"'):
        assert chart in html
    for name in ("default", "new_customer", "risk_review"):
        assert f'id="schedule-{name}"' in html
    assert "<script" not in html and "default-src 'none'" in response.headers["content-security-policy"]
    assert httpx.get(f"{base}/ops").headers["location"] == "/ops/login"

    # Chromium cannot send the bearer header, and a token never goes in a URL: it renders the page as served.
    served = tmp_path / "ops.html"
    served.write_text(html)
    shot = tmp_path / "ops.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                    f"--screenshot={shot}", "--window-size=1280,1600", served.as_uri()],
                   check=True, timeout=90, capture_output=True)
    assert shot.exists() and shot.stat().st_size > 30_000, "the screenshot is missing or blank"
    assert png_size(shot) == (1280, 1600)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "ops.png")
    (ARTIFACTS / "ops.html").write_text(html)


def test_the_page_escapes_what_it_shows():
    tx = {"id": "x", "schedule": "<img src=x onerror=alert(1)>", "status": "pending", "created_at": T0,
          "confirmed_at": None, "cancelled_at": None, "escalated_at": None}
    data = {"generated_at": "now", "since": None, "schedule": None, "schedules": summarize([tx], [])}
    html = render_page(data, [], since="<u>7d</u>")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<u>" not in html and "&lt;u&gt;7d" in html and "<script>" not in html


def test_the_web_process_starts_without_the_statistics_libraries():
    """numpy, scipy and statsmodels (~40 to 150 MB) load with the first comparison or what-if that needs them,
    never with the process that serves the confirmation links: importing the app, the stats, the comparison
    and the costs loads none of them."""
    code = ("import sys\n"
            "import worker.web.app, worker.stats, worker.experiments, worker.export, worker.attribution\n"
            "print(sorted(m for m in ('numpy', 'scipy', 'statsmodels', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
