"""What a message costs: ``pricing.yaml`` (``REMIND_PRICING_FILE``), read and validated like the schedules.

    currency: USD
    sms:              # per segment, by the destination's country calling code
      default: 0.0500
      1: 0.0083
      86: 0.0400
    email: 0.00090    # per message
    push: 0           # per message

Money is Decimal throughout: YAML numbers are read from their text, never through a float. A file that is
not there means "no price table" (``Pricing.none()``: ``available`` is False, ``cost()`` is 0 and reports
show a null cost); an invalid one raises ConfigError naming file, line and field, and a running service
keeps the last good table (see ``Remind.reload``). See docs/schedules.md for the shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import phonenumbers
import yaml

from .errors import ConfigError
from .ladder.loader import _Doc

CHANNELS = ("sms", "email", "push")
_TOP_KEYS = {"currency", "sms", "email", "push", "description", "as_of"}
_CURRENCY = re.compile(r"[A-Z]{3}")
_CODE = re.compile(r"\+?([0-9]{1,3})")
#: More than this per message or segment is surely a typo (a price in cents, a misplaced point).
MAX_PRICE = Decimal(10)


def calling_code(phone: str | None) -> int | None:
    """The country calling code of an E.164 number (``+8613800138000`` -> 86), or None when there is none.
    A masked number (``+86*******8000``, what an erased transaction keeps) has none: its prefix may be cut
    short (+886 masks to +88...)."""
    if not phone or "*" in phone:
        return None
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return None
    return number.country_code if number.country_code and phonenumbers.is_possible_number(number) else None


@dataclass(frozen=True)
class Pricing:
    """A price table in one currency. ``cost()`` answers for one message (an SMS: all its segments)."""

    currency: str
    sms_default: Decimal = Decimal(0)
    #: Price per SMS segment by destination country calling code; others pay ``sms_default``.
    sms_by_code: Mapping[int, Decimal] = field(default_factory=dict, hash=False)
    email: Decimal = Decimal(0)
    push: Decimal = Decimal(0)
    #: Where it was read from (None for ``Pricing.none()``).
    source: str | None = None
    #: False for ``Pricing.none()``: there is no price table, so reports show a null cost, not 0.
    available: bool = True

    @classmethod
    def none(cls) -> Pricing:
        """No price table (no pricing.yaml): ``cost()`` is Decimal(0) and ``available`` is False."""
        return cls(currency="", available=False)

    def sms_price(self, *, phone: str | None = None, country_code: int | None = None) -> Decimal:
        """The price of one SMS segment to ``country_code`` (else the calling code of ``phone``)."""
        code = country_code if country_code is not None else calling_code(phone)
        return self.sms_by_code.get(code, self.sms_default) if code is not None else self.sms_default

    def cost(self, channel: str, *, segments: int = 1, phone: str | None = None,
             country_code: int | None = None) -> Decimal:
        """One message on ``channel``: an SMS costs ``segments`` × the price for its destination's calling
        code (``country_code``, else read from ``phone``; unknown: the ``default``); an email or a push
        costs its per-message price. Decimal(0) without a price table (check ``available``)."""
        if channel not in CHANNELS:
            raise ValueError(f"no price for channel {channel!r}; priced: {', '.join(CHANNELS)}")
        if segments < 0:
            raise ValueError("segments cannot be negative")
        if channel == "sms":
            return self.sms_price(phone=phone, country_code=country_code) * segments
        return self.email if channel == "email" else self.push

    def as_json(self) -> dict[str, Any]:
        """The table as JSON values (prices as decimal strings), or None-like for no table."""
        if not self.available:
            return {"available": False, "currency": None}
        return {"available": True, "currency": self.currency, "source": self.source,
                "sms": {"default": str(self.sms_default), **{str(k): str(v) for k, v in sorted(
                    self.sms_by_code.items())}},
                "email": str(self.email), "push": str(self.push)}


class _DecimalLoader(yaml.SafeLoader):
    """YAML numbers as Decimal from their text, so 0.0079 is exactly 0.0079."""


def _decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal | str:
    text = loader.construct_scalar(node).replace("_", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        return text  # .inf, .nan: refused by _price


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _decimal)


def _price(doc: _Doc, path: tuple[Any, ...], value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        doc.error(path, "a price: a decimal number such as 0.0079 (0 for free)")
        return None
    try:
        price = Decimal(str(value).strip()) if isinstance(value, int | str | Decimal) else None
    except InvalidOperation:
        price = None
    if price is None or not price.is_finite():
        doc.error(path, f"{value!r} is not a price: a decimal number such as 0.0079 (0 for free)")
        return None
    if price < 0:
        doc.error(path, f"{value} is negative")
        return None
    if price > MAX_PRICE:
        doc.error(path, f"{value} per message is above {MAX_PRICE}: is it in cents, or the point misplaced?")
        return None
    return price


def _sms(doc: _Doc, raw: Any) -> tuple[Decimal | None, dict[int, Decimal]]:
    if not isinstance(raw, dict):
        doc.error(("sms",), "a mapping of prices per segment: default, and country calling codes such as 86 or 1")
        return None, {}
    default = None
    by_code: dict[int, Decimal] = {}
    if "default" not in raw:
        doc.error(("sms", "default"), "required: the price per segment to any country not listed")
    for key, value in raw.items():
        if key == "default":
            default = _price(doc, ("sms", "default"), value)
            continue
        match = _CODE.fullmatch(str(key)) if isinstance(key, int | str) and not isinstance(key, bool) else None
        code = int(match.group(1)) if match else None
        if code is None or code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            doc.error(("sms", str(key)), "not a country calling code (e.g. 1, 44, 86) nor default")
            continue
        if code in by_code:
            doc.error(("sms", str(key)), f"calling code {code} is listed twice")
            continue
        price = _price(doc, ("sms", str(key)), value)
        if price is not None:
            by_code[code] = price
    return default, by_code


def parse_pricing(path: Path, text: str) -> Pricing:
    """Validate the text of a price table; ConfigError lists every problem with file, line and field."""
    doc = _Doc(path, text)
    try:
        raw = yaml.load(text, Loader=_DecimalLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:  # pragma: no cover - _Doc parsed it already
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: (file): a mapping with currency, sms, email and push"])
    for key in raw:
        if key not in _TOP_KEYS:
            doc.error((str(key),), f"unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    currency = raw.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        doc.error(("currency",), "required: the ISO 4217 code the prices are in, such as USD")
    default, by_code = _sms(doc, raw.get("sms"))
    prices: dict[str, Decimal | None] = {}
    for channel in ("email", "push"):
        if channel not in raw:
            doc.error((channel,), f"required: the price per {channel} message (0 for free)")
        else:
            prices[channel] = _price(doc, (channel,), raw[channel])
    if doc.problems:
        raise ConfigError(doc.problems)
    return Pricing(currency=str(currency), sms_default=default or Decimal(0), sms_by_code=by_code,
                   email=prices["email"] or Decimal(0), push=prices["push"] or Decimal(0), source=str(path))


def load_pricing(path: Path) -> Pricing:
    """The price table in ``path``; ``Pricing.none()`` when there is no such file. Raises ConfigError
    (each problem naming file, line and field) when it is invalid or cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Pricing.none()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror}"]) from None
    return parse_pricing(path, text)


def file_signature(path: Path) -> tuple[str, int, int] | None:
    """What changes when the file is edited, created or removed (for the hot reload)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return (str(path), stat.st_mtime_ns, stat.st_size)
