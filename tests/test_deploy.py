"""Safe to deploy: no process runs with a key anyone else knows, nothing is silently faked in production,
the web process is reachable on a platform's PORT, and every setting the code reads is documented."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support import ROOT, make_settings, transaction

from worker.links import make_token
from worker.runner import web_server
from worker.senders import senders_from_settings
from worker.service import Remind
from worker.settings import Settings

BIN = Path(sys.executable).parent
STRONG = "f3c1e0a9b7d24c65a8e1d0f9c2b74e13"
#: Variables read by the libraries we call (requests), documented in .env.example beside our own.
LIBRARY_VARIABLES = {"HTTPS_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}


def clean_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """This machine's environment less every remind and provider setting, plus ``values``."""
    ours = ("REMIND_", "DATABASE_URL", "REDIS_URL", "PORT", "TWILIO_", "SENDGRID_", "FCM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'remind.db'}", "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"),
                "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_OUTBOX": str(tmp_path / "outbox.jsonl")})
    env.update(values)
    return env


def start(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a process that must refuse to start: a process that starts instead never returns, and fails here."""
    try:
        return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} started instead of refusing")


# -- 1. secrets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["remind", "run"], ["remind", "web"], ["remind", "scheduler"],
                                     ["remind", "worker", "-p", "1"],
                                     ["dramatiq", "worker.dramatiq_app", "-p", "1", "-t", "1"]])
def test_every_production_process_refuses_to_start_without_a_strong_secret(tmp_path, command):
    env = clean_env(tmp_path, REMIND_ENV="production", REDIS_URL="redis://127.0.0.1:6379/0",
                    REMIND_PUBLIC_URL="https://pay.example", REMIND_DEV_SENDER="outbox")
    done = start([str(BIN / command[0]), *command[1:]], env, tmp_path)
    assert done.returncode == 78, done.stdout + done.stderr
    assert "REMIND_SECRET_KEY: required in production" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("secret", ["dev-secret-change-me", "short-secret", "aaaaaaaaaaaaaaaaaaaaaaaa"])
def test_a_weak_secret_is_refused_naming_the_variable(tmp_path, secret):
    env = clean_env(tmp_path, REMIND_ENV="production", REMIND_SECRET_KEY=secret,
                    REMIND_PUBLIC_URL="https://pay.example", REMIND_DEV_SENDER="outbox")
    done = start([str(BIN / "remind"), "web"], env, tmp_path)
    assert done.returncode == 78 and done.stderr.startswith("remind: REMIND_SECRET_KEY")
    assert len(done.stderr.strip().splitlines()) == 1 and secret not in done.stderr


def test_a_laptop_run_with_the_old_built_in_key_is_refused_too(tmp_path):
    env = clean_env(tmp_path, REMIND_SECRET_KEY="dev-secret-change-me")
    done = start([str(BIN / "remind"), "run"], env, tmp_path)
    assert done.returncode == 78
    assert done.stderr.strip().splitlines() == [
        "remind: REMIND_SECRET_KEY is a published example value: set a long random value (`openssl rand -hex 32`), "
        "or leave it unset in development"]


def test_development_generates_its_own_key_once_and_a_link_forged_with_the_old_default_opens_nothing(tmp_path):
    from worker.runner import prepare

    base = make_settings(tmp_path, f"sqlite:///{tmp_path / 'dev.db'}")
    settings = prepare(base.model_copy(update={"secret_key": ""}))
    secret_file = tmp_path / ".remind-secret"
    assert settings.secret_key == secret_file.read_text().strip() and len(settings.secret_key) >= 32
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert prepare(base.model_copy(update={"secret_key": ""})).secret_key == settings.secret_key  # kept
    assert ".remind-secret" in (ROOT / ".gitignore").read_text().split()

    remind = Remind.from_settings(settings)
    remind.register(transaction("tx_forged", created_at=None))
    deadline = remind.store.clock() + timedelta(hours=1)
    with TestClient(create_app(remind)) as client:
        forged = client.get("/c/" + make_token("dev-secret-change-me", "tx_forged", deadline))
        assert forged.status_code == 400 and "Li Wei" not in forged.text
        assert client.post("/c/" + make_token("dev-secret-change-me", "tx_forged", deadline)).status_code == 400
        assert remind.show("tx_forged")["status"] == "pending"
        genuine = client.get("/c/" + make_token(settings.secret_key, "tx_forged", deadline))
        assert genuine.status_code == 200 and "Li Wei" in genuine.text


def create_app(remind: Remind):
    from worker.web.app import create_app as make

    return make(remind)


# -- 2. senders ------------------------------------------------------------------------------------------

def test_a_production_worker_without_sendgrid_credentials_refuses_to_start_naming_them(tmp_path, fcm_fake):
    broken = tmp_path / "not-a-key.json"
    broken.write_text("{}")
    env = clean_env(tmp_path, REDIS_URL="redis://127.0.0.1:6379/0", REMIND_SECRET_KEY=STRONG,
                    REMIND_PUBLIC_URL="https://pay.example", TWILIO_ACCOUNT_SID="AC" + "0" * 32,
                    TWILIO_AUTH_TOKEN="t" * 32, TWILIO_FROM_NUMBER="+15005550006", FCM_PROJECT_ID="p",
                    FCM_CREDENTIALS_FILE=str(broken))
    done = start([str(BIN / "remind"), "scheduler"], env, tmp_path)
    assert done.returncode == 78 and done.stderr.startswith(f"remind: FCM_CREDENTIALS_FILE: {broken} is not a usable")
    assert "Traceback" not in done.stderr
    env["FCM_CREDENTIALS_FILE"] = str(fcm_fake.credentials_file)
    for command in (["remind", "worker", "-p", "1"], ["remind", "scheduler"]):
        done = start([str(BIN / command[0]), *command[1:]], env, tmp_path)
        assert done.returncode == 78, done.stdout + done.stderr
        line, = done.stderr.strip().splitlines()
        assert line.startswith("remind: SENDGRID_API_KEY: required in production: a schedule sends email")
        assert "SENDGRID_API_KEY, SENDGRID_FROM_EMAIL (email)" in line and "(sms)" not in line
    assert not (tmp_path / "outbox.jsonl").exists()


def test_production_never_falls_back_to_the_outbox_unless_asked_to(tmp_path):
    production = make_settings(tmp_path, "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert set(senders_from_settings(production.model_copy(update={"dev_sender": None}))) == set()
    chosen = senders_from_settings(production.model_copy(update={"dev_sender": "outbox"}))
    assert {channel: sender.name for channel, sender in chosen.items()} == {
        "sms": "outbox", "email": "outbox", "push": "outbox"}
    laptop = make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}").model_copy(update={"dev_sender": None})
    assert {s.name for s in senders_from_settings(laptop).values()} == {"outbox+console"}


# -- 3. twelve-factor --------------------------------------------------------------------------------------

def test_the_web_app_listens_on_every_interface_at_the_platforms_port(tmp_path, monkeypatch):
    remind = Remind.from_settings(make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}"), migrate=False)
    for key in ("PORT", "REMIND_HOST"):
        monkeypatch.delenv(key, raising=False)
    config = web_server(remind.__class__(Settings(_env_file=None), remind.store, remind.registry,
                                         remind.templates, remind.senders)).config
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    monkeypatch.setenv("PORT", "5123")  # Heroku's router connects to the dyno's PORT, not on loopback
    config = web_server(remind.__class__(Settings(_env_file=None), remind.store, remind.registry,
                                         remind.templates, remind.senders)).config
    assert (config.host, config.port) == ("0.0.0.0", 5123)
    monkeypatch.setenv("REMIND_HOST", "10.0.0.5")
    assert web_server(remind.__class__(Settings(_env_file=None), remind.store, remind.registry,
                                       remind.templates, remind.senders)).config.host == "10.0.0.5"


def _documented() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.M))


def _read_by_code() -> set[str]:
    names = {field.alias for field in Settings.model_fields.values()}
    for path in (ROOT / "worker").rglob("*.py"):
        names |= set(re.findall(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""",
                                path.read_text()))
    return names


def test_env_example_names_exactly_the_settings_the_code_reads():
    read, documented = _read_by_code(), _documented()
    assert {"TWILIO_AUTH_TOKEN", "SENDGRID_API_KEY", "FCM_CREDENTIALS_FILE", "REMIND_ENV", "PORT"} <= read
    assert sorted(read - documented) == [], "settings the code reads that .env.example leaves out"
    assert sorted(documented - read - LIBRARY_VARIABLES) == [], ".env.example names settings nothing reads"
    # A copy used as .env must not pin the web app to loopback, nor turn the outbox on in production.
    pinned = r"^(PORT|REMIND_HOST|REMIND_DEV_SENDER|REMIND_SECRET_KEY)="
    assert not re.search(pinned, (ROOT / ".env.example").read_text(), flags=re.M)


# -- 5. outages --------------------------------------------------------------------------------------------

@pytest.fixture
def down_database(closed_port) -> str:
    """A PostgreSQL URL nobody answers on: the database is down (or restarting)."""
    return f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/remind"


@pytest.mark.parametrize("command", [["tx", "submit", "-"], ["tx", "confirm", "tx_1"],
                                     ["tx", "cancel", "tx_1", "--reason", "customer asked"], ["tx", "show", "tx_1"],
                                     ["stats"], ["db", "upgrade"]])
def test_the_cli_says_try_again_with_exit_75_while_the_database_is_down(tmp_path, monkeypatch, down_database,
                                                                        command):
    from click.testing import CliRunner

    from worker.cli import main

    for key, value in clean_env(tmp_path, DATABASE_URL=down_database).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    result = CliRunner().invoke(main, command, input=json.dumps(transaction("tx_1")))
    assert result.exit_code == 75, result.output  # EX_TEMPFAIL: a script or an operator retries
    line, = result.output.splitlines()
    assert line.startswith("remind: the database is unreachable (") and "Connection refused" in line
    assert line.endswith("try again in a minute (repeating is safe)")


def test_the_api_and_the_confirmation_page_answer_503_with_retry_after_while_the_database_is_down(
        tmp_path, down_database):
    settings = make_settings(tmp_path, down_database, api_tokens="tok")
    remind = Remind.from_settings(settings, migrate=False)
    auth = {"Authorization": "Bearer tok"}
    link = "/c/" + make_token(settings.secret_key, "tx_1", remind.store.clock() + timedelta(hours=1))
    with TestClient(create_app(remind), raise_server_exceptions=False) as client:
        for response in (client.post("/v1/transactions", json=transaction("tx_1"), headers=auth),
                         client.get("/v1/transactions/tx_1", headers=auth),
                         client.post("/v1/transactions/tx_1/confirm", headers=auth)):
            assert response.status_code == 503 and response.headers["retry-after"] == "30"
            assert response.json()["error"] == "unavailable"
            assert "try again in a minute" in response.json()["detail"]
        for response in (client.get(link), client.post(link)):
            assert response.status_code == 503 and response.headers["retry-after"] == "30"
            assert "Please try again in a minute" in response.text and "press the button again" in response.text
        chinese = client.post(link, headers={"accept-language": "zh-CN"})
        assert chinese.status_code == 503 and "请一分钟后再试" in chinese.text


def test_production_that_sends_for_real_needs_the_public_address_of_its_links(tmp_path):
    from worker.errors import SettingsError
    from worker.runner import prepare

    production = make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", secret_key=STRONG, env="production")
    sending = Settings(_env_file=None, **{k: v for k, v in production.model_dump().items()
                                          if k not in ("public_url", "dev_sender")})
    with pytest.raises(SettingsError, match="^REMIND_PUBLIC_URL: required in production"):
        prepare(sending)
    assert prepare(sending.model_copy(update={"public_url": "https://pay.example"})).public_url == "https://pay.example"


def test_the_python_api_never_signs_links_with_an_empty_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'api.db'}",
                        schedules_dir=ROOT / "schedules", templates_dir=ROOT / "templates")
    assert settings.secret_key in ("", None)
    remind = Remind.from_settings(settings)
    assert len(remind.settings.secret_key) >= 32  # the development key, generated once into a local file
    assert Remind.from_settings(settings).settings.secret_key == remind.settings.secret_key


def test_an_empty_key_neither_signs_nor_opens_a_link():
    from worker.links import InvalidToken, read_token

    with pytest.raises(ValueError, match="REMIND_SECRET_KEY"):
        make_token("", "tx_1", datetime_in(days=1))
    forged = make_token("x" * 32, "tx_1", datetime_in(days=1))
    with pytest.raises(InvalidToken):
        read_token("", forged)


def datetime_in(**delta: float):
    from datetime import UTC, datetime

    return datetime.now(UTC) + timedelta(**delta)
