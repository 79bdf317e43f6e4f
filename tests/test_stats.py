"""The confirmation funnel on a data set with known answers, driven through the real pipeline on
both backends, and the same figures through `remind stats` and GET /v1/stats."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient
from support import ROOT, T0, Clock, Harness, make_settings, private_database, transaction

from worker.broker import InProcessWorker, bind, make_broker
from worker.cli import main
from worker.service import Remind
from worker.stats import funnel, parse_since, summarize, wilson
from worker.web.app import create_app

TOKEN = "stats-token"

SCHEDULES = {
    "funnel.yaml": """
name: funnel
match: {}
priority: 100
steps:
  - {after: 15m, channels: [push], template: nudge}
  - {after: 2h, channels: [sms, push], template: reminder}
  - {after: 20h, channels: [sms, email, push], template: final_warning}
cancel: {after: 24h, template: cancelled, reason: not_confirmed, channels: [sms, email, push]}
""",
    "review.yaml": """
name: review
match: {risk_flag: true}
priority: 10
steps:
  - {after: 5m, channels: [sms, push], template: verify}
  - {after: 1h, channels: [sms, email, push], template: final_warning}
escalate: {after: 2h, template: escalated, reason: risk_review, channels: [sms, email]}
""",
}


def build_dataset(h: Harness) -> Harness:
    """On `funnel`: 10 transactions reached by the nudge; 3 confirm after it (5m, 15m, 60m later), 2 after
    the reminder (10m, 60m later), 1 is cancelled by the platform after the reminder, 4 are cancelled at
    the deadline after the final warning. Plus one confirmed before any reminder, one created three days
    ago (first seen by a tick now: cancelled at once, no reminder sent), and one risk-flagged
    transaction on `review` that escalates. ``h`` runs on SCHEDULES."""
    r = h.remind
    for i in range(10):
        r.register(transaction(f"d{i}"))
    r.register(transaction("d_early"))
    h.at(days=-3)  # registered in time three days ago (a passed deadline is refused), first ticked now
    r.register(transaction("d_old", created_at=(T0 - timedelta(days=3)).isoformat()))
    h.at()
    r.register(transaction("r1", risk_flag=True))
    h.at(minutes=1)
    r.confirm("d_early")
    h.at(minutes=5).tick()
    h.at(minutes=15).tick()
    for tx_id, minutes in (("d0", 20), ("d1", 30)):
        h.at(minutes=minutes)
        r.confirm(tx_id)
    h.at(hours=1).tick()
    h.at(minutes=75)
    r.confirm("d2")
    h.at(hours=2).tick()
    h.at(minutes=130)
    r.confirm("d3")
    h.at(hours=3)
    r.confirm("d4")
    r.cancel("d5", "customer asked support")
    h.at(hours=20).tick()
    h.at(hours=24).tick()
    return h


#: Where the service clock stands once the data set is built (the last tick, at the deadlines).
BUILT_AT = T0 + timedelta(hours=24)


@contextmanager
def stats_harness(tmp: Path, database_url: str, redis_url: str | None) -> Iterator[Harness]:
    """A harness on SCHEDULES with the ops and platform tokens, as conftest's make_harness builds one, but for
    a whole module: the data set takes seconds to drive through the pipeline, and every test here only reads it."""
    folder = tmp / "schedules"
    folder.mkdir()
    for name, text in SCHEDULES.items():
        (folder / name).write_text(text)
    settings = make_settings(tmp, database_url, redis_url=redis_url, min_backoff_ms=20, schedules_dir=folder,
                             ops_tokens=TOKEN, api_tokens="platform-token")
    clock = Clock()
    remind = Remind.from_settings(settings, clock=clock)
    broker = make_broker(settings)
    bind(remind, broker)
    if redis_url:
        broker.flush_all()
    worker = InProcessWorker(broker, threads=settings.worker_threads).start()
    try:
        yield Harness(remind, clock, settings.outbox, worker, settings.queue_name, [broker])
    finally:
        worker.stop()
        remind.store.engine.dispose()


@pytest.fixture(scope="module", params=["sqlite+stub", "postgres+redis"])
def built(request, tmp_path_factory) -> Iterator[tuple[Harness, tuple]]:
    """The data set, built once per backend for this module (PostgreSQL: a database of its own, so no other
    test's reset empties it), with a fingerprint of everything the tests read."""
    tmp = tmp_path_factory.mktemp(f"stats-{request.param}")
    with ExitStack() as stack:
        if request.param == "sqlite+stub":
            database_url, redis_url = f"sqlite:///{tmp / 'remind.db'}", None
        else:
            redis_url = request.getfixturevalue("redis_url")
            database_url = stack.enter_context(private_database(f"remind_stats_{os.getpid()}"))
        h = build_dataset(stack.enter_context(stats_harness(tmp, database_url, redis_url)))
        yield h, fingerprint(h)


def fingerprint(h: Harness) -> tuple:
    store = h.remind.store
    return store.counts(), funnel(store, since=T0 - timedelta(days=30), now=BUILT_AT), len(h.lines())


@pytest.fixture
def dataset(built) -> Iterator[Harness]:
    """The module's data set with its clock where the build left it. A test may move the clock (it is put
    back), never the data: a test that changed it fails here, rather than the tests after it."""
    h, before = built
    h.clock.set(BUILT_AT)
    yield h
    h.clock.set(BUILT_AT)
    assert fingerprint(h) == before, "a test changed the shared data set"


def by_step(schedule: dict) -> dict[str, dict]:
    return {f"{s['step']}/{s['variant']}": s for s in schedule["steps"]}


def test_wilson_matches_the_hand_computed_interval():
    # k=3, n=10, z=1.95996: centre = (0.3 + z²/20) / (1 + z²/10) = 0.49207/1.38415 = 0.35550,
    # half = z/1.38415 · sqrt(0.021 + z²/400) = 1.41600 · 0.17494 = 0.24772 -> [0.108, 0.603]
    w = wilson(3, 10)
    assert (round(w["low"], 3), round(w["high"], 3)) == (0.108, 0.603) and w["value"] == 0.3
    assert wilson(0, 0) == {"value": None, "low": None, "high": None}
    assert round(wilson(0, 4)["low"], 3) == 0.0 and round(wilson(0, 4)["high"], 3) == 0.490


def test_funnel_figures_on_a_known_data_set(dataset):
    stats = funnel(dataset.remind.store, now=T0 + timedelta(days=1))
    assert [s["schedule"] for s in stats["schedules"]] == ["funnel", "review"]
    f, review = stats["schedules"]
    assert {k: f[k] for k in ("transactions", "confirmed", "cancelled", "escalated", "pending",
                              "confirmed_before_first_step")} == {
        "transactions": 12, "confirmed": 6, "cancelled": 6, "escalated": 0, "pending": 0,
        "confirmed_before_first_step": 1}
    # 6/12: centre 0.5, half = 1.95996/1.32013 · sqrt(0.25/12 + 3.84146/576) = 1.48468 · 0.16584 = 0.24622
    assert f["confirmation_rate"]["value"] == 0.5
    assert (round(f["confirmation_rate"]["low"], 3), round(f["confirmation_rate"]["high"], 3)) == (0.254, 0.746)
    # from created_at: 1m, 20m, 30m, 75m, 130m, 180m -> median (30m + 75m) / 2
    assert f["median_time_to_confirm_seconds"] == 3150
    assert {b["bucket"]: b["count"] for b in f["time_to_confirm_histogram"]} == {
        "<5m": 1, "5m-15m": 0, "15m-1h": 2, "1h-4h": 3, "4h-12h": 0, "12h-24h": 0, ">=24h": 0}

    steps = by_step(f)
    assert list(steps) == ["nudge/default", "reminder/default", "final_warning/default"]
    nudge, reminder, final = steps.values()
    assert (nudge["reached"], nudge["confirmed_after"], nudge["cancelled"]) == (10, 3, 0)
    assert nudge["median_time_to_confirm_seconds"] == 900  # 5m, 15m, 60m
    assert nudge["messages"] == {"push": 10} and nudge["sms_messages"] == 0
    assert (reminder["reached"], reminder["confirmed_after"], reminder["cancelled"]) == (7, 2, 1)
    assert reminder["median_time_to_confirm_seconds"] == 2100  # 10m, 60m
    assert reminder["messages"] == {"sms": 7, "push": 7} and reminder["sms_messages"] == 7
    # 2/7: centre = (0.28571 + 0.27439) / 1.54878 = 0.36164; half = 1.26549 · 0.22080 = 0.27942
    r = reminder["confirmation_rate"]
    assert (round(r["low"], 3), round(r["high"], 3)) == (0.082, 0.641)
    assert (final["reached"], final["confirmed_after"], final["cancelled"]) == (4, 0, 4)
    assert final["median_time_to_confirm_seconds"] is None and final["confirmation_rate"]["value"] == 0
    assert final["messages"] == {"sms": 4, "email": 4, "push": 4}
    # segments as billed: counted from the SMS bodies the outbox received, per step
    from worker.sms import segments

    on_funnel = {x["transaction_id"] for x in dataset.lines()
                 if dataset.remind.show(x["transaction_id"])["schedule"] == "funnel"}
    for name, step in (("nudge", nudge), ("reminder", reminder), ("final_warning", final)):
        bodies = [x["body"] for x in dataset.lines() if x["channel"] == "sms" and x["step"] == name
                  and x["transaction_id"] in on_funnel]
        assert step["sms_segments"] == (sum(segments(b).segments for b in bodies) if bodies else None), name

    assert (review["transactions"], review["escalated"], review["confirmation_rate"]["value"]) == (1, 1, 0)
    rs = by_step(review)
    assert list(rs) == ["verify/default", "final_warning/default"]
    assert (rs["verify/default"]["escalated"], rs["final_warning/default"]["escalated"]) == (0, 1)
    assert rs["verify/default"]["messages"] == {"sms": 1, "push": 1}


def test_since_and_schedule_filters(dataset):
    store, now = dataset.remind.store, T0 + timedelta(days=1)
    for since in ("2026-11-24", "2d", "2026-11-25T08:00:00+00:00"):
        f = funnel(store, since=since, now=now)["schedules"][0]
        assert (f["schedule"], f["transactions"], f["cancelled"]) == ("funnel", 11, 5)  # without d_old
        # 6/11: centre = (0.54545 + 0.17462) / 1.34922 = 0.53369; half = 1.45266 · 0.17457 = 0.25360
        rate = f["confirmation_rate"]
        assert (round(rate["low"], 3), round(rate["high"], 3)) == (0.280, 0.787)
    assert funnel(store, since="1h", now=now)["schedules"] == []
    only = funnel(store, schedule="review", now=now)
    assert only["schedule"] == "review" and [s["schedule"] for s in only["schedules"]] == ["review"]
    assert funnel(store, schedule="nope", now=now)["schedules"] == []
    with pytest.raises(ValueError):
        parse_since("last tuesday", now)
    assert parse_since("2026-11-24", now).isoformat() == "2026-11-24T00:00:00+00:00"


def test_attribution_boundaries_variants_and_segments():
    """Pure: a confirmation exactly at the next step's first send belongs to the next step; variants
    are counted apart; segments are summed when the store has them."""
    def at(minutes: int):
        return T0 + timedelta(minutes=minutes)

    def row(tx: str, step: str, variant: str, channel: str, minutes: int, seg: int | None = None) -> dict:
        return {"transaction_id": tx, "step": step, "variant": variant, "channel": channel, "messages": 1,
                "first_sent": at(minutes), "segments": seg}

    txs = [{"id": i, "schedule": "s", "status": st, "created_at": T0, "confirmed_at": c, "cancelled_at": None,
            "escalated_at": None} for i, st, c in (("a", "confirmed", at(60)), ("b", "confirmed", at(40)),
                                                   ("c", "cancelled", None), ("d", "pending", None))]
    dls = [row("a", "one", "A", "sms", 15, seg=2), row("a", "one", "A", "push", 16),
           row("a", "two", "default", "sms", 60, seg=1), row("b", "one", "B", "sms", 15, seg=3),
           row("c", "one", "A", "push", 15), row("d", "one", "B", "push", 15)]
    [s] = summarize(txs, dls)
    steps = by_step(s)
    assert list(steps) == ["one/A", "one/B", "two/default"]
    assert (steps["one/A"]["reached"], steps["one/A"]["confirmed_after"], steps["one/A"]["cancelled"]) == (2, 0, 1)
    assert steps["one/A"]["messages"] == {"sms": 1, "push": 2} and steps["one/A"]["sms_segments"] == 2
    assert (steps["one/B"]["reached"], steps["one/B"]["confirmed_after"]) == (2, 1)
    assert steps["one/B"]["median_time_to_confirm_seconds"] == 25 * 60 and steps["one/B"]["sms_segments"] == 3
    assert (steps["two/default"]["confirmed_after"], steps["two/default"]["median_time_to_confirm_seconds"]) == (1, 0)
    assert (s["pending"], s["confirmed_before_first_step"]) == (1, 0)


def test_remind_stats_prints_a_table_and_json(dataset, tmp_path, monkeypatch):
    settings = dataset.remind.settings
    monkeypatch.chdir(tmp_path)
    for key, value in {"DATABASE_URL": settings.database_url, "REMIND_SCHEDULES_DIR": str(settings.schedules_dir),
                       "REMIND_TEMPLATES_DIR": str(ROOT / "templates"),
                       "REMIND_OUTBOX": str(tmp_path / "cli.jsonl")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    # an explicit window: without one it is the last 7 days of the wall clock, and the data set lives at T0
    result = CliRunner().invoke(main, ["stats", "--since", "2026-11-01"])
    assert result.exit_code == 0, result.output
    assert "funnel: 12 transactions, 6 confirmed 50.0% [25.4%-74.6%], 6 cancelled" in result.output
    assert "1 confirmed before the first step went out" in result.output
    nudge = next(line for line in result.output.splitlines() if line.strip().startswith("nudge"))
    assert nudge.split()[:5] == ["nudge", "default", "10", "3", "30.0%"] and nudge.rstrip().endswith("push 10")
    assert "time to confirm: <5m 1, 5m-15m 0, 15m-1h 2, 1h-4h 3" in result.output

    as_json = json.loads(CliRunner().invoke(main, ["stats", "--json", "--schedule", "review", "--since",
                                                   "2026-11-01"]).output)
    expected = funnel(dataset.remind.store, schedule="review", since="2026-11-01")
    assert as_json["schedules"] == expected["schedules"]
    bad = CliRunner().invoke(main, ["stats", "--since", "yesterday-ish"])
    assert bad.exit_code == 2 and "--since" in bad.output


def test_get_v1_stats_needs_the_ops_token_and_returns_the_funnel(dataset):
    with TestClient(create_app(dataset.remind)) as client:
        assert client.get("/v1/stats").status_code == 401
        assert client.get("/v1/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        body = client.get("/v1/stats", headers=auth).json()
        assert body["schedules"] == funnel(dataset.remind.store)["schedules"]
        assert [s["schedule"] for s in client.get("/v1/stats?schedule=review", headers=auth).json()["schedules"]] == [
            "review"]
        assert len(client.get("/v1/stats?since=2026-11-24", headers=auth).json()["schedules"]) == 2
        bad = client.get("/v1/stats?since=soon", headers=auth)
        assert bad.status_code == 422 and "since" in bad.json()["problems"]
        # the platform's token is valid, but not for ops
        assert client.get("/v1/stats", headers={"Authorization": "Bearer platform-token"}).status_code == 403
        assert client.get("/ops", follow_redirects=False).headers["location"] == "/ops/login"
        assert client.get(f"/ops?token={TOKEN}", follow_redirects=False).status_code == 303  # never from a URL
        page = client.get("/ops", headers=auth)
        assert page.status_code == 200 and "content-security-policy" in page.headers
        assert "Confirmation funnel" in page.text


def test_the_default_window_is_the_last_7_days_of_the_service_clock(dataset):
    """No ``since``: transactions created in the 7 days before the injected clock, never the wall clock's."""
    store = dataset.remind.store
    one_day = funnel(store, now=T0 + timedelta(days=1))
    assert one_day["since"] == "2026-11-19T09:00:00Z"  # T0 + 1 day - 7 days
    assert [s["transactions"] for s in one_day["schedules"]] == [12, 1]  # d_old (T0 - 3 days) is in
    later = funnel(store, now=T0 + timedelta(days=5))  # the window starts at T0 - 2 days: d_old is out
    assert [s["transactions"] for s in later["schedules"]] == [11, 1]
    assert funnel(store, now=T0 + timedelta(days=8))["schedules"] == []  # everything is older than 7 days
    widened = funnel(store, since="30d", now=T0 + timedelta(days=8))
    assert [s["transactions"] for s in widened["schedules"]] == [12, 1]
    assert widened["schedules"] == one_day["schedules"]

    dataset.clock.set(T0 + timedelta(days=8))
    with TestClient(create_app(dataset.remind)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        body = client.get("/v1/stats", headers=auth).json()
        assert body["since"] == "2026-11-26T09:00:00Z" and body["schedules"] == []
        wide = client.get("/v1/stats?since=30d", headers=auth).json()
        assert [s["transactions"] for s in wide["schedules"]] == [12, 1]
        page = client.get("/ops", headers=auth)
        assert page.status_code == 200 and "Transactions created since 2026-11-26T09:00:00Z" in page.text
        assert "No transactions on this schedule in this period" in page.text
        assert "12 transactions" not in client.get("/ops", headers=auth).text
        assert client.get("/ops?since=30d", headers=auth).text.count('class="chart funnel"') == 2


def test_the_database_aggregation_matches_the_python_reference(dataset):
    """worker.stats.summarize (Python, on every row) is the definition; the database's aggregation must give
    exactly the same figures, on both backends."""
    from worker.store import funnel_rows

    store = dataset.remind.store
    for since, schedule in ((T0 - timedelta(days=30), None), (T0 - timedelta(hours=1), None),
                            (T0 - timedelta(days=30), "review")):
        expected = summarize(*funnel_rows(store, since, schedule))
        assert funnel(store, since=since, schedule=schedule)["schedules"] == expected


def test_the_aggregation_matches_the_reference_on_random_rows(backend, tmp_path):
    """Rows written straight into the tables: A/B variants, several steps sent in the same second (ties),
    confirmations exactly at a send, before any send and never, failed and skipped deliveries, SMS with and
    without segments, a transaction outside the window."""
    import random

    from sqlalchemy import insert

    from worker.store import Store, funnel_rows, make_engine, upgrade
    from worker.store.tables import deliveries, transactions

    url, _redis = backend
    engine = make_engine(url)
    upgrade(engine)
    rng = random.Random(14)
    at = [T0 + timedelta(minutes=m) for m in range(0, 600, 5)]
    txs, dls = [], []
    for i in range(300):
        created = T0 - timedelta(days=10 if i % 50 == 0 else 0, minutes=rng.randrange(60))
        status = rng.choice(["confirmed", "confirmed", "cancelled", "escalated", "pending"])
        confirmed = rng.choice(at) if status == "confirmed" else None
        txs.append({"id": f"r{i:03d}", "status": status, "content": {}, "customer_id": "c", "risk_flag": False,
                    "amount": 1, "currency": "USD", "schedule": rng.choice(["a", "b"]), "schedule_version": "v",
                    "created_at": created, "deadline": created + timedelta(days=1), "registered_at": created,
                    "confirmed_at": confirmed})
        for step in rng.sample(["one", "two", "three", "four"], rng.randrange(5)):
            variant = rng.choice(["default", "A", "B"])
            sent = rng.choice(at)
            for channel in rng.sample(["sms", "email", "push"], rng.randrange(1, 4)):
                dstatus = rng.choice(["sent", "sent", "delivered", "failed", "skipped", "queued"])
                dls.append({"transaction_id": f"r{i:03d}", "step": step, "kind": rng.choice(["reminder"] * 5 + [
                    "notice"]), "channel": channel, "variant": variant, "due_at": sent, "status": dstatus,
                    "attempts": 1, "updated_at": sent,
                    "sent_at": sent + timedelta(seconds=rng.choice([0, 0, 1])) if dstatus in ("sent", "delivered")
                    else None,
                    "segments": rng.choice([None, 1, 2]) if channel == "sms" else None})
    with engine.begin() as conn:
        conn.execute(insert(transactions), txs)
        conn.execute(insert(deliveries), dls)
    store = Store(engine)
    for since, schedule in ((T0 - timedelta(days=30), None), (T0 - timedelta(days=1), None),
                            (T0 - timedelta(days=30), "b")):
        expected = summarize(*funnel_rows(store, since, schedule))
        got = funnel(store, since=since, schedule=schedule)["schedules"]
        assert got == expected
    assert sum(s["transactions"] for s in funnel(store, since=T0 - timedelta(days=1))["schedules"]) == 294
    engine.dispose()
