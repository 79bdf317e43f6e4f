"""Languages: which templates a customer's tag gets, that dates and money read in the language of the text,
that every message of every locale names the total, fee and deadline, cancellation reasons in words, the
restart link, and the `approved` template. Through the real Templates, delivery pipeline and HTTP app."""

from __future__ import annotations

import json
import re
import shutil
from datetime import timedelta

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient
from support import ROOT, T0, Clock, make_settings, transaction

from worker.cli import main
from worker.errors import ConfigError
from worker.ingest import parse_transaction
from worker.links import confirm_url, make_token
from worker.render import PARTS, Templates, facts_for
from worker.service import Remind
from worker.sms import segments
from worker.web.app import create_app

TEMPLATES = Templates(ROOT / "templates")
LOCALES = ("en", "zh-CN", "zh-TW")
REASONS = ("not_confirmed", "customer_request", "risk_declined", "compliance", "risk_review", "limit_exceeded",
           "a_platform_code_of_32_characters")
DEADLINE = T0 + timedelta(hours=24)  # 2026-11-26 17:00 in Asia/Shanghai


def content(locale: str = "en", **overrides) -> dict:
    """A realistic transaction as stored: a five-figure amount, a real-length payment method."""
    tx = transaction("tx_20261125_0001", customer={"locale": locale}, amount="12500.00", **overrides)
    return parse_transaction(tx, now=T0).canonical()


def facts(locale: str, *, reason: str = "", restart_url: str | None = "", at=T0) -> dict:
    link = confirm_url("https://pay.example.com", "k" * 32, "tx_20261125_0001", DEADLINE)
    return facts_for(content(locale), templates=TEMPLATES, now=at, deadline=DEADLINE, confirm_url=link,
                     restart_url=restart_url, step="s", reason=reason)


def template_names(locale: str) -> set[str]:
    folder = ROOT / "templates" / locale
    return {p.name for p in folder.iterdir() if p.is_dir() and p.name != "reasons" and not p.name.startswith("_")}


# -- negotiation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tag, expected", [
    ("zh", "zh-CN"), ("zh-Hans", "zh-CN"), ("zh-Hans-CN", "zh-CN"), ("zh-CN", "zh-CN"), ("zh-SG", "zh-CN"),
    ("zh-TW", "zh-TW"), ("zh-HK", "zh-TW"), ("zh-MO", "zh-TW"), ("zh-Hant", "zh-TW"), ("zh-Hant-HK", "zh-TW"),
    ("zh-Hant-TW", "zh-TW"), ("zh-Hant-CN", "zh-TW"), ("zh-Hans-TW", "zh-CN"), ("zh_TW", "zh-TW"), ("ZH-hk", "zh-TW"),
    ("en", "en"), ("en-GB", "en"), ("en-US", "en"), ("fr-FR", "en"), ("xx", "en"), ("", "en"),
])
def test_each_tag_gets_the_templates_of_its_language_and_script(tag, expected):
    assert TEMPLATES.negotiate(tag) == expected
    assert TEMPLATES.speaks(tag) == (tag.lower()[:2] in ("zh", "en"))


def test_a_zh_customer_gets_chinese_text_with_chinese_dates():
    text = TEMPLATES.render("reminder", "sms", "zh", facts("zh")).body
    assert text.startswith("您的¥12,500.00转账仍未确认") and "2026年11月26日 17:00前确认" in text


def test_zh_tw_text_has_traditional_chinese_dates_and_words():
    for tag in ("zh-TW", "zh-HK", "zh-Hant", "zh-Hant-CN"):
        text = TEMPLATES.render("reminder", "sms", tag, facts(tag)).body
        assert "轉帳" in text and "转账" not in text
        assert "2026年11月26日 下午5:00前確認" in text, text


def test_an_unknown_locale_gets_english_text_with_english_dates():
    for tag in ("fr-FR", "xx"):
        f = facts(tag)
        text = TEMPLATES.render("reminder", "sms", tag, f).body
        assert text.startswith("Reminder: your transfer still needs confirming.")
        assert f["deadline"] == "Nov 26, 2026, 5:00 PM" and "CN¥12,512.50" in text  # not "26 nov. 2026, 17:00"
        assert f["timezone"] == "China Time"


def test_en_gb_gets_english_text_in_british_format():
    f = facts("en-GB")
    text = TEMPLATES.render("reminder", "sms", "en-GB", f).body
    assert text.startswith("Reminder: your transfer") and "26 Nov 2026, 17:00" in text


# -- transparency on every channel ----------------------------------------------------------------


def test_every_locale_ships_the_same_templates():
    names = template_names("en")
    assert {"nudge", "reminder", "guide", "final_warning", "verify", "cancelled", "escalated", "approved"} <= names
    for locale in LOCALES:
        assert template_names(locale) == names
        for name in names:
            for parts in PARTS.values():
                for part in parts:
                    assert (ROOT / "templates" / locale / name / part).is_file()


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("template", sorted(template_names("en")))
def test_every_message_names_the_total_fee_and_deadline_within_the_length_limits(locale, template):
    reasons = REASONS if template in ("cancelled", "escalated") else ("",)
    for reason in reasons:
        for restart_url in ("", "https://app.example.com/transfers/new"):
            f = facts(locale, reason=reason, restart_url=restart_url)
            must = (f["total"], f["fee"], f["arrival"] if template == "approved" else f["deadline"])
            for channel in PARTS:
                r = TEMPLATES.render(template, channel, locale, f)
                texts = {"body": r.body, "html": r.html} if channel == "email" else {"body": r.body}
                for part, text in texts.items():
                    for value in must:
                        assert value in text, (locale, template, channel, part, reason, value)
                if channel == "push":
                    assert 0 < len(r.subject) <= 65 and 0 < len(r.body) <= 240, (locale, template, r.body)
                if channel == "sms":
                    assert segments(r.body).segments <= 3, (locale, template, reason, segments(r.body))
                if channel == "email":  # the shared facts table: payment method and reference in both forms
                    for text in (r.body, r.html):
                        assert f["payment_method"] in text and f["transaction_id"] in text


def test_approved_ships_in_every_locale_and_channel():
    for channel in PARTS:
        assert TEMPLATES.missing("approved", channel) == []
    r = TEMPLATES.render("approved", "sms", "en", facts("en"))
    assert "confirmed" in r.body and "https://pay.example.com/c/" not in r.body


# -- cancellation reasons -------------------------------------------------------------------------


@pytest.mark.parametrize("locale, code, words", [
    ("en", "not_confirmed", "It wasn't confirmed before the deadline."),
    ("en", "customer_request", "You asked us to cancel it."),
    ("en", "risk_declined", "It didn't pass our security checks"),
    ("en", "compliance", "legal and regulatory reasons"),
    ("en", "limit_exceeded", "Reason code: limit_exceeded."),
    ("zh-CN", "compliance", "原因：因合规要求，该笔转账无法完成。"),
    ("zh-CN", "limit_exceeded", "原因代码：limit_exceeded。"),
    ("zh-TW", "customer_request", "原因：依您本人的要求取消。"),
    ("zh-HK", "risk_declined", "這筆轉帳未通過安全檢核"),
])
def test_the_cancellation_notice_gives_the_reason_in_words_on_every_channel(locale, code, words):
    f = facts(locale, reason=code)
    for channel in PARTS:
        r = TEMPLATES.render("cancelled", channel, locale, f)
        assert words in r.body, (channel, r.body)
        if r.html:
            assert words.replace("'", "&#39;") in r.html


def test_a_free_text_reason_is_not_shown_to_the_customer():
    f = facts("en", reason="ops note: <b>call Bob</b>")
    r = TEMPLATES.render("cancelled", "email", "en", f)
    assert "Bob" not in r.body and "Bob" not in r.html and "<b>" not in r.html
    assert "Contact us in the app if you have questions." in r.body


def test_a_locale_missing_a_reason_text_is_refused(tmp_path):
    folder = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", folder)
    (folder / "zh-TW" / "reasons" / "compliance.txt").unlink()
    with pytest.raises(ConfigError) as info:
        Templates(folder)
    assert any("zh-TW/reasons/compliance.txt" in p for p in info.value.problems)


# -- the restart link -----------------------------------------------------------------------------


def test_without_a_restart_url_the_notice_says_how_to_start_again_and_links_nowhere():
    f = facts("en", reason="not_confirmed", restart_url=None)
    email = TEMPLATES.render("cancelled", "email", "en", f)
    assert "Open the app and start a new transfer" in email.body and "Start a new transfer</a>" not in email.html
    assert "To start again, open the app." in TEMPLATES.render("cancelled", "sms", "en", f).body
    assert "Open the app to start again." in TEMPLATES.render("cancelled", "push", "en", f).body
    f = facts("zh-TW", reason="not_confirmed", restart_url="https://app.example.com/new")
    assert "重新申請：https://app.example.com/new" in TEMPLATES.render("cancelled", "sms", "zh-TW", f).body
    assert 'href="https://app.example.com/new"' in TEMPLATES.render("cancelled", "email", "zh-TW", f).html


@pytest.mark.parametrize("restart", [None, "https://app.example.com/transfers/new"])
def test_the_cancellation_notices_carry_the_restart_link_only_when_set(make_harness, restart):
    h = make_harness(restart_url=restart)
    h.remind.register(transaction("tx_r", customer={"locale": "en"}))
    for minutes in (15, 120, 1200, 1440):
        h.at(minutes=minutes).tick()
    notices = {line["channel"]: line for line in h.lines("tx_r") if line["step"] == "cancel"}
    assert set(notices) == {"sms", "email", "push"}
    bodies = [notices["sms"]["body"], notices["email"]["body"], notices["email"]["html"], notices["push"]["body"]]
    assert all("It wasn't confirmed before the deadline." in b.replace("&#39;", "'") for b in bodies)
    assert not any("https://pay.example/\"" in b or b.endswith("https://pay.example/") for b in bodies)
    if restart:
        assert notices["push"]["data"]["restart_url"] == restart and restart in notices["sms"]["body"]
    else:
        assert "restart_url" not in notices["push"].get("data", {})
        assert "https://" not in notices["sms"]["body"]


# -- the confirmation page and the registration response ------------------------------------------


@pytest.fixture
def remind(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'lang.db'}", api_tokens="t")
    return Remind.from_settings(settings, clock=Clock())


def post(client, body):
    return client.post("/v1/transactions", content=json.dumps(body),
                       headers={"Authorization": "Bearer t", "content-type": "application/json"})


@pytest.mark.parametrize("locale, reason, shown, title", [
    ("en", "compliance", "We couldn't complete it for legal and regulatory reasons.", "This transfer was cancelled"),
    ("en", "customer asked support", "Contact us in the app if you have questions.", "This transfer was cancelled"),
    ("zh-HK", "risk_declined", "這筆轉帳未通過安全檢核", "這筆轉帳已取消"),
    ("zh", "not_confirmed", "原因：未在截止时间前确认。", "这笔转账已取消"),
])
def test_an_old_link_of_a_cancelled_transfer_gives_its_reason(remind, locale, reason, shown, title):
    with TestClient(create_app(remind)) as client:
        assert post(client, transaction("tx_p", customer={"locale": locale})).status_code == 201
        remind.cancel("tx_p", reason)
        remind.store.clock.set(T0 + timedelta(hours=1))
        page = client.get("/c/" + make_token("test-secret", "tx_p", T0 + timedelta(hours=24)))
    assert page.status_code == 409 and title in page.text
    assert shown.replace("'", "&#39;") in page.text and "not confirmed in time" not in page.text


def test_the_registration_response_says_when_the_locale_fell_back(remind):
    with TestClient(create_app(remind)) as client:
        fell_back = post(client, transaction("tx_fr", customer={"locale": "fr-FR"}))
        assert fell_back.status_code == 201
        assert fell_back.json()["locale"] == "en" and fell_back.json()["locale_requested"] == "fr-FR"
        hk = post(client, transaction("tx_hk", customer={"locale": "zh-HK"}))
        assert hk.json()["locale"] == "zh-TW" and "locale_requested" not in hk.json()
        again = post(client, transaction("tx_fr", customer={"locale": "fr-FR"}))
        assert again.status_code == 200 and again.json()["locale_requested"] == "fr-FR"
    assert remind.register(transaction("tx_gb", customer={"locale": "en-GB"})).locale == "en"


def test_tx_submit_prints_the_locale_used(tmp_path, monkeypatch):
    for key, value in {"DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "REMIND_OUTBOX": str(tmp_path / "o.jsonl"),
                       "REMIND_SCHEDULES_DIR": str(ROOT / "schedules"),
                       "REMIND_TEMPLATES_DIR": str(ROOT / "templates")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    real = Remind.from_settings.__func__  # the service clock, not today's date: the samples date from T0
    monkeypatch.setattr(Remind, "from_settings",
                        classmethod(lambda cls, *a, **kw: real(cls, *a, **{"clock": Clock(), **kw})))
    body = json.dumps([transaction("tx_a", customer={"locale": "fr-FR"}),
                       transaction("tx_b", customer={"locale": "zh-MO"})])
    result = CliRunner().invoke(main, ["tx", "submit", "-"], input=body)
    assert result.exit_code == 0, result.output
    assert "tx_a: registered (pending, schedule default); messages in en (no templates for fr-FR)" in result.output
    assert "tx_b: registered (pending, schedule default); messages in zh-TW\n" in result.output
    assert not re.search(r"Li Wei|\+86|example\.com", result.output)  # no personal data
