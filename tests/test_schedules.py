"""Loading schedules: the shipped ones are valid; every mistake is refused naming file, line and field."""

from __future__ import annotations

import shutil
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from support import ROOT, make_settings

from worker.errors import ConfigError
from worker.ladder import load_dir
from worker.render import Templates
from worker.service import load_config

GOOD = """\
name: {name}
match: {{}}
priority: 100
steps:
  - after: 15m
    channels: [push]
    template: nudge
  - after: 2h
    channels: [sms, push]
    template: reminder
cancel:
  after: 24h
  template: cancelled
  reason: not_confirmed
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    folder = tmp_path / "schedules"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(textwrap.dedent(text))
    return folder


def problems(tmp_path: Path, text: str) -> str:
    templates = Templates(ROOT / "templates")
    with pytest.raises(ConfigError) as info:
        load_dir(write(tmp_path, text), templates.missing)
    return "\n".join(info.value.problems)


def test_the_shipped_schedules_load_and_match_as_documented(tmp_path):
    registry, _ = load_config(make_settings(tmp_path, "sqlite://"))
    assert [s.name for s in registry] == ["risk_review", "new_customer", "default"]
    pick = lambda **kw: registry.choose(**{"segment": None, "risk_flag": False, "amount": Decimal(10),  # noqa: E731
                                            "currency": "CNY", **kw}).name
    assert pick(segment="new") == "new_customer"
    assert pick(segment="new", risk_flag=True) == "risk_review"
    assert pick(segment="returning") == "default"
    risk = registry.get("risk_review")
    assert risk.final.action == "escalate" and risk.final.status == "escalated"


def test_unknown_key_names_file_line_and_field(tmp_path):
    text = GOOD.format(name="x").replace("    template: nudge", "    template: nudge\n    chanels: [sms]")
    out = problems(tmp_path, text)
    assert "s.yaml:8: steps[0].chanels: unknown key" in out


def test_bad_duration_is_refused_with_its_line(tmp_path):
    out = problems(tmp_path, GOOD.format(name="x").replace("after: 2h", "after: 2 hours"))
    assert "s.yaml:8: steps[1].after:" in out and "not a duration" in out


def test_steps_must_increase(tmp_path):
    out = problems(tmp_path, GOOD.format(name="x").replace("after: 2h", "after: 10m"))
    assert "steps[1].after: steps must come later and later" in out


def test_cancel_before_the_last_reminder_is_refused(tmp_path):
    out = problems(tmp_path, GOOD.format(name="x").replace("after: 24h", "after: 1h"))
    assert "s.yaml:12: cancel.after: the cancel step must come after the last reminder" in out


def test_a_template_missing_for_some_locale_is_refused(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "zh-CN" / "reminder" / "sms.txt").unlink()
    with pytest.raises(ConfigError) as info:
        load_dir(write(tmp_path, GOOD.format(name="x")), Templates(templates).missing)
    out = "\n".join(info.value.problems)
    assert "steps[1].template: template 'reminder' has no sms.txt for locale zh-CN" in out


def test_an_unknown_template_and_channel_are_refused(tmp_path):
    out = problems(tmp_path, GOOD.format(name="x").replace("template: nudge", "template: nudgee")
                   .replace("[sms, push]", "[sms, fax]"))
    assert "template 'nudgee' has no push_title.txt for locale en" in out
    assert "steps[1].channels: unknown channel(s) ['fax']" in out


def test_yaml_syntax_error_names_the_line(tmp_path):
    out = problems(tmp_path, GOOD.format(name="x").replace("channels: [push]", "channels: [push"))
    assert "s.yaml:" in out and "not valid YAML" in out


def test_a_catch_all_schedule_is_required(tmp_path):
    out = problems(tmp_path, GOOD.format(name="x").replace("match: {}", "match: {segment: new}"))
    assert "no schedule has an empty match" in out


def test_two_final_steps_or_none_are_refused(tmp_path):
    text = GOOD.format(name="x") + "escalate:\n  after: 30h\n  template: escalated\n  reason: r\n"
    assert "exactly one final step" in problems(tmp_path, text)


def test_duplicate_names_across_files_are_refused(tmp_path):
    write(tmp_path, GOOD.format(name="same"), "a.yaml")
    folder = write(tmp_path, GOOD.format(name="same"), "b.yaml")
    with pytest.raises(ConfigError, match="'same' is also the name of"):
        load_dir(folder, Templates(ROOT / "templates").missing)


def test_a_broken_template_is_refused_naming_file_and_line(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "en" / "nudge" / "sms.txt").write_text("Hi {{ customer_name }\n")
    with pytest.raises(ConfigError) as info:
        Templates(templates)
    assert "en/nudge/sms.txt:1" in info.value.problems[0]


def test_a_template_using_an_unknown_variable_is_refused(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "en" / "nudge" / "push_body.txt").write_text("Hi {{ customer_nmae }}\n")
    with pytest.raises(ConfigError) as info:
        load_dir(write(tmp_path, GOOD.format(name="x")), Templates(templates).missing)
    assert "'customer_nmae' is undefined" in "\n".join(info.value.problems)


def test_reload_keeps_the_last_good_config_when_the_new_one_is_invalid(tmp_path):
    from worker.service import Remind

    folder = write(tmp_path, GOOD.format(name="mine"))
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", schedules_dir=folder)
    remind = Remind.from_settings(settings)
    (folder / "s.yaml").write_text(GOOD.format(name="mine").replace("after: 2h", "after: soon"))
    with pytest.raises(ConfigError):
        remind.reload()
    assert [s.name for s in remind.registry] == ["mine"]
    assert remind.registry.get("mine").steps[1].template == "reminder"
