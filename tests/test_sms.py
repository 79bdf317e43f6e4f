"""SMS encoding and segments: the GSM 03.38 tables and the 160/153 and 70/67 limits, on known examples."""

from __future__ import annotations

import pytest

from worker.sms import GSM7_BASIC, GSM7_EXTENSION, SmsInfo, is_gsm7, segments


def test_the_tables_are_the_whole_default_alphabet_and_extension():
    assert len(GSM7_BASIC) == 128 and len(set(GSM7_BASIC)) == 128
    assert GSM7_BASIC[0x00] == "@" and GSM7_BASIC[0x09] == "Ç" and GSM7_BASIC[0x1B] == "\x1b"
    assert GSM7_BASIC[0x24] == "¤" and GSM7_BASIC[0x40] == "¡" and GSM7_BASIC[0x60] == "¿"
    assert GSM7_BASIC[0x7F] == "à" and GSM7_BASIC[0x10] == "Δ"
    assert sorted(GSM7_EXTENSION.values()) == sorted("\f^{}\\[~]|€")
    assert GSM7_EXTENSION[0x65] == "€"


def test_every_basic_character_costs_one_septet():
    text = GSM7_BASIC.replace("\x1b", "")
    assert segments(text) == SmsInfo("GSM-7", 127, 127, 1)


@pytest.mark.parametrize("ch", list("^{}\\[~]|€\f"))
def test_every_extension_character_costs_two_septets(ch):
    assert segments(ch) == SmsInfo("GSM-7", 1, 2, 1)


@pytest.mark.parametrize("text, expected", [
    ("", SmsInfo("GSM-7", 0, 0, 0)),
    ("Hello", SmsInfo("GSM-7", 5, 5, 1)),
    ("a" * 160, SmsInfo("GSM-7", 160, 160, 1)),
    ("a" * 161, SmsInfo("GSM-7", 161, 161, 2)),
    ("a" * 306, SmsInfo("GSM-7", 306, 306, 2)),  # 2 x 153
    ("a" * 307, SmsInfo("GSM-7", 307, 307, 3)),
    ("€" + "a" * 158, SmsInfo("GSM-7", 159, 160, 1)),
    ("€" + "a" * 159, SmsInfo("GSM-7", 160, 161, 2)),  # 160 characters, 161 septets
    # the escape pair is never split: 152 + (2) does not fit 153, so the euro opens part 2
    ("a" * 152 + "€" + "a" * 152, SmsInfo("GSM-7", 305, 306, 3)),
    ("中" * 70, SmsInfo("UCS-2", 70, 70, 1)),
    ("中" * 71, SmsInfo("UCS-2", 71, 71, 2)),
    ("中" * 134, SmsInfo("UCS-2", 134, 134, 2)),  # 2 x 67
    ("中" * 135, SmsInfo("UCS-2", 135, 135, 3)),
    ("😀", SmsInfo("UCS-2", 1, 2, 1)),  # outside the BMP: a surrogate pair
    ("😀" * 35, SmsInfo("UCS-2", 35, 70, 1)),
    ("😀" * 36, SmsInfo("UCS-2", 36, 72, 2)),
    ("a" * 66 + "😀" + "a" * 66, SmsInfo("UCS-2", 133, 134, 3)),  # a surrogate pair is never split either
    ("a" * 159 + "ç", SmsInfo("UCS-2", 160, 160, 3)),  # small c-cedilla is not GSM-7: the whole text is UCS-2
])
def test_known_examples(text, expected):
    assert segments(text) == expected


def test_characters_outside_the_alphabet_switch_to_ucs2():
    for ch in ("`", "ç", "\u202f", "’", "中", "😀"):
        assert not is_gsm7(f"Hi {ch}")
        assert segments(f"Hi {ch}").encoding == "UCS-2"
    assert is_gsm7("Confirm: https://pay.example/c/abc_DEF-123?x=1&y=2 #tx £$¥@ ÄÖÑÜ§ äöñüà")
