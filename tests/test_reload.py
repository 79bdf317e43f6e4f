"""Hot reload: the running service picks up valid edits within seconds and refuses invalid ones,
keeping the last good configuration; in-flight transactions follow the documented rule."""

from __future__ import annotations

import shutil
import time
from datetime import timedelta

from starlette.testclient import TestClient
from support import ROOT, T0, make_settings, transaction

from worker.runner import Embedded
from worker.service import Remind
from worker.web.app import create_app

LADDER = """\
name: default
match: {{}}
steps:
  - after: 10m
    channels: [push]
    template: nudge
{extra}  - after: 2h
    channels: [sms, push]
    template: reminder
cancel:
  after: 24h
  template: cancelled
  reason: not_confirmed
"""


def folder(tmp_path, extra: str = ""):
    path = tmp_path / "schedules"
    path.mkdir(exist_ok=True)
    (path / "default.yaml").write_text(LADDER.format(extra=extra))
    return path


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_running_service_picks_up_a_valid_edit_and_refuses_an_invalid_one(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", schedules_dir=folder(tmp_path),
                             templates_dir=templates, reload_seconds=0.2, tick_seconds=0.2, api_tokens="t")
    remind = Remind.from_settings(settings)
    engine = Embedded(remind).start()
    try:
        time.sleep(0.05)
        (settings.schedules_dir / "default.yaml").write_text(
            LADDER.format(extra="").replace("after: 10m", "after: 5m"))
        assert wait_for(lambda: remind.registry.get("default").steps[0].after == timedelta(minutes=5))
        assert remind.config_state["ok"]
        # a broken edit: refused, the last good ladder stays, readiness and metrics say so
        (settings.schedules_dir / "default.yaml").write_text(
            LADDER.format(extra="").replace("after: 5m", "after: five minutes").replace("after: 10m", "after: 1x"))
        assert wait_for(lambda: not remind.config_state["ok"])
        assert remind.registry.get("default").steps[0].after == timedelta(minutes=5)
        assert "default.yaml:4: steps[0].after" in remind.config_state["error"]
        # a broken template: refused too
        (settings.schedules_dir / "default.yaml").write_text(LADDER.format(extra=""))
        assert wait_for(lambda: remind.config_state["ok"])
        (templates / "en" / "nudge" / "push_body.txt").write_text("{{ amount }")
        assert wait_for(lambda: not remind.config_state["ok"])
        assert "push_body.txt" in remind.config_state["error"]
        with TestClient(create_app(remind)) as client:
            ready = client.get("/readyz").json()
            assert ready["status"] == "ok" and "reload refused" in ready["checks"]["config"]
            metrics = client.get("/metrics").text
            assert "remind_config_reload_failures_total 2.0" in metrics and "remind_config_ok 0.0" in metrics
        # still serving on the last good files: a new transaction runs on the restored 10m ladder
        registered = remind.register(transaction(created_at=None))
        assert registered.created and registered.schedule == "default"
        tx = remind.store.get_transaction("tx_1")
        assert tx["next_due_at"] == tx["created_at"] + timedelta(minutes=10)
    finally:
        engine.stop()


def test_an_edit_moves_future_steps_and_leaves_past_ones_past(make_harness, tmp_path):
    h = make_harness(schedules_dir=folder(tmp_path))
    h.remind.register(transaction())
    h.at(minutes=11).tick()  # the 10m nudge went out on the first version
    v1 = h.remind.show("tx_1")["schedule_version"]
    # ops add a step at 30m and move the nudge to 5m
    (tmp_path / "schedules" / "default.yaml").write_text(LADDER.format(
        extra="  - after: 30m\n    channels: [email]\n    template: guide\n").replace("after: 10m", "after: 5m"))
    assert h.remind.reload_if_changed(reschedule=True) is True
    h.at(minutes=31).tick()
    h.at(minutes=121).tick()
    steps = [(line["step"], line["channel"]) for line in h.lines()]
    assert steps[0] == ("nudge", "push") and steps.count(("nudge", "push")) == 1  # past stays past
    assert ("guide", "email") in steps  # the new future step follows the new ladder
    assert sorted(steps[-2:]) == [("reminder", "push"), ("reminder", "sms")]
    assert h.remind.show("tx_1")["schedule_version"] != v1
    assert h.remind.reload_if_changed(reschedule=True) is None  # nothing changed since


def test_a_comment_only_edit_reschedules_nothing(make_harness, tmp_path):
    h = make_harness(schedules_dir=folder(tmp_path))
    h.remind.register(transaction())
    h.at(minutes=11).tick()  # the nudge went out; the next step is the 2h reminder
    before = h.remind.store.get_transaction("tx_1")
    path = tmp_path / "schedules" / "default.yaml"
    path.write_text("# reviewed by ops\n" + path.read_text().replace("match: {}", "match: {}  # everyone"))
    h.at(minutes=12)
    assert h.remind.reload_if_changed(reschedule=True) is True
    after = h.remind.store.get_transaction("tx_1")
    assert after["next_due_at"] == before["next_due_at"] == T0 + timedelta(hours=2)
    assert h.remind.registry.get("default").version == before["schedule_version"]


def test_a_name_the_store_cannot_hold_is_refused_and_the_service_keeps_running(make_harness, tmp_path):
    """A 39-character variant passed validation before, then every tick on PostgreSQL failed."""
    h = make_harness(schedules_dir=folder(tmp_path))
    h.remind.register(transaction())
    path = tmp_path / "schedules" / "default.yaml"
    path.write_text(LADDER.format(extra="").replace("    template: nudge\n", "    template: nudge\n    variants:\n"
                    "      - {name: a_variant_named_with_39_characters_long, template: nudge, weight: 1}\n"))
    assert h.remind.reload_if_changed(reschedule=True) is False
    assert "steps[0].variants[0].name" in h.remind.config_state["error"]
    assert "at most 32 (deliveries.variant)" in h.remind.config_state["error"]
    assert h.remind.registry.get("default").steps[0].variants == ()  # the last good ladder
    h.at(minutes=11).tick()
    assert [(line["step"], line["variant"]) for line in h.lines()] == [("nudge", "default")]


PUSH_ONLY = """\
name: default
match: {}
steps:
  - after: 10m
    channels: [push]
    template: nudge
cancel:
  after: 24h
  template: cancelled
  reason: not_confirmed
  channels: [push]
"""


def test_in_production_an_edit_that_needs_missing_credentials_is_refused_like_an_invalid_one(tmp_path, fcm_fake,
                                                                                              caplog):
    """Production starts only with a provider for every channel its schedules use; a hot reload may not add
    one without: the reminders would fail at send time, or reach no customer at all."""
    import logging

    from worker.runner import preflight

    schedules = tmp_path / "schedules"
    schedules.mkdir()
    (schedules / "default.yaml").write_text(PUSH_ONLY)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", schedules_dir=schedules, env="production",
                             dev_sender=None, secret_key="f3c1e0a9b7d24c65a8e1d0f9c2b74e13",
                             fcm_project_id=fcm_fake.project_id, fcm_credentials_file=fcm_fake.credentials_file,
                             fcm_api_base_url=fcm_fake.base_url)
    remind = Remind.from_settings(settings)
    preflight(remind)  # push has its provider: the process starts
    (schedules / "default.yaml").write_text(PUSH_ONLY.replace("channels: [push]\n    template: nudge",
                                                              "channels: [push, sms]\n    template: nudge"))
    with caplog.at_level(logging.ERROR, logger="remind"):
        assert remind.reload_if_changed(reschedule=True) is False
    refused, = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert "keeping the last good one" in refused and "TWILIO_ACCOUNT_SID: required in production" in refused
    assert remind.config_state["ok"] is False and "TWILIO_ACCOUNT_SID" in remind.config_state["error"]
    assert remind.registry.get("default").steps[0].channels == ("push",)  # the last good ladder runs on
    assert remind.register(transaction(created_at=None)).created

    # An edit within the configured channels is taken as before.
    (schedules / "default.yaml").write_text(PUSH_ONLY.replace("after: 10m", "after: 5m"))
    assert remind.reload_if_changed(reschedule=True) is True
    assert remind.registry.get("default").steps[0].after == timedelta(minutes=5)
