"""How an SMS text is carried: GSM-7 or UCS-2, and how many segments (billed messages) it takes.

The one place that knows the GSM 03.38 alphabet (3GPP TS 23.038, default alphabet and its default
extension table). Segments are counted the way phones and providers split them: a character is never
cut in two, so an escaped GSM-7 character or a UCS-2 surrogate pair that would straddle a segment
boundary starts the next segment, and the count can exceed ``ceil(units / 153)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: The GSM 03.38 default alphabet by code point 0x00-0x7F. Position 0x1B is the escape to the
#: extension table, not a character: it is written as \x1b here and excluded below.
GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)

#: The default extension table: each is sent as ESC + code, so it costs 2 septets.
GSM7_EXTENSION = {
    0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\",
    0x3C: "[", 0x3D: "~", 0x3E: "]", 0x40: "|", 0x65: "€",
}

_BASIC = frozenset(GSM7_BASIC) - {"\x1b"}
_EXTENDED = frozenset(GSM7_EXTENSION.values())

#: Units per segment: (a message that fits in one, each part of a concatenated message).
#: A concatenated part loses 6 octets to the user data header: 7 septets, 3 UCS-2 units.
LIMITS = {"GSM-7": (160, 153), "UCS-2": (70, 67)}

Encoding = Literal["GSM-7", "UCS-2"]


@dataclass(frozen=True)
class SmsInfo:
    encoding: Encoding
    characters: int  # Unicode code points, as a person counts them
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int  # messages the provider sends and bills; 0 for an empty text


def is_gsm7(text: str) -> bool:
    """Whether every character is in the default alphabet or its extension table."""
    return all(ch in _BASIC or ch in _EXTENDED for ch in text)


def _pack(costs: Iterable[int], single: int, multi: int) -> int:
    costs = list(costs)
    total = sum(costs)
    if total == 0:
        return 0
    if total <= single:
        return 1
    segments, used = 1, 0
    for cost in costs:
        if used + cost > multi:  # never split an escape sequence or a surrogate pair
            segments, used = segments + 1, 0
        used += cost
    return segments


def segments(text: str) -> SmsInfo:
    """Encoding, length and segment count of ``text`` as an SMS (no provider-side transliteration)."""
    if is_gsm7(text):
        costs = [2 if ch in _EXTENDED else 1 for ch in text]
        encoding: Encoding = "GSM-7"
    else:
        costs = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
        encoding = "UCS-2"
    single, multi = LIMITS[encoding]
    return SmsInfo(encoding, len(text), sum(costs), _pack(costs, single, multi))
