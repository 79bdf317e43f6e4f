"""Which channels can reach a customer now, and what to use instead when one cannot.

Pure: given the customer's contact details and the suppressed addresses, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CONTACT_FIELD = {"sms": "phone", "email": "email", "push": "push_tokens"}
NO_CONTACT = {"sms": "no phone number on file", "email": "no email address on file",
              "push": "no push token on file"}
OPTED_OUT = {"sms": "the customer opted out of SMS",
             "email": "the customer unsubscribed from email, or the address bounced",
             "push": "every push token was reported unregistered"}


def addresses(customer: dict[str, Any], channel: str) -> list[str]:
    value = customer.get(CONTACT_FIELD[channel])
    if not value:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def all_pairs(customer: dict[str, Any]) -> list[tuple[str, str]]:
    return [(channel, a) for channel in CONTACT_FIELD for a in addresses(customer, channel)]


def usable(customer: dict[str, Any], channel: str, suppressed: set[tuple[str, str]]) -> tuple[list[str], str]:
    """The addresses still usable on ``channel``, or ([], why not)."""
    found = addresses(customer, channel)
    if not found:
        return [], NO_CONTACT[channel]
    left = [a for a in found if (channel, a) not in suppressed]
    return (left, "") if left else ([], OPTED_OUT[channel])


@dataclass(frozen=True)
class Choice:
    channel: str
    send: bool
    reason: str | None


def choose(channels: Sequence[str], fallback: Iterable[str], customer: dict[str, Any],
           suppressed: set[tuple[str, str]], taken: Iterable[str] = ()) -> list[Choice]:
    """The step's channels; each unusable one is recorded with its reason and replaced by the first
    usable fallback channel not already used by this step."""
    used = set(channels) | set(taken)
    spare = [c for c in fallback if c not in used]
    out: list[Choice] = []
    for channel in channels:
        ok, why = usable(customer, channel, suppressed)
        if ok:
            out.append(Choice(channel, True, None))
            continue
        out.append(Choice(channel, False, why))
        while spare:
            alt = spare.pop(0)
            if usable(customer, alt, suppressed)[0]:
                out.append(Choice(alt, True, f"instead of {channel}: {why}"))
                break
    return out
