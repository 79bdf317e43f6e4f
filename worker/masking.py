"""Masks for anything that identifies a customer or grants access: logs and timelines show only these."""

from __future__ import annotations

import re


def mask_phone(phone: str) -> str:
    """+8613800138000 -> +86*******8000"""
    if len(phone) <= 6:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]


def mask_email(email: str) -> str:
    """li.wei@example.com -> l***@e***.com"""
    local, _, domain = email.partition("@")
    host, _, tld = domain.rpartition(".")
    return f"{local[:1]}***@{host[:1]}***.{tld}" if host else f"{local[:1]}***@***"


def mask_token(token: str) -> str:
    """A push token or secret: the first four characters and the length."""
    return f"{token[:4]}…({len(token)} chars)"


def mask_recipient(channel: str, recipient: str) -> str:
    if channel == "sms":
        return mask_phone(recipient)
    if channel == "email":
        return mask_email(recipient)
    if channel == "webhook":
        return recipient.split("?")[0]
    return mask_token(recipient)


_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE_RE = re.compile(r"\+\d{8,15}")


def mask_text(text: str) -> str:
    """Mask every email address and E.164 number inside free text, such as a provider's error."""
    text = _EMAIL_RE.sub(lambda m: mask_email(m.group(0)), text)
    return _PHONE_RE.sub(lambda m: mask_phone(m.group(0)), text)
