"""The `remind` command: a thin face over the service, exercised in-process with click's runner."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from support import ROOT, T0, Clock, transaction

from worker.cli import main
from worker.service import Remind


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"),
              "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_OUTBOX": str(tmp_path / "out.jsonl")}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    # The service clock, not today's date: the sample transactions were created on support.T0.
    real = Remind.from_settings.__func__
    monkeypatch.setattr(Remind, "from_settings",
                        classmethod(lambda cls, *a, **kw: real(cls, *a, **{"clock": Clock(), **kw})))
    return values


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_submit_show_confirm_round_trip(env):
    result = run("tx", "submit", "-", input=json.dumps(transaction("tx_cli")))
    assert result.exit_code == 0, result.output
    assert "tx_cli: registered (pending, schedule default)" in result.output
    assert "already registered" in run("tx", "submit", "-", input=json.dumps(transaction("tx_cli"))).output
    shown = json.loads(run("tx", "show", "tx_cli", "--json").output)
    assert shown["status"] == "pending" and shown["amount"] == "1000.00"
    assert [e["step"] for e in shown["timeline"]] == ["nudge", "reminder", "reminder", "final_warning",
                                                      "final_warning", "final_warning", "cancel"]
    assert run("tx", "confirm", "tx_cli").exit_code == 0
    assert run("tx", "confirm", "tx_cli").exit_code == 0
    text = run("tx", "show", "tx_cli").output
    assert "tx_cli  CONFIRMED" in text and "confirmed_at" in text


def test_confirm_after_cancel_fails_with_a_message(env):
    run("tx", "submit", "-", input=json.dumps(transaction("tx_c")))
    assert run("tx", "cancel", "tx_c", "--reason", "customer called support").exit_code == 0
    result = run("tx", "confirm", "tx_c")
    assert result.exit_code != 0 and "already cancelled" in result.output


def test_invalid_and_conflicting_submissions_exit_non_zero_naming_fields(env):
    result = run("tx", "submit", "-", input=json.dumps(transaction("tx_bad", amount="1.999")))
    assert result.exit_code == 1 and "amount: CNY has 2 minor digits" in result.output
    run("tx", "submit", "-", input=json.dumps(transaction("tx_x")))
    result = run("tx", "submit", "-", input=json.dumps(transaction("tx_x", fee="1.00")))
    assert result.exit_code == 1 and "conflict" in result.output and "fee" in result.output
    assert run("tx", "show", "nope").exit_code != 0


def test_an_expired_transaction_is_refused_naming_the_field_and_nothing_is_kept(env, tmp_path):
    late = transaction("tx_late", created_at=(T0 - timedelta(hours=1)).isoformat(),
                       expires_at=(T0 - timedelta(seconds=1)).isoformat())
    result = run("tx", "submit", "-", input=json.dumps(late))
    assert result.exit_code == 1
    assert "tx_late: invalid: expires_at: the deadline 2026-11-25T08:59:59Z has already passed" in result.output
    assert run("tx", "show", "tx_late").exit_code != 0
    assert not (tmp_path / "out.jsonl").exists()


def test_schedules_check_passes_on_the_shipped_files_and_fails_on_a_broken_one(env, tmp_path, monkeypatch):
    result = run("schedules", "check")
    assert result.exit_code == 0 and "ok  default" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.yaml").write_text("name: x\nmatch: {}\nsteps: []\ncancel: {after: 1h, template: cancelled}\n")
    monkeypatch.setenv("REMIND_SCHEDULES_DIR", str(bad))
    result = run("schedules", "check")
    assert result.exit_code == 1
    assert "x.yaml:3: steps: required" in result.output and "cancel.reason: required" in result.output


def test_db_upgrade_is_idempotent(env):
    assert run("db", "upgrade").exit_code == 0
    assert run("db", "upgrade").output.strip() == "database is up to date"


@pytest.mark.parametrize("command", [["tx", "show", "tx_1"], ["schedules", "check"], ["demo"], ["run"]])
def test_a_missing_templates_folder_is_one_line_naming_the_setting(env, monkeypatch, command):
    monkeypatch.setenv("REMIND_TEMPLATES_DIR", "templates")  # relative: the working folder has none
    result = run(*command)
    assert result.exit_code == 78
    assert result.output.splitlines() == [
        "remind: REMIND_TEMPLATES_DIR: the templates folder ./templates does not exist; set REMIND_TEMPLATES_DIR "
        "to your templates folder, or run from the folder that holds templates/"]


def test_an_invalid_setting_is_one_line_naming_the_variable_without_its_value(env, monkeypatch):
    monkeypatch.setenv("REMIND_TICK_SECONDS", "often")
    monkeypatch.setenv("REMIND_SECRET_KEY", "change-me")
    result = run("tx", "show", "tx_1")
    assert result.exit_code == 78
    line, = result.output.splitlines()
    assert line.startswith("remind: REMIND_TICK_SECONDS: Input should be a valid number")
    assert "REMIND_SECRET_KEY is a published example value" in line
