"""Templates to messages: a sandboxed, strict Jinja2 environment and locale-aware formatting (Babel).

Knows nothing of channels' SDKs: it turns (template, channel, locale, facts) into text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time, format_timedelta, get_datetime_format, get_timezone_name
from babel.numbers import format_currency
from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from .errors import ConfigError

FALLBACK_LOCALE = "en"

#: The files a template folder needs for each channel.
PARTS: dict[str, tuple[str, ...]] = {
    "sms": ("sms.txt",),
    "email": ("email_subject.txt", "email.html", "email.txt"),
    "push": ("push_title.txt", "push_body.txt"),
}


@dataclass(frozen=True)
class Rendered:
    subject: str | None  # email subject, push title
    body: str  # SMS text, email plain text, push body
    html: str | None = None  # email only


def _sample_facts() -> dict[str, Any]:
    return {
        "customer_name": "Li Wei", "transaction_id": "tx_sample", "amount": "CN¥1,000.00", "fee": "CN¥12.50",
        "total": "CN¥1,012.50", "payment_method": "Bank card ending 1234", "arrival": "Nov 26, 2026, 10:00 AM",
        "arrival_relative": "in 1 day", "deadline": "Nov 26, 2026, 5:00 PM", "deadline_relative": "in 8 hours",
        "timezone": "China Standard Time", "confirm_url": "https://example.invalid/c/token",
        "restart_url": "https://example.invalid/", "reason": "not_confirmed", "step": "reminder",
    }


class Templates:
    """The templates folder: ``<locale>/<template>/<part>``; a missing locale falls back to ``en``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError([f"{self.directory}: the templates folder does not exist"])
        self.locales = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if FALLBACK_LOCALE not in self.locales:
            raise ConfigError([f"{self.directory}: needs an {FALLBACK_LOCALE}/ folder, the fallback locale"])
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(self.directory)),
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,  # hot reload builds a new Templates; no stat() of the file on every render
        )
        self._compile_all()

    def _compile_all(self) -> None:
        """Compile every file now, so a syntax error stops a (re)load instead of a send."""
        problems = []
        for path in sorted(self.directory.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                name = path.relative_to(self.directory).as_posix()
                try:
                    self.env.get_template(name)
                except TemplateError as exc:
                    line = getattr(exc, "lineno", None)
                    problems.append(f"{path}{f':{line}' if line else ''}: {exc.message or exc}")
        if problems:
            raise ConfigError(problems)

    def resolve_locale(self, locale: str) -> str:
        """The template locale to use: exact tag, else its language, else ``en``."""
        if locale in self.locales:
            return locale
        lang = locale.split("-")[0].lower()
        for candidate in self.locales:
            if candidate.lower() == locale.lower() or candidate.lower() == lang:
                return candidate
        return FALLBACK_LOCALE

    def missing(self, template: str, channel: str) -> list[str]:
        """Problems that would stop ``template`` from rendering on ``channel`` in some locale."""
        problems = []
        for locale in self.locales:
            for part in PARTS[channel]:
                name = f"{locale}/{template}/{part}"
                if not (self.directory / name).is_file():
                    problems.append(f"template {template!r} has no {part} for locale {locale} "
                                    f"(needed by channel {channel}; expected {self.directory / name})")
                    continue
                try:
                    self.env.get_template(name).render(_sample_facts())
                except TemplateError as exc:
                    problems.append(f"{self.directory / name}: does not render with the standard "
                                    f"variables: {exc.message or exc}")
        return problems

    def render(self, template: str, channel: str, locale: str, facts: dict[str, Any]) -> Rendered:
        loc = self.resolve_locale(locale)

        def part(name: str) -> str:
            try:
                return self.env.get_template(f"{loc}/{template}/{name}").render(facts).strip()
            except TemplateNotFound:
                return self.env.get_template(f"{FALLBACK_LOCALE}/{template}/{name}").render(facts).strip()

        if channel == "sms":
            return Rendered(subject=None, body=part("sms.txt"))
        if channel == "email":
            return Rendered(subject=part("email_subject.txt"), body=part("email.txt"), html=part("email.html"))
        if channel == "push":
            return Rendered(subject=part("push_title.txt"), body=part("push_body.txt"))
        raise ValueError(f"no templates for channel {channel!r}")


def _plain_spaces(text: str) -> str:
    """CLDR uses narrow no-break spaces; in an SMS one would force UCS-2 and halve the segment."""
    return text.replace("\u202f", " ").replace("\u00a0", " ")


@lru_cache(maxsize=256)
def babel_locale(tag: str) -> Locale:
    try:
        return Locale.parse(tag, sep="-")
    except (UnknownLocaleError, ValueError):
        return Locale.parse(FALLBACK_LOCALE)


def facts_for(
    content: dict[str, Any],
    *,
    now: datetime,
    deadline: datetime,
    confirm_url: str,
    restart_url: str,
    step: str,
    reason: str = "",
) -> dict[str, Any]:
    """The variables every template gets, formatted in the customer's locale and time zone."""
    customer = content["customer"]
    loc = babel_locale(customer.get("locale") or FALLBACK_LOCALE)
    zone = ZoneInfo(customer.get("timezone") or "UTC")
    currency = content["currency"]
    amount, fee = Decimal(content["amount"]), Decimal(content["fee"])
    arrival = datetime.fromisoformat(content["expected_arrival"])

    def money(value: Decimal) -> str:
        return _plain_spaces(format_currency(value, currency, locale=loc))

    def when(value: datetime) -> str:
        local = value.astimezone(zone)
        text = (get_datetime_format("medium", locale=loc)
                .replace("{1}", format_date(local, "medium", locale=loc))
                .replace("{0}", format_time(local, "short", tzinfo=zone, locale=loc)))
        return _plain_spaces(text)

    def relative(value: datetime) -> str:
        return format_timedelta(value - now, add_direction=True, granularity="minute", threshold=1.1, locale=loc)

    return {
        "customer_name": customer["name"],
        "transaction_id": content["id"],
        "amount": money(amount),
        "fee": money(fee),
        "total": money(amount + fee),
        "payment_method": content["payment_method"],
        "arrival": when(arrival),
        "arrival_relative": relative(arrival),
        "deadline": when(deadline),
        "deadline_relative": relative(deadline),
        "timezone": get_timezone_name(zone, locale=loc),
        "confirm_url": confirm_url,
        "restart_url": restart_url,
        "reason": reason,
        "step": step,
    }
