"""pricing.yaml: validation naming each field, Decimal prices, SMS cost by destination calling code and
segments, the missing file, and the hot reload that keeps the last good table."""

from __future__ import annotations

import logging
import os
from decimal import Decimal
from pathlib import Path

import pytest
from support import ROOT, Clock, make_settings

from worker.errors import ConfigError
from worker.pricing import Pricing, calling_code, load_pricing, parse_pricing
from worker.service import Remind

GOOD = """\
currency: EUR
sms:
  default: 0.10
  1: 0.01
  86: 0.04
email: 0.002
push: 0.0005
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_table_is_valid_and_exact():
    pricing = load_pricing(ROOT / "pricing.yaml")
    assert pricing.available and pricing.currency == "USD"
    assert pricing.sms_by_code[86] == Decimal("0.0400") and isinstance(pricing.email, Decimal)
    assert pricing.push == 0 and pricing.sms_default > pricing.sms_by_code[1]


def test_prices_are_decimal_from_the_text_never_through_a_float(tmp_path):
    pricing = load_pricing(write(tmp_path / "p.yaml", GOOD.replace("email: 0.002", "email: 0.1")))
    assert pricing.cost("email") * 3 == Decimal("0.3")  # 0.1 as a float would not sum to 0.3
    assert str(pricing.sms_default) == "0.10"
    quoted = load_pricing(write(tmp_path / "q.yaml", GOOD.replace("86: 0.04", '"+86": "0.0400"')))
    assert quoted.sms_by_code[86] == Decimal("0.0400")


def test_sms_cost_by_calling_code_and_segments(tmp_path):
    pricing = load_pricing(write(tmp_path / "p.yaml", GOOD))
    assert pricing.cost("sms", segments=3, phone="+8613800138000") == Decimal("0.12")
    assert pricing.cost("sms", segments=2, phone="+12127365000") == Decimal("0.02")
    assert pricing.cost("sms", segments=2, phone="+33612345678") == Decimal("0.20")  # default
    assert pricing.cost("sms", phone="+8613800138000") == Decimal("0.04")  # one segment unless told
    assert pricing.cost("sms", segments=2, country_code=86) == Decimal("0.08")
    assert pricing.cost("sms", segments=1, country_code=1, phone="+8613800138000") == Decimal("0.01")
    assert pricing.cost("sms", segments=1, phone="+86*******8000") == Decimal("0.10")  # masked: default
    assert pricing.cost("sms", segments=1) == Decimal("0.10")
    assert pricing.cost("email", segments=5) == Decimal("0.002") and pricing.cost("push") == Decimal("0.0005")
    with pytest.raises(ValueError, match="webhook"):
        pricing.cost("webhook")
    assert (calling_code("+8613800138000"), calling_code("+12127365000"), calling_code(None),
            calling_code("not a phone")) == (86, 1, None, None)


def test_no_table_costs_zero_and_says_it_is_not_available(tmp_path):
    none = load_pricing(tmp_path / "missing.yaml")
    assert none == Pricing.none() and not none.available and none.currency == ""
    assert none.cost("sms", segments=4, phone="+8613800138000") == Decimal(0)


def test_every_problem_names_file_line_and_field(tmp_path):
    path = write(tmp_path / "pricing.yaml", """\
currency: usd
sms:
  86: -0.04
  999: 0.01
  1: cheap
  44: 12
email: true
colour: blue
""")
    with pytest.raises(ConfigError) as caught:
        load_pricing(path)
    problems = caught.value.problems
    expected = [
        (1, "currency", "ISO 4217"),
        (2, "sms.default", "required"),
        (3, "sms.86", "negative"),
        (4, "sms.999", "not a country calling code"),
        (5, "sms.1", "not a price"),
        (6, "sms.44", "above 10"),
        (7, "email", "a price"),
        (8, "colour", "unknown key"),
        (None, "push", "required"),
    ]
    assert len(problems) == len(expected), problems
    for line, field, words in expected:
        where = f"{path}:{line}: {field}: " if line else f"{path}"
        assert any(p.startswith(where) and f" {field}: " in p and words in p for p in problems), (field, problems)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_pricing(path, "currency: [")
    with pytest.raises(ConfigError, match="a mapping with currency"):
        parse_pricing(path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"sms: a mapping of prices"):
        parse_pricing(path, "currency: USD\nsms: 0.05\nemail: 0\npush: 0\n")


def _remind(tmp_path: Path, pricing_file: Path) -> Remind:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'remind.db'}", pricing_file=pricing_file)
    return Remind.from_settings(settings, clock=Clock())


def _touch(path: Path, text: str) -> None:
    """Rewrite and move the mtime on, so a rewrite within one mtime tick is seen as a change too."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_hot_reload_keeps_the_last_good_table(tmp_path, caplog):
    path = write(tmp_path / "pricing.yaml", GOOD)
    remind = _remind(tmp_path, path)
    assert remind.pricing.cost("sms", country_code=86) == Decimal("0.04")
    assert remind.reload_if_changed() is None

    _touch(path, GOOD.replace("86: 0.04", "86: lots"))
    with caplog.at_level(logging.ERROR, logger="remind"):
        assert remind.reload_if_changed() is False
    assert "sms.86" in remind.config_state["error"] and "sms.86" in caplog.text
    assert remind.pricing.cost("sms", country_code=86) == Decimal("0.04")  # the last good one

    _touch(path, GOOD.replace("86: 0.04", "86: 0.05"))
    assert remind.reload_if_changed() is True
    assert remind.pricing.cost("sms", country_code=86) == Decimal("0.05") and remind.config_state["ok"]

    path.unlink()
    with caplog.at_level(logging.INFO, logger="remind"):
        assert remind.reload_if_changed() is True
        assert not remind.pricing.available and not remind.pricing.available
    assert caplog.text.count("no price table") == 1


def test_a_missing_file_is_said_once_and_an_invalid_one_stops_the_start(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="remind"):
        remind = _remind(tmp_path, tmp_path / "nowhere.yaml")
        assert "no price table" not in caplog.text  # said by the first report that asks, not by every process
        remind.reload()
        assert not remind.pricing.available
        remind.reload()
        assert not remind.pricing.available
    assert caplog.text.count("no price table at") == 1
    with pytest.raises(ConfigError, match="currency"):
        _remind(tmp_path, write(tmp_path / "bad.yaml", GOOD.replace("currency: EUR", "currency: euro")))
