"""The what-if: on a synthetic history generated from a known hazard (ladder A ran), the replay of another
ladder B recovers B's true confirmation rate within its printed interval; the backtest's error is small;
`remind schedules whatif` prints both columns and refuses an invalid file naming file, line and field;
/ops/whatif does the same from a pasted schedule. Seeded; no test depends on today's date."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient
from support import ROOT, T0, Clock, make_settings
from whatif_history import LADDER_A, LADDER_B, generate, schedule

import worker.whatif as model
from worker.cli import main
from worker.service import Remind
from worker.store import Store, make_engine, upgrade
from worker.web.app import create_app
from worker.whatif import Record, actual, pieces, predict, records

TOKEN = "whatif-ops-token"


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """2000 transactions on ladder A over the 30 days before T0 - 2d, in a SQLite store; A is the schedule
    loaded now, B a proposal for it (same name) in another folder."""
    tmp = tmp_path_factory.mktemp("whatif")
    url = f"sqlite:///{tmp / 'history.db'}"
    engine = make_engine(url)
    upgrade(engine)
    (tmp / "schedules").mkdir()
    (tmp / "proposals").mkdir()
    a = schedule(tmp / "schedules", LADDER_A, "standard.yaml")
    b = schedule(tmp / "proposals", LADDER_B, "standard.yaml")
    synthetic = generate(Store(engine, clock=Clock()), a, n=2000, seed=7)
    engine.dispose()
    return {"tmp": tmp, "url": url, "a": a, "b": b, "synthetic": synthetic}


@pytest.fixture
def env(history, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in {"DATABASE_URL": history["url"], "REMIND_SCHEDULES_DIR": str(history["tmp"] / "schedules"),
                       "REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
                       "REMIND_OUTBOX": str(tmp_path / "out.jsonl")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    real = Remind.from_settings.__func__  # the service clock at T0, not today's date
    monkeypatch.setattr(Remind, "from_settings",
                        classmethod(lambda cls, *a, **kw: real(cls, *a, **{"clock": Clock(), **kw})))
    return history


def run(*args):
    return CliRunner().invoke(main, ["schedules", "whatif", *args])


@pytest.fixture(scope="module")
def full(history):
    """One full run (400 draws, backtest), as JSON through the CLI."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"DATABASE_URL": history["url"], "REMIND_SCHEDULES_DIR": str(history["tmp"] / "schedules"),
                           "REMIND_TEMPLATES_DIR": str(ROOT / "templates")}.items():
            patch.setenv(key, value)
        patch.delenv("REDIS_URL", raising=False)
        patch.chdir(history["tmp"])
        real = Remind.from_settings.__func__
        patch.setattr(Remind, "from_settings",
                      classmethod(lambda cls, *a, **kw: real(cls, *a, **{"clock": Clock(), **kw})))
        result = run(str(history["tmp"] / "proposals" / "standard.yaml"), "--since", "40d", "--backtest", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_whatif_of_another_ladder_recovers_its_true_rate(full, history):
    synthetic = history["synthetic"]
    true_b, true_a = synthetic.true_rate(history["b"]), synthetic.true_rate(history["a"])
    rate = full["whatif"]["confirmation_rate"]
    assert rate["low"] <= true_b <= rate["high"], (true_b, rate)
    assert rate["low"] < rate["value"] < rate["high"]
    assert rate["high"] - rate["low"] < 0.15
    assert abs(true_b - true_a) > 0.01  # B really is another ladder
    assert full["transactions"] == 2000 and full["schedule"] == "standard"
    # the actual column: what A did, counted from the store
    current = full["current"]
    assert current["confirmation_rate"]["low"] <= true_a <= current["confirmation_rate"]["high"]
    assert set(current["messages"]) == {"sms", "email", "push"} and current["sms_segments"] > 0
    assert current["cost"] is None and full["whatif"]["cost"] is None  # no pricing given
    # B reminds earlier: more messages per transaction before confirmations stop them, and a quicker median
    new = full["whatif"]
    assert sum(new["messages"].values()) > 0 and new["sms_segments"] > 0
    assert new["median_time_to_confirm_seconds"]["value"] < current["median_time_to_confirm_seconds"]
    med = new["median_time_to_confirm_seconds"]
    assert med["low"] <= med["value"] <= med["high"]
    assert full["model"]["customer_confirmations"] == current["confirmed_by_customer"]
    assert any("same effect" in a for a in full["assumptions"])


def test_the_backtest_error_is_small(full):
    bt = full["backtest"]
    assert bt["within_interval"] is True
    assert abs(bt["error"]) < 0.03
    assert bt["fitted_on"]["transactions"] + bt["predicted"]["transactions"] == 2000
    low, high = bt["prediction_interval"]["low"], bt["prediction_interval"]["high"]
    assert low <= bt["actual_rate"]["value"] <= high
    text = model.to_text(full)
    assert re.search(r"backtest: fitted on \d+ transactions", text)
    assert "within the interval" in text and "error " in text


def test_the_cli_prints_both_columns(env, monkeypatch):
    monkeypatch.setattr(model, "DRAWS", 60)  # the layout, not the precision
    result = run(str(env["tmp"] / "proposals" / "standard.yaml"), "--since", "12d")  # the last 10 days of it
    assert result.exit_code == 0, result.output
    out = result.output
    assert "what-if: standard" in out and "settled transactions of schedule standard since 2026-11-13" in out
    header = next(line for line in out.splitlines() if "current (actual)" in line)
    assert "proposed (expected) [95% interval]" in header
    for figure in ("customer confirmation rate", "median time to confirm", "sms messages", "email messages",
                   "push messages", "sms segments", "cost"):
        assert any(line.strip().startswith(figure) for line in out.splitlines()), figure
    assert "assumptions:" in out and "Poisson GLM" in out and "- (no pricing)" in out


def test_an_invalid_file_is_a_clear_error(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(LADDER_B.replace("after: 1h,", "after: soon,"))
    result = run(str(bad))
    assert result.exit_code == 1
    assert f"error: {bad}:7: steps[1].after: 'soon' is not a duration" in result.output
    missing = tmp_path / "nope.yaml"
    assert "cannot be read" in run(str(missing)).output
    unknown = tmp_path / "tpl.yaml"
    unknown.write_text(LADDER_B.replace("template: reminder}", "template: no_such_template}"))
    result = run(str(unknown))
    assert result.exit_code == 1 and f"{unknown}:7: steps[1].template:" in result.output


def test_a_schedule_with_no_history_names_the_recorded_ones(env, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(LADDER_B.replace("name: standard", "name: other"))
    result = run(str(other), "--since", "40d")
    assert result.exit_code == 1
    assert "no settled transactions of schedule 'other'" in result.output and "standard" in result.output
    assert "usage" not in result.output.lower()
    result = run(str(other), "--since", "soon")
    assert result.exit_code == 1 and "'soon' is neither a duration" in result.output


def test_ops_whatif_page(env, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "DRAWS", 60)
    settings = make_settings(tmp_path, env["url"], schedules_dir=env["tmp"] / "schedules", ops_tokens=TOKEN)
    remind = Remind.from_settings(settings, clock=Clock(), migrate=False)
    client = TestClient(create_app(remind), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert client.get("/ops/whatif", follow_redirects=False).status_code == 303
        page = client.get("/ops/whatif", headers=auth)
        assert page.status_code == 200 and "<textarea" in page.text and "<script" not in page.text
        assert "script-src" not in page.headers["content-security-policy"]
        ok = client.post("/ops/whatif", headers=auth, data={"schedule_yaml": LADDER_B, "since": "12d"})
        assert ok.status_code == 200, ok.text
        assert "current (actual)" in ok.text and "customer confirmation rate" in ok.text
        assert "settled transactions of schedule <strong>standard</strong>" in ok.text
        uploaded = client.post("/ops/whatif", headers=auth, data={"since": "40d"}, files={
            "upload": ("mine.yaml", LADDER_B.replace("after: 1h,", "after: soon,").encode(), "application/x-yaml")})
        assert uploaded.status_code == 422 and "mine.yaml:7: steps[1].after:" in uploaded.text
        bad = client.post("/ops/whatif", headers=auth,
                          data={"schedule_yaml": LADDER_B.replace("after: 1h,", "after: soon,"), "since": "40d"})
        assert bad.status_code == 422 and "proposed.yaml:7: steps[1].after:" in bad.text
        assert "remind-whatif-" not in bad.text  # the private copy's path is not shown
        assert client.post("/ops/whatif", headers=auth, data={"schedule_yaml": "[1, 2"}).status_code == 422
        assert client.post("/ops/whatif", headers=auth, data={"schedule_yaml": " "}).status_code == 422
        binary = client.post("/ops/whatif", headers=auth, files={"upload": ("x.yaml", b"\xff\xfe\x00", "text/plain")})
        assert binary.status_code == 422
        assert client.post("/ops/whatif", headers=auth, data={"schedule_yaml": LADDER_B,
                                                                "since": "whenever"}).status_code == 422
        huge = client.post("/ops/whatif", headers=auth, data={"schedule_yaml": "#" * 70_000})
        assert huge.status_code == 413
        other = client.post("/ops/whatif", headers=auth, data={"schedule_yaml": LADDER_B, "schedule": "nope",
                                                               "since": "40d"})
        assert other.status_code == 422 and "no settled transactions of schedule" in other.text
    finally:
        remind.store.engine.dispose()


# -- the pieces, on hand-made numbers --------------------------------------------------------------


def _record(**kw) -> Record:
    base = dict(id="t", schedule="s", segment="new", created_at=T0, expires_at=None,
                deadline=T0 + timedelta(hours=24), zone="UTC", customer={}, locale="en", confirmed_at=None,
                external_at=None)
    return Record(**{**base, **kw})


def test_only_customer_confirmations_are_events_and_other_settlements_censor():
    def tx(i, status, source, at, **kw):
        row = {"id": f"t{i}", "schedule": "s", "status": status, "segment": None, "content": {},
               "created_at": T0, "expires_at": None, "deadline": T0 + timedelta(hours=24), "confirmed_at": None,
               "cancelled_at": None, "escalated_at": None, "settled_source": source}
        row.update(kw)
        if at is not None:
            row[{"confirmed": "confirmed_at", "cancelled": "cancelled_at", "escalated": "escalated_at"}[status]] = at
        return row

    hours = lambda h: T0 + timedelta(hours=h)  # noqa: E731
    txs = [tx(0, "confirmed", "customer", hours(3)), tx(1, "confirmed", "platform", hours(3)),
           tx(2, "cancelled", "ops", hours(5)), tx(3, "cancelled", "deadline", hours(24)),
           tx(4, "pending", None, None), tx(5, "escalated", "deadline", hours(24)),
           tx(6, "confirmed", "ops", hours(30)), tx(7, "confirmed", "customer", hours(1), deadline=hours(72))]
    recs = {r.id: r for r in records(txs, [], T0 + timedelta(days=2))}
    assert "t4" not in recs and "t7" not in recs  # still pending, or its deadline still to come: left out
    assert recs["t0"].confirmed_at == hours(3) and recs["t0"].end == hours(3)
    assert recs["t1"].confirmed_at is None and recs["t1"].external_at == hours(3)  # platform: censored
    assert recs["t2"].external_at == hours(5) and recs["t2"].end == hours(5)
    assert recs["t3"].end == recs["t5"].end == hours(24)  # the deadline
    assert recs["t6"].confirmed_at is None and recs["t6"].end == hours(24)  # after review: past the deadline
    assert recs["t0"].segment == "(none)"
    assert actual(list(recs.values()))["confirmed_by_customer"] == 1


def test_pieces_cut_at_bins_and_reminders():
    at = lambda h: T0 + timedelta(hours=h)  # noqa: E731
    ps = pieces(T0, at(3), [(at(1.5), "reminder:sms")], base_bins=(0, 1, 2), since_bins=(0, 0.5))
    assert [(p.start, p.hours, p.base, p.kind, p.since) for p in ps] == [
        (0, 1, 0, None, None), (1, 0.5, 1, None, None), (1.5, 0.5, 1, "reminder:sms", 0),
        (2, 1, 2, "reminder:sms", 1)]
    assert sum(p.hours for p in ps) == 3


class FlatPricing:
    """A stand-in for worker.pricing.Pricing: a price per message, per SMS segment."""

    currency = "GBP"

    def cost(self, channel: str, *, segments: int = 1, phone: str | None = None,
             country_code: int | None = None) -> Decimal:
        return {"sms": Decimal("0.04") * segments, "email": Decimal("0.001"), "push": Decimal("0")}[channel]


def test_cost_goes_through_the_pricing_protocol(history):
    recs = records(*_rows(history), T0)
    fitted = model.fit(recs[:600])
    figures = predict(fitted, history["b"], recs[:300], pricing=FlatPricing(), draws=20,
                      segments_per_sms=model.segment_table(recs))
    segments = figures["sms_segments"]
    email = figures["messages"]["email"]
    expected = Decimal("0.04") * Decimal(repr(segments)) + Decimal("0.001") * Decimal(repr(email))
    assert abs(Decimal(figures["cost"]) - expected) < Decimal("1.0")  # rounded segments vs expected counts
    spent = actual(recs[:300], FlatPricing())
    assert Decimal(spent["cost"]) == (Decimal("0.04") * spent["sms_segments"] + Decimal("0.001") * spent["messages"][
        "email"]).quantize(Decimal("0.01"))


def _rows(history):
    from worker.store import history_rows

    engine = make_engine(history["url"])
    try:
        return history_rows(Store(engine), None, T0)
    finally:
        engine.dispose()
