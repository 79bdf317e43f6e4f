"""Validate a transaction as the platform sends it, into one canonical form.

Money is Decimal end to end: a JSON number must reach us already parsed exactly
(``json.loads(..., parse_float=Decimal)``); a Python float is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any
from zoneinfo import available_timezones

import phonenumbers
from babel.numbers import get_currency_precision, list_currencies
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InvalidInput

_ID = r"^[A-Za-z0-9_.:\-]{1,64}$"
_BCP47 = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")
_CURRENCIES = frozenset(list_currencies())
_ZONES = frozenset(available_timezones()) - {"localtime", "posixrules", "Factory"}


#: Characters a one-line field (a name, an id, a payment method) may not hold: C0/C1 controls (a
#: newline or a NUL would break an SMS, a log line or a PostgreSQL text column), the Unicode line
#: separators, and the bidi overrides that can make a name reorder the message it is shown in.
_NOT_IN_A_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: A lone UTF-16 surrogate: a Python str can hold one (JSON "\\ud800" parses to it) but UTF-8 cannot,
#: so it could be stored and then never be read back out as JSON.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Deeper than this is no metadata a platform means to send, and deep enough to exhaust a recursion.
_MAX_DEPTH = 32


def _one_line(value: str) -> str:
    found = _NOT_IN_A_LINE.search(value)
    if found:
        raise ValueError(f"contains a control character (U+{ord(found.group()):04X} at position {found.start()})")
    return value


#: A single-line text field.
Line = Annotated[str, AfterValidator(_one_line)]


def _text_problems(payload: Any) -> dict[str, str]:
    """Every string anywhere in ``payload`` (keys too) that cannot be stored and read back: a lone
    surrogate or a NUL. Iterative, so any depth costs no recursion; named by the field's dotted path."""
    problems: dict[str, str] = {}
    stack: list[tuple[str, Any, int]] = [("", payload, 0)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, str):
            why = _bad_text(value)
            if why:
                problems[path or "(body)"] = why
        elif isinstance(value, Mapping | list | tuple):
            if depth > _MAX_DEPTH:
                problems[path or "(body)"] = f"nested more than {_MAX_DEPTH} levels deep"
                continue
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                bad_key = _bad_text(key) if isinstance(key, str) else None
                name = repr(key)[1:-1] if bad_key else str(key)  # escaped: the name itself is not UTF-8
                child = f"{path}.{name}" if path else name
                if bad_key:
                    problems[child] = f"the key {bad_key}"
                else:
                    stack.append((child, item, depth + 1))
    return problems


def _bad_text(value: str) -> str | None:
    found = _SURROGATE.search(value)
    if found:
        return (f"contains invalid Unicode (a lone surrogate U+{ord(found.group()):04X} at position "
                f"{found.start()}); send UTF-8 text")
    if "\x00" in value:
        return f"contains a NUL character (at position {value.index(chr(0))})"
    return None


def _json_metadata(value: Any, path: str = "metadata") -> dict[str, str]:
    """Metadata is kept as JSON: only JSON values (string keys, finite numbers) are accepted."""
    problems: dict[str, str] = {}
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    problems[where] = "keys must be strings"
                    continue
                stack.append((f"{where}.{key}", inner))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}.{i}", inner) for i, inner in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            problems[where] = "a finite number (not NaN or Infinity)"
        elif isinstance(item, Decimal) and not item.is_finite():
            problems[where] = "a finite number (not NaN or Infinity)"
        elif not isinstance(item, str | int | float | Decimal | bool | type(None)):
            problems[where] = f"a JSON value (string, number, boolean, null, list or object), not {type(item).__name__}"
    return problems


def _exact_decimal(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError("send money as a decimal string (e.g. \"12.50\") or an exact JSON number, not a float")
    if isinstance(value, bool):
        raise ValueError("a decimal amount, not a boolean")
    return value


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Line = Field(min_length=1, max_length=128)
    name: Line = Field(min_length=1, max_length=200)
    phone: str | None = None
    email: str | None = Field(None, max_length=254)
    push_tokens: tuple[Line, ...] = ()
    locale: str = "en"
    timezone: str = "UTC"
    segment: Line | None = Field(None, max_length=32)

    @field_validator("phone")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            number = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException:
            raise ValueError("an E.164 number such as +8613800138000") from None
        e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        if e164 != value or not phonenumbers.is_valid_number(number):
            raise ValueError("not a valid E.164 number (+, country code, number, no spaces)")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        """Syntax only (no DNS lookup at registration); the address is kept as the platform sent it."""
        if value is None:
            return None
        try:
            validate_email(value, check_deliverability=False)
        except EmailNotValidError as exc:
            raise ValueError(f"not an email address: {exc}") from None
        return value

    @field_validator("push_tokens")
    @classmethod
    def _tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not t or len(t) > 4096 for t in value):
            raise ValueError("each push token is a non-empty string of at most 4096 characters")
        if len(value) > 20:
            raise ValueError("at most 20 push tokens")
        return value

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str) -> str:
        if not _BCP47.match(value):
            raise ValueError("a BCP 47 language tag such as en or zh-CN")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value not in _ZONES:  # not "localtime" or "posixrules": names every host knows the same way
            raise ValueError("an IANA time zone such as Asia/Shanghai")
        return value

    @model_validator(mode="after")
    def _reachable(self) -> Customer:
        if not (self.phone or self.email or self.push_tokens):
            raise ValueError("at least one of phone, email or push_tokens is required")
        return self


class Transaction(BaseModel):
    """A pending transaction, validated; times are UTC, money exact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID)
    customer: Customer
    amount: Decimal
    currency: str
    fee: Decimal = Decimal("0")
    payment_method: Line = Field(min_length=1, max_length=200)
    expected_arrival: AwareDatetime
    created_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    risk_flag: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)

    _money = field_validator("amount", "fee", mode="before")(classmethod(lambda cls, v: _exact_decimal(v)))

    @field_validator("expected_arrival", "created_at", "expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if not 2000 <= value.year <= 2100:
            raise ValueError("a date between the years 2000 and 2100")
        return value.astimezone(UTC)

    @field_validator("currency")
    @classmethod
    def _iso4217(cls, value: str) -> str:
        if value not in _CURRENCIES:
            raise ValueError("an ISO 4217 currency code such as CNY, USD or EUR")
        return value

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = _json_metadata(value)
        if problems:
            raise ValueError(json.dumps({k.removeprefix("metadata."): v for k, v in problems.items()}))
        if len(json.dumps(value, default=str)) > 8192:
            raise ValueError("at most 8 KiB of metadata")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Transaction:
        places = get_currency_precision(self.currency)
        problems = {}
        for name in ("amount", "fee"):
            value: Decimal = getattr(self, name)
            if not value.is_finite():
                problems[name] = "a finite number"
            elif value != 0 and value.adjusted() >= 15:
                problems[name] = "at most 15 digits before the decimal point"
            elif value.as_tuple().exponent < -places and value != value.quantize(Decimal(1).scaleb(-places)):
                problems[name] = f"{self.currency} has {places} minor digits; {value} has more"
        if self.amount <= 0 and "amount" not in problems:
            problems["amount"] = "must be above zero"
        if self.fee < 0 and "fee" not in problems:
            problems["fee"] = "cannot be negative"
        if self.expires_at and self.created_at and self.expires_at <= self.created_at:
            problems["expires_at"] = "must be after created_at"
        if problems:
            raise ValueError(json.dumps(problems))
        return self

    @property
    def total(self) -> Decimal:
        return self.amount + self.fee

    def canonical(self) -> dict[str, Any]:
        """The stored form: money quantized to the currency, times in UTC ISO 8601."""
        places = Decimal(1).scaleb(-get_currency_precision(self.currency))
        data = self.model_dump(mode="json")
        data["amount"] = str(self.amount.quantize(places))
        data["fee"] = str(self.fee.quantize(places))
        data["customer"]["push_tokens"] = list(self.customer.push_tokens)
        return data


def parse_transaction(payload: Mapping[str, Any] | Transaction, *, now: datetime | None = None,
                      refuse_past: bool = True) -> Transaction:
    """Validate a payload; raise InvalidInput naming every bad field. ``created_at`` defaults to now.

    ``refuse_past``: an ``expires_at`` at or before a defaulted ``created_at`` is refused here; register
    passes False and checks the deadline itself, after it knows whether this is a repeat."""
    if isinstance(payload, Transaction):
        tx = payload
    else:
        if not isinstance(payload, Mapping):
            raise InvalidInput({"(body)": "a JSON object describing one transaction"})
        problems = _text_problems(payload)  # before anything else reads a string of it
        if problems:
            raise InvalidInput(problems)
        try:
            tx = Transaction.model_validate(dict(payload))
        except ValidationError as exc:
            raise InvalidInput(_problems(exc)) from None
    if tx.created_at is None:
        created = (now or datetime.now(UTC)).astimezone(UTC)
        if refuse_past and tx.expires_at and tx.expires_at <= created:
            raise InvalidInput({"expires_at": "is already in the past"})
        tx = tx.model_copy(update={"created_at": created})
    return tx


def _problems(exc: ValidationError) -> dict[str, str]:
    problems: dict[str, str] = {}
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "value_error" and msg.startswith("{"):
            try:
                for name, text in json.loads(msg).items():
                    problems[f"{field}.{name}" if field != "(body)" else name] = text
                continue
            except ValueError:
                pass
        problems[field] = msg
    return problems


def differing_fields(stored: dict[str, Any], incoming: dict[str, Any], *, ignore_created_at: bool) -> list[str]:
    """Dotted names of the fields whose values differ between two canonical transactions."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            out.append(path)

    walk(stored, incoming, "")
    return [f for f in out if not (ignore_created_at and f == "created_at")]
