"""Loading schedules: the shipped ones are valid; every mistake is refused naming file, line and field."""

from __future__ import annotations

import shutil
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from support import ROOT, make_settings, write_files

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
    return write_files(tmp_path / "schedules", {name: textwrap.dedent(text)})


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


# -- what the store can hold: every identifier a schedule names is written to a column of fixed length --

VARIANTS = GOOD.replace("""    template: reminder
""", """    template: reminder
    variants:
      - {{name: {variant}, template: reminder, weight: 1}}
      - {{name: b, template: nudge, weight: 1}}
""")


def test_a_variant_name_longer_than_the_store_holds_is_refused_naming_file_line_and_field(tmp_path):
    """39 characters passed `schedules check`, then every tick on PostgreSQL failed on deliveries.variant."""
    out = problems(tmp_path, VARIANTS.format(name="x", variant="v" * 39))
    assert f"s.yaml:12: steps[1].variants[0].name: {'v' * 39!r} is 39 characters; the store holds at most 32 " \
           "(deliveries.variant)" in out
    assert load_dir(write(tmp_path, VARIANTS.format(name="x", variant="v" * 32)))  # 32 fits


@pytest.mark.parametrize("edit,where", [
    (lambda t: t.replace("name: x", "name: " + "n" * 65), "s.yaml:1: name: 'nnn"),
    (lambda t: t.replace("  - after: 15m", "  - id: " + "i" * 65 + "\n    after: 15m"), "s.yaml:5: steps[0].id: 'iii"),
    (lambda t: t.replace("template: nudge", "template: " + "t" * 65), "s.yaml:7: steps[0].template: 'ttt"),
    (lambda t: t.replace("template: cancelled", "template: " + "c" * 65), "s.yaml:13: cancel.template: 'ccc"),
    (lambda t: t.replace("match: {}", "match: {segment: " + "s" * 33 + "}"), "s.yaml:2: match.segment: 'sss"),
])
def test_every_identifier_is_checked_against_its_column(tmp_path, edit, where):
    out = problems(tmp_path, edit(GOOD.format(name="x")))
    assert where in out and "the store holds at most" in out


def test_the_limits_are_the_store_columns():
    from worker.ladder.model import MAX_LENGTH
    from worker.store.tables import metadata

    for column, limit in MAX_LENGTH.values():
        table, name = column.split(".")
        assert metadata.tables[table].c[name].type.length == limit, column


def test_schedules_check_refuses_a_name_the_store_cannot_hold(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from worker.cli import main

    folder = write(tmp_path, VARIANTS.format(name="x", variant="a_variant_named_with_39_characters_long"))
    monkeypatch.chdir(tmp_path)
    for key, value in {"REMIND_SCHEDULES_DIR": str(folder), "REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
                       "DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"}.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["schedules", "check"])
    assert result.exit_code == 1
    assert "error: " in result.stderr and "s.yaml:12: steps[1].variants[0].name:" in result.stderr
    assert "at most 32 (deliveries.variant)" in result.stderr


# -- a schedule's version is what it means, not how its file is spelled --

def test_a_comment_description_or_layout_edit_keeps_the_version_and_a_real_edit_changes_it(tmp_path):
    from worker.ladder import load_file

    path = write(tmp_path, GOOD.format(name="x")) / "s.yaml"
    before = load_file(path).version
    path.write_text("# ops: tuned on Monday\n" + GOOD.format(name="x").replace("after: 2h", "after: 120m")
                    .replace("priority: 100", "priority: 100   # the default\ndescription: everyone else"))
    assert load_file(path).version == before
    path.write_text(GOOD.format(name="x").replace("after: 2h", "after: 3h"))
    assert load_file(path).version != before
    path.write_text(GOOD.format(name="x").replace("reason: not_confirmed", "reason: expired"))
    assert load_file(path).version != before
