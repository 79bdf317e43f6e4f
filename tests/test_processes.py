"""The production shape: `remind worker` (dramatiq's CLI, separate processes) consuming from Redis what
a scheduler enqueued, against PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from support import ROOT, daytime_schedules, make_settings, transaction

from worker.broker import bind, make_broker
from worker.service import Remind


def test_remind_worker_processes_deliver_what_the_scheduler_enqueued(tmp_path, postgres_url, redis_url):
    from support import reset_database

    reset_database(postgres_url)
    namespace = f"remind-proc-{uuid.uuid4().hex}"
    settings = make_settings(tmp_path, postgres_url, redis_url=redis_url, redis_namespace=namespace,
                             schedules_dir=daytime_schedules(tmp_path))
    env = {**os.environ, "DATABASE_URL": postgres_url, "REDIS_URL": redis_url,
           "REMIND_REDIS_NAMESPACE": namespace, "REMIND_OUTBOX": str(settings.outbox),
           "REMIND_DEV_SENDER": "outbox", "REMIND_SCHEDULES_DIR": str(daytime_schedules(tmp_path)),
           "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_PUBLIC_URL": "https://pay.example",
           "REMIND_SECRET_KEY": "a-long-random-test-secret"}
    remind = Remind.from_settings(settings)
    bind(remind, make_broker(settings))
    started = datetime.now(UTC) - timedelta(minutes=16)
    for i in range(20):
        remind.register(transaction(f"tx_p{i}", created_at=started.isoformat()))
    assert len(remind.tick().enqueued) == 20
    worker = subprocess.Popen([str(Path(sys.executable).parent / "remind"), "worker", "-p", "2", "-t", "2"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        lines: list[dict] = []
        while time.monotonic() < deadline and len(lines) < 20:
            time.sleep(0.5)
            if settings.outbox.exists():
                lines = [json.loads(x) for x in settings.outbox.read_text().splitlines()]
        assert sorted(x["transaction_id"] for x in lines) == sorted(f"tx_p{i}" for i in range(20))
        assert {x["step"] for x in lines} == {"nudge"}
        assert all(e["status"] == "sent" for i in range(20) for e in remind.show(f"tx_p{i}")["timeline"]
                   if e["step"] == "nudge")
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert worker.returncode is not None, output


def test_remind_run_serves_the_api_over_http(tmp_path):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMIND_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
                "REMIND_SCHEDULES_DIR": str(daytime_schedules(tmp_path)),
                "REMIND_API_TOKEN": "tok", "PORT": str(port), "REMIND_DEV_SENDER": "outbox"})
    proc = subprocess.Popen([str(Path(sys.executable).parent / "remind"), "run"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        headers = {"Authorization": "Bearer tok"}
        created = httpx.post(f"{base}/v1/transactions", json=transaction("tx_run", created_at=None), headers=headers)
        assert created.status_code == 201, created.text
        shown = httpx.get(f"{base}/v1/transactions/tx_run", headers=headers).json()
        assert shown["status"] == "pending" and shown["schedule"] == "default"
        assert httpx.get(f"{base}/readyz").json()["checks"]["broker"] == "ok (in-process)"
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "serving HTTP on" in output


def test_the_provider_rate_limit_holds_across_worker_processes(tmp_path, postgres_url, redis_url):
    from collections import Counter

    from support import reset_database

    reset_database(postgres_url)
    namespace = f"remind-rate-{uuid.uuid4().hex}"
    settings = make_settings(tmp_path, postgres_url, redis_url=redis_url, redis_namespace=namespace,
                             schedules_dir=daytime_schedules(tmp_path))
    env = {**os.environ, "DATABASE_URL": postgres_url, "REDIS_URL": redis_url, "REMIND_REDIS_NAMESPACE": namespace,
           "REMIND_OUTBOX": str(settings.outbox), "REMIND_DEV_SENDER": "outbox", "REMIND_RATE_PUSH": "4/1s",
           "REMIND_SCHEDULES_DIR": str(daytime_schedules(tmp_path)), "REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
           "REMIND_SECRET_KEY": "a-long-random-test-secret"}
    remind = Remind.from_settings(settings)
    bind(remind, make_broker(settings))
    started = datetime.now(UTC) - timedelta(minutes=16)
    for i in range(24):
        remind.register(transaction(f"tx_r{i}", created_at=started.isoformat()))
    assert len(remind.tick().enqueued) == 24
    remind_bin = str(Path(sys.executable).parent / "remind")
    workers = [subprocess.Popen([remind_bin, "worker", "-p", "1", "-t", "4"], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        deadline = time.monotonic() + 90
        lines: list[dict] = []
        while time.monotonic() < deadline and len(lines) < 24:
            time.sleep(0.5)
            if settings.outbox.exists():
                lines = [json.loads(x) for x in settings.outbox.read_text().splitlines()]
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
    assert len(lines) == 24
    sent = sorted(datetime.fromisoformat(x["sent_at"]) for x in lines)
    # Without the shared limit all 24 go out within a second. With 4/s the run takes about 6 s; the
    # outbox stamps a message a moment after its slot was taken, so windows get a little slack.
    assert (sent[-1] - sent[0]).total_seconds() >= 24 / 4 - 2
    in_any_3s = max(sum(1 for t in sent if start <= t < start + timedelta(seconds=3)) for start in sent)
    assert in_any_3s <= 3 * 4 + 4, Counter(t.replace(microsecond=0) for t in sent)


def test_two_worker_processes_overlap_sends_but_never_exceed_the_providers_limit(tmp_path, postgres_url, redis_url,
                                                                                  twilio_fake):
    """Each process keeps many sends in flight (one dramatiq thread each here: without the send pool
    they could hold 2 at once), and the Twilio limit holds across both processes through Redis."""
    from support import reset_database

    reset_database(postgres_url)
    twilio_fake.latency = (0.05, 0.1)
    namespace = f"remind-proc-{uuid.uuid4().hex}"
    schedules = daytime_schedules(tmp_path)
    settings = make_settings(tmp_path, postgres_url, redis_url=redis_url, redis_namespace=namespace,
                             schedules_dir=schedules)
    env = {**os.environ, "DATABASE_URL": postgres_url, "REDIS_URL": redis_url,
           "REMIND_REDIS_NAMESPACE": namespace, "REMIND_OUTBOX": str(settings.outbox),
           "REMIND_DEV_SENDER": "outbox", "REMIND_SCHEDULES_DIR": str(schedules),
           "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_PUBLIC_URL": "https://pay.example",
           "REMIND_SECRET_KEY": "a-long-random-test-secret", "REMIND_INFLIGHT_SMS": "5",
           "TWILIO_ACCOUNT_SID": twilio_fake.account_sid, "TWILIO_AUTH_TOKEN": twilio_fake.auth_token,
           "TWILIO_MESSAGING_SERVICE_SID": twilio_fake.messaging_service_sid,
           "TWILIO_API_BASE_URL": twilio_fake.base_url}
    remind = Remind.from_settings(settings)
    bind(remind, make_broker(settings))
    started = datetime.now(UTC) - timedelta(minutes=125)  # the 2 h reminder (SMS + push) is due
    for i in range(40):
        remind.register(transaction(f"tx_l{i}", created_at=started.isoformat()))
    enqueued = remind.tick().enqueued
    assert len(enqueued) == 80
    worker = subprocess.Popen([str(Path(sys.executable).parent / "remind"), "worker", "-p", "2", "-t", "1"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(twilio_fake.messages) < 40:
            time.sleep(0.2)
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert sorted(m.to for m in twilio_fake.messages) == ["+8613800138000"] * 40, output[-2000:]
    assert twilio_fake.max_in_flight == 5  # more than the 2 threads could hold, never more than the limit
    assert not twilio_fake.rejected
