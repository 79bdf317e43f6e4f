"""Templates to messages: a sandboxed, strict Jinja2 environment and locale-aware formatting (Babel).

Knows nothing of channels' SDKs: it turns (template, channel, locale, facts) into text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.core import get_global, negotiate_locale, parse_locale
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


#: The folder of cancellation reasons in words, one ``<code>.txt`` per reason code and ``_generic.txt``.
REASONS = "reasons"
GENERIC_REASON = "_generic"
#: What a reason code may look like to be shown to a customer (in the generic text); anything else, such as
#: an operator's free-text note, is not shown.
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,31}")  # short enough for a push body


def _sample_facts() -> dict[str, Any]:
    return {
        "customer_name": "Li Wei", "transaction_id": "tx_sample", "amount": "CN¥1,000.00", "fee": "CN¥12.50",
        "total": "CN¥1,012.50", "payment_method": "Bank card ending 1234", "arrival": "Nov 26, 2026, 10:00 AM",
        "arrival_relative": "in 1 day", "deadline": "Nov 26, 2026, 5:00 PM", "deadline_relative": "in 8 hours",
        "timezone": "China Standard Time", "confirm_url": "https://example.invalid/c/token",
        "restart_url": "https://example.invalid/", "reason": "not_confirmed",
        "reason_text": "It was not confirmed before the deadline.", "step": "reminder",
    }


@lru_cache(maxsize=1024)
def _language_script(tag: str) -> tuple[str, str | None, str | None] | None:
    """(language, script, territory) of a tag as written, the script filled in from CLDR's likely subtags
    when it is not (``zh-HK`` -> Hant, ``zh``/``zh-SG`` -> Hans, ``en-GB`` -> Latn; ``zh-Hant-CN`` keeps
    Hant); None for a tag that is not a language tag Babel can read."""
    try:
        language, territory, script, _ = parse_locale(tag.strip().replace("-", "_"))[:4]
    except (ValueError, TypeError):
        return None
    language = language.lower()
    if script is None:
        likely = get_global("likely_subtags")
        for key in (f"{language}_{territory}" if territory else None, language):
            if key and key in likely:
                script = parse_locale(likely[key])[2]
                break
    return language, script, territory


@lru_cache(maxsize=1024)
def negotiate_tag(tag: str, available: tuple[str, ...]) -> str | None:
    """The one of ``available`` that speaks ``tag``'s language in its script, or None.

    Exact tags first (any case, ``_`` or ``-``); then the same language and script by CLDR's likelihood
    data, preferring the same territory (``zh-HK`` -> ``zh-TW``, ``zh-SG`` -> ``zh-CN``, ``en-GB`` -> ``en``);
    then Babel's ``negotiate_locale`` (aliases, the bare language); then the same language in another
    script rather than another language."""
    tag = (tag or "").strip()
    if not tag:
        return None
    wanted = tag.replace("_", "-").lower()
    for candidate in available:
        if candidate.lower() == wanted:
            return candidate
    asked = _language_script(tag)
    if asked is None:
        return None
    language, script, territory = asked
    same_language = []
    for candidate in available:
        known = _language_script(candidate)
        if known is None or known[0] != language:
            continue
        rank = 0 if known[2] == territory else 1 if known[2] is None else 2
        same_language.append((known[1] != script, rank, candidate))
    for different_script, _, candidate in sorted(same_language):
        if not different_script:
            return candidate
    found = negotiate_locale([tag.replace("_", "-")], list(available), sep="-")
    if found:
        return found
    return sorted(same_language)[0][2] if same_language else None


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
        reasons = self._check_reasons()
        if reasons:
            raise ConfigError(reasons)
        #: The reason codes with their own text, per locale (the rest get the generic text).
        self.reason_codes: dict[str, frozenset[str]] = {
            loc: frozenset(p.stem for p in (self.directory / loc / REASONS).glob("*.txt") if p.stem != GENERIC_REASON)
            for loc in self.locales}

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

    def negotiate(self, tag: str | None) -> str:
        """The template locale for a customer's language tag (see ``negotiate_tag``); ``en`` when none speaks it.
        The one place a tag becomes a template locale: texts, dates and money all follow it."""
        return negotiate_tag(tag or "", tuple(self.locales)) or FALLBACK_LOCALE

    def speaks(self, tag: str | None) -> bool:
        """Whether some template locale speaks ``tag``'s language (else messages fall back to ``en``)."""
        return negotiate_tag(tag or "", tuple(self.locales)) is not None

    resolve_locale = negotiate  # the former name

    def reason_text(self, code: str | None, locale: str) -> str:
        """A cancellation reason in words, in template locale ``locale``: ``reasons/<code>.txt``, else
        ``reasons/_generic.txt`` (which gets the code as ``code`` when it looks like one, else "")."""
        code = (code or "").strip()
        shown = code if _CODE.fullmatch(code) else ""
        loc = locale if locale in self.locales else self.negotiate(locale)
        for folder in dict.fromkeys((loc, FALLBACK_LOCALE)):
            own = code in self.reason_codes.get(folder, ())
            try:
                return self.env.get_template(f"{folder}/{REASONS}/{code if own else GENERIC_REASON}.txt").render(
                    code=shown).strip()
            except TemplateNotFound:
                continue
        return shown

    def _check_reasons(self) -> list[str]:
        """Every locale has ``reasons/_generic.txt`` and a text for every code any locale has."""
        codes = {p.stem for loc in self.locales for p in (self.directory / loc / REASONS).glob("*.txt")}
        codes.add(GENERIC_REASON)
        problems = []
        for locale in self.locales:
            for code in sorted(codes):
                path = self.directory / locale / REASONS / f"{code}.txt"
                if not path.is_file():
                    problems.append(f"{path}: missing: every locale needs a text for reason {code!r}")
                    continue
                try:
                    self.env.get_template(f"{locale}/{REASONS}/{code}.txt").render(code="platform_code")
                except TemplateError as exc:
                    problems.append(f"{path}: does not render with the variable code: {exc.message or exc}")
        return problems

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
                for restart_url in ("https://example.invalid/", ""):  # REMIND_RESTART_URL set, and not
                    try:
                        self.env.get_template(name).render({**_sample_facts(), "restart_url": restart_url})
                    except TemplateError as exc:
                        problems.append(f"{self.directory / name}: does not render with the standard "
                                        f"variables: {exc.message or exc}")
                        break
        return problems

    def render(self, template: str, channel: str, locale: str, facts: dict[str, Any]) -> Rendered:
        loc = self.negotiate(locale)

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


def _babel(tag: str) -> Locale | None:
    try:
        return Locale.parse(tag.strip().replace("_", "-"), sep="-")
    except (UnknownLocaleError, ValueError, TypeError):
        return None


@lru_cache(maxsize=256)
def babel_locale(tag: str) -> Locale:
    return _babel(tag) or Locale.parse(FALLBACK_LOCALE)


@lru_cache(maxsize=1024)
def format_locale(tag: str, template_locale: str) -> Locale:
    """The Babel locale dates and money are written in: the template's language and script, so they read
    in the language of the text around them. The customer's own tag refines it when it is that same
    language and script and Babel knows it (``en-GB`` text ``en``: 26 Nov 2026, 17:00; ``zh-HK`` text
    ``zh-TW``: Traditional); any other tag (``fr-FR`` with ``en`` text) formats as the template locale."""
    text = _language_script(template_locale)
    own = _language_script(tag) if tag else None
    if own is not None and text is not None and own[:2] == text[:2]:
        exact = _babel(tag)
        if exact is not None and (exact.language, exact.script or own[1]) == text[:2]:
            return exact
    return babel_locale(template_locale)


def facts_for(
    content: dict[str, Any],
    *,
    templates: Templates,
    now: datetime,
    deadline: datetime,
    confirm_url: str,
    restart_url: str | None,
    step: str,
    reason: str = "",
    locale: str | None = None,
) -> dict[str, Any]:
    """The variables every template gets, formatted in the language of the text and the customer's zone.

    ``locale``: the template locale the text is in; by default the one ``templates`` negotiates for the
    customer's tag. ``restart_url`` "" or None: the platform has no page to start again (templates say
    so in words)."""
    customer = content["customer"]
    tag = customer.get("locale") or FALLBACK_LOCALE
    text_locale = locale or templates.negotiate(tag)
    loc = format_locale(tag, text_locale)
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
        "restart_url": restart_url or "",
        "reason": reason,
        "reason_text": templates.reason_text(reason, text_locale),
        "step": step,
    }
