"""Previewing a schedule before saving it, the SMS budget warning of `schedules check`, and the final-gap rule."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import ROOT, T0, make_settings, transaction

from worker.cli import main
from worker.errors import ConfigError, InvalidInput
from worker.ladder import load_dir, load_file
from worker.ladder.loader import min_final_gap
from worker.links import confirm_url
from worker.preview import SAMPLE_ID, preview, to_text
from worker.render import Templates
from worker.service import load_config
from worker.sms import SmsInfo

SHANGHAI = "(Asia/Shanghai)"


@pytest.fixture
def config(tmp_path):
    settings = make_settings(tmp_path, "sqlite://")
    return load_config(settings), settings


def rows(p):
    """(step, local time, channel, sent) for every message of the preview."""
    return [(s.id, s.local, m.channel, m.sent) for s in p.steps for m in s.messages]


def sms(p):
    return [(s.id, m.sms) for s in p.steps for m in s.messages if m.sms]


def test_default_for_the_sample_in_zh_cn_is_ucs2(config):
    cfg, settings = config
    p = preview(cfg, "default", now=T0, settings=settings)
    assert p.sample and p.transaction["id"] == SAMPLE_ID and p.would_choose == "default"
    assert p.template_locale == "zh-CN" and p.zone == "Asia/Shanghai"
    assert rows(p) == [
        ("nudge", "2026-11-25 17:15", "push", True),
        ("reminder", "2026-11-25 19:00", "sms", True), ("reminder", "2026-11-25 19:00", "push", True),
        ("final_warning", "2026-11-26 13:00", "sms", True), ("final_warning", "2026-11-26 13:00", "email", True),
        ("final_warning", "2026-11-26 13:00", "push", True),
        ("cancel", "2026-11-26 17:00", "sms", True), ("cancel", "2026-11-26 17:00", "email", True),
        ("cancel", "2026-11-26 17:00", "push", True),
    ]
    assert sms(p) == [("reminder", SmsInfo("UCS-2", 183, 183, 3)), ("final_warning", SmsInfo("UCS-2", 167, 167, 3)),
                      ("cancel", SmsInfo("UCS-2", 105, 105, 2))]
    assert p.totals == {"sms": 3, "email": 2, "push": 4} and p.sms_segments == 8 and p.skipped == {}
    link = confirm_url("https://pay.example", "test-secret", SAMPLE_ID, T0 + timedelta(hours=24))
    reminder_sms = p.steps[1].messages[0]
    assert reminder_sms.body.startswith("您的¥1,000.00转账仍未确认") and reminder_sms.body.endswith(link)
    assert p.steps[-1].kind == "cancel" and p.steps[-1].offset == timedelta(hours=24)


def test_default_in_en_is_gsm7_and_relative_times_read_from_each_step(config):
    cfg, settings = config
    p = preview(cfg, "default", locale="en", now=T0, settings=settings)
    assert p.transaction["customer"]["locale"] == "en" and p.template_locale == "en"
    assert sms(p) == [("reminder", SmsInfo("GSM-7", 278, 278, 2)), ("final_warning", SmsInfo("GSM-7", 283, 283, 2)),
                      ("cancel", SmsInfo("GSM-7", 229, 229, 2))]
    email = next(m for s in p.steps if s.id == "final_warning" for m in s.messages if m.channel == "email")
    assert "(in 4 hours)" in email.body  # rendered at the step's own time, 20h, for a deadline at 24h
    assert email.subject and email.html and "<" in email.html


@pytest.mark.parametrize("locale, encoding, segments", [(None, "UCS-2", [3, 3, 2]), ("en", "GSM-7", [2, 2, 2])])
def test_new_customer_for_the_sample(config, locale, encoding, segments):
    cfg, settings = config
    p = preview(cfg, "new_customer", locale=locale, now=T0, settings=settings)
    assert p.would_choose == "default"  # the sample is a returning customer
    assert [(s.id, s.local) for s in p.steps] == [
        ("nudge", "2026-11-25 17:05"), ("guide", "2026-11-25 17:30"), ("reminder", "2026-11-25 21:00"),
        ("final_warning", "2026-11-26 13:00"), ("cancel", "2026-11-26 17:00")]
    assert [(i.encoding, i.segments) for _, i in sms(p)] == [(encoding, n) for n in segments]
    assert p.totals == {"sms": 3, "email": 3, "push": 5}
    assert "note: this transaction would run on 'default', not 'new_customer'" in to_text(p)


def test_a_customer_without_email_lists_email_as_skipped_and_falls_back(config):
    cfg, settings = config
    p = preview(cfg, "new_customer", transaction("tx_noemail", customer={"email": None}), now=T0, settings=settings)
    assert not p.sample
    guide = next(s for s in p.steps if s.id == "guide")
    assert [(m.channel, m.sent, m.reason) for m in guide.messages] == [
        ("email", False, "no email address on file"),
        ("sms", True, "instead of email: no email address on file"),
        ("push", True, None)]
    assert p.totals == {"sms": 4, "email": 0, "push": 5}
    assert p.skipped == {"email": "no email address on file"}
    text = to_text(p)
    assert f"+30m  2026-11-25 17:30 {SHANGHAI}  guide  EMAIL  skipped: no email address on file" in text
    assert "skipped: email (no email address on file)" in text


def test_an_early_expires_at_drops_steps_and_moves_the_cancel(config):
    cfg, settings = config
    tx = transaction("tx_exp", expires_at=(T0 + timedelta(hours=10)).isoformat())
    p = preview(cfg, "default", tx, "en", T0, settings=settings)
    assert [(s.id, s.local, s.dropped is not None) for s in p.steps] == [
        ("nudge", "2026-11-25 17:15", False), ("reminder", "2026-11-25 19:00", False),
        ("cancel", "2026-11-26 03:00", False), ("cancel", "2026-11-26 08:00", False),
        ("final_warning", "2026-11-26 13:00", True)]
    assert p.steps[-1].messages == () and "expires_at" in p.steps[-1].dropped
    assert p.steps[2].note == "at expires_at, before the schedule's own time"
    # cancelled at 03:00; the SMS and push notices wait for the end of quiet hours
    assert [m.channel for m in p.steps[2].messages] == ["email"]
    assert [m.channel for m in p.steps[3].messages] == ["sms", "push"]
    assert p.steps[3].note == ("at expires_at, before the schedule's own time; "
                               "held for quiet hours until 08:00 (Asia/Shanghai)")
    assert p.totals == {"sms": 2, "email": 1, "push": 3}
    assert (f"+20h  2026-11-26 13:00 {SHANGHAI}  final_warning  dropped: at or after the deadline "
            f"2026-11-26 03:00 (expires_at)") in to_text(p)


def test_unknown_schedule_and_invalid_transaction_are_refused(config):
    cfg, settings = config
    with pytest.raises(KeyError):
        preview(cfg, "nope", now=T0, settings=settings)
    with pytest.raises(InvalidInput) as info:
        preview(cfg, "default", transaction("tx_bad", amount="1.999"), now=T0, settings=settings)
    assert "amount" in info.value.problems


def test_json_is_serialisable_and_complete(config):
    cfg, settings = config
    data = json.loads(json.dumps(preview(cfg, "default", now=T0, settings=settings).to_json()))
    assert data["schedule"] == "default" and data["deadline"] == "2026-11-26T09:00:00+00:00"
    assert data["steps"][1]["after"] == "2h" and data["steps"][1]["local"] == "2026-11-25 19:00"
    assert data["steps"][1]["messages"][0]["sms"] == {"encoding": "UCS-2", "characters": 183, "units": 183,
                                                      "segments": 3}
    assert data["totals"] == {"sms": 3, "email": 2, "push": 4} and data["sms_segments"] == 8


# -- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"),
              "REMIND_TEMPLATES_DIR": str(ROOT / "templates"), "REMIND_OUTBOX": str(tmp_path / "out.jsonl"),
              "REMIND_PUBLIC_URL": "https://pay.example", "REMIND_SECRET_KEY": "test-secret"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("REMIND_SMS_SEGMENT_BUDGET", raising=False)
    return values


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_cli_preview_prints_the_timeline_with_sms_cost(env, tmp_path):
    tx = tmp_path / "tx.json"
    tx.write_text(json.dumps(transaction("tx_cli")))
    result = run("schedules", "preview", "default", "--tx", str(tx))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("schedule default (version ")
    assert "transaction tx_cli: Li Wei, zh-CN (templates zh-CN), Asia/Shanghai, segment returning" in out
    assert f"created 2026-11-25 17:00 {SHANGHAI}, deadline 2026-11-26 17:00 {SHANGHAI}" in out
    assert f"\n+15m  2026-11-25 17:15 {SHANGHAI}  nudge  PUSH\n    您有一笔转账待确认\n" in out
    assert re.search(rf"\n\+2h  2026-11-25 19:00 {re.escape(SHANGHAI)}  reminder  SMS  \[UCS-2, 3 segments, "
                     rf"1[0-9][0-9] chars\]\n    您的", out)
    assert out.rstrip().endswith("messages per transaction: sms 3 (8 segments), email 2, push 4")
    assert not (tmp_path / "cli.db").exists()  # a preview needs no database

    en = run("schedules", "preview", "default", "--tx", str(tx), "--locale", "en").output
    assert re.search(rf"\+2h  2026-11-25 19:00 {re.escape(SHANGHAI)}  reminder  SMS  \[GSM-7, 2 segments, 2[0-9][0-9] "
                     rf"chars\]", en)


def test_cli_preview_defaults_to_the_sample_and_speaks_json(env):
    result = run("schedules", "preview", "new_customer", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["sample"] and data["transaction"]["id"] == SAMPLE_ID
    ids = [s["id"] for s in data["steps"]]  # made "now": quiet hours may split a step in two
    assert set(ids) == {"nudge", "guide", "reminder", "final_warning", "cancel"} and ids[-1] == "cancel"


def test_cli_preview_refuses_an_unknown_schedule_and_a_bad_transaction(env, tmp_path):
    result = run("schedules", "preview", "nope")
    assert result.exit_code == 1
    assert "no schedule 'nope'; there are: risk_review, new_customer, default" in result.output
    result = run("schedules", "preview", "default", "--tx", "-", input=json.dumps(transaction("t", fee="-1")))
    assert result.exit_code == 1 and "fee: cannot be negative" in result.output


def test_cli_check_warns_about_an_sms_over_the_segment_budget(env, tmp_path, monkeypatch):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "en" / "reminder" / "sms.txt").write_text("Reminder " * 60 + "{{ confirm_url }}\n")
    monkeypatch.setenv("REMIND_TEMPLATES_DIR", str(templates))
    monkeypatch.setenv("REMIND_SMS_SEGMENT_BUDGET", "4")
    result = run("schedules", "check")
    assert result.exit_code == 0, result.output
    assert "ok  default" in result.stdout
    warnings = result.stderr.splitlines()
    assert warnings == [f"warning: {templates / 'en' / 'reminder' / 'sms.txt'}: 5 SMS segments (GSM-7, 614 chars "
                        f"with sample data), over the budget of 4 (REMIND_SMS_SEGMENT_BUDGET)"]
    monkeypatch.setenv("REMIND_SMS_SEGMENT_BUDGET", "5")
    assert run("schedules", "check").stderr == ""


def test_cli_check_budget_defaults_to_3(env, tmp_path, monkeypatch):
    """Unset, the budget is 3: the shipped zh-CN reminders (3 UCS-2 segments) pass, a 4-segment SMS warns."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "en" / "reminder" / "sms.txt").write_text("Reminder " * 50 + "{{ confirm_url }}\n")
    monkeypatch.setenv("REMIND_TEMPLATES_DIR", str(templates))
    result = run("schedules", "check")
    assert result.exit_code == 0, result.output
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"warning: {templates / 'en' / 'reminder' / 'sms.txt'}: 4 SMS segments (GSM-7, ")
    assert warning.endswith("over the budget of 3 (REMIND_SMS_SEGMENT_BUDGET)")


# -- the final-gap rule ---------------------------------------------------------------------------

LADDER = """\
name: x
match: {{}}
steps:
  - after: {last}
    channels: [sms]
    template: final_warning
{action}:
  after: {final}
  template: cancelled
  reason: not_confirmed
"""


def load(tmp_path: Path, last: str, final: str, action: str = "cancel"):
    folder = tmp_path / "schedules"
    folder.mkdir(exist_ok=True)
    (folder / "s.yaml").write_text(textwrap.dedent(LADDER.format(last=last, final=final, action=action)))
    return load_dir(folder, Templates(ROOT / "templates").missing)


@pytest.mark.parametrize("last, gap", [("8s", "2s"), ("1m", "15s"), ("5m", "1m15s"), ("30m", "5m"), ("1h", "6m"),
                                       ("6h", "36m"), ("20h", "2h"), ("2d", "4h48m")])
def test_min_final_gap_is_proportional(last, gap):
    from worker.ladder import parse_duration

    assert min_final_gap(parse_duration(last)) == parse_duration(gap)


def test_a_cancel_too_soon_after_the_final_warning_is_refused_naming_file_line_and_field(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "20h", "21h")
    assert info.value.problems == [
        f"{tmp_path / 'schedules' / 's.yaml'}:8: cancel.after: the cancel step comes 1h after the last reminder "
        f"('final_warning' at 20h), too soon for it to arrive: leave at least 2h (at 22h or later)"]
    assert [s.name for s in load(tmp_path, "20h", "22h")] == ["x"]  # exactly the minimum passes


def test_an_escalate_too_soon_is_refused_too(tmp_path):
    with pytest.raises(ConfigError, match=r"s.yaml:8: escalate.after: the escalate step comes 1s after"):
        load(tmp_path, "8s", "9s", action="escalate")


def test_the_shipped_and_demo_schedules_pass_the_rule(tmp_path):
    load_config(make_settings(tmp_path, "sqlite://"))
    demo = load_file(ROOT / "worker" / "demo" / "demo.yaml")
    assert demo.final.after - demo.steps[-1].after >= min_final_gap(demo.steps[-1].after)


def test_the_preview_shows_quiet_hours_shifted_times(config):
    """The preview uses the scheduler's own rule: a reminder due at 23:30 in Shanghai waits for 08:00."""
    cfg, settings = config
    p = preview(cfg, "default", now=T0 + timedelta(hours=4, minutes=30), settings=settings)  # 21:30 local
    reminder = [s for s in p.steps if s.id == "reminder"]
    assert [(s.local, sorted(m.channel for m in s.messages)) for s in reminder] == [
        ("2026-11-26 08:00", ["push", "sms"])]
    assert "quiet hours" in reminder[0].note
    assert f"+2h  2026-11-26 08:00 {SHANGHAI}  reminder  (held for quiet hours" in to_text(p)
