"""SMS encoding and segment counts (shared/segments.py): the boundaries 3GPP TS 23.040 and Twilio
give, the characters of the GSM 03.38 extension table, surrogate pairs, smart encoding."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import segments
from shared.domain import Segments
from shared.errors import ValidationError
from shared.parsing import ScheduleRequest
from shared.segments import GSM7, UCS2

EMOJI = "\U0001f600"  # 😀, outside the BMP: a surrogate pair, 2 UTF-16 code units
EXTENSION = "^{}\\[~]|€\f"  # the GSM 03.38 extension table: each is ESC + one septet


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Segments(GSM7, 0)),
        ("a", Segments(GSM7, 1)),
        ("a" * 160, Segments(GSM7, 1)),
        ("a" * 161, Segments(GSM7, 2)),
        ("a" * 306, Segments(GSM7, 2)),  # 2 × 153
        ("a" * 307, Segments(GSM7, 3)),
        ("a" * 1600, Segments(GSM7, 11)),  # ceil(1600 / 153): Twilio's longest body
        ("é" * 1600, Segments(GSM7, 11)),  # é, à, ü, Ø, Δ ... are in the default alphabet
        ("€" * 80, Segments(GSM7, 1)),  # 160 septets
        ("€" * 81, Segments(GSM7, 2)),  # 162 septets
        ("a" * 159 + "€", Segments(GSM7, 2)),  # 161 septets
        ("a" * 158 + "€", Segments(GSM7, 1)),  # 160 septets
        ("ç", Segments(UCS2, 1)),  # GSM 03.38 has Ç but no ç
        ("\x1b", Segments(UCS2, 1)),  # the escape alone is no character
        ("\t", Segments(UCS2, 1)),  # nor is a tab
        ("Ж" * 70, Segments(UCS2, 1)),
        ("Ж" * 71, Segments(UCS2, 2)),
        ("Ж" * 134, Segments(UCS2, 2)),  # 2 × 67
        ("Ж" * 135, Segments(UCS2, 3)),
        (EMOJI * 35, Segments(UCS2, 1)),  # 70 code units
        (EMOJI * 36, Segments(UCS2, 2)),
        ("a" * 1600 + EMOJI, Segments(UCS2, 24)),  # 1602 units / 67
    ],
)
def test_encoding_and_segments(text: str, expected: Segments) -> None:
    assert segments.count(text) == expected


def test_every_extension_character_takes_two_septets() -> None:
    assert [segments.septets(c) for c in EXTENSION] == [2] * len(EXTENSION)
    assert segments.count(EXTENSION) == Segments(GSM7, 1)
    assert segments.septets("a") == 1 and segments.septets(EMOJI) == 0


def test_one_emoji_turns_160_gsm_characters_into_3_ucs2_segments() -> None:
    assert segments.count("a" * 160) == Segments(GSM7, 1)
    # 161 code units, 67 a segment: the example
    assert segments.count("a" * 159 + EMOJI) == Segments(UCS2, 3)


def test_an_escape_pair_is_never_split_across_segments() -> None:
    # 306 septets: 2 segments by division, but after 152 septets the € (2) does not fit the first
    # segment's 153, so it starts the second (€ + 151 a = 153) and the last a needs a third.
    text = "a" * 152 + "€" + "a" * 152
    assert sum(segments.septets(c) for c in text) == 306
    assert segments.count(text) == Segments(GSM7, 3)
    # Where no escape pair straddles a boundary, packing is the plain division.
    assert segments.count("a" * 151 + "€" + "a" * 153) == Segments(GSM7, 2)


def test_a_surrogate_pair_is_never_split_across_segments() -> None:
    # 134 units, 2 segments by division; the emoji after 66 units does not fit in the first 67.
    assert segments.count("Ж" * 66 + EMOJI + "Ж" * 66) == Segments(UCS2, 3)
    assert segments.count("Ж" * 65 + EMOJI + "Ж" * 67) == Segments(UCS2, 2)


def test_a_sequences_total() -> None:
    parts = [segments.count("a" * 1600), segments.count("Ж" * 71), segments.count("hi")]
    assert segments.total(parts) == Segments(UCS2, 11 + 2 + 1)
    assert segments.total([segments.count("hi"), segments.count("€")]) == Segments(GSM7, 2)
    # The example: 5 parts of 1,600 characters each are not "one message".
    assert segments.total([segments.count("a" * 1600)] * 5) == Segments(GSM7, 55)


def test_the_characters_that_force_ucs2_are_named_in_order() -> None:
    assert segments.non_gsm("Hi “Sam” " + EMOJI + EMOJI + " ok") == ["“", "”", EMOJI]
    assert segments.non_gsm("plain") == []


def test_smart_encoding_replaces_look_alikes_with_gsm_characters() -> None:
    text = "“Don’t” — it’s 5–7 pm…\u00a0ok\u200b"
    assert segments.smart_encode(text) == "\"Don't\" - it's 5-7 pm... ok"
    assert segments.count(text).encoding == UCS2
    assert segments.count(segments.smart_encode(text)) == Segments(GSM7, 1)
    # What is not a look-alike stays: an emoji, accented letters of the GSM alphabet, ç.
    assert segments.smart_encode("é ç " + EMOJI) == "é ç " + EMOJI
    assert segments.sms_text(text, False) == text


@pytest.mark.parametrize(("char", "replacement"), sorted(segments.SMART_ENCODING_TABLE.items()))
def test_each_smart_encoding_entry_replaces_a_non_gsm_character_with_gsm_text(
    char: str, replacement: str
) -> None:
    assert segments.septets(char) == 0, f"{char!r} is GSM-7 already"
    assert all(segments.septets(c) == 1 for c in replacement), f"{replacement!r} is not basic GSM-7"


@given(st.text(max_size=400))
def test_counts_are_within_one_segment_per_character_boundary(text: str) -> None:
    """Packing whole characters never beats the plain division, and loses at most one unit per
    segment (a 2-unit character moved on): ceil(units / size) <= segments <= ceil(units / (size - 1))."""
    result = segments.count(text)
    if result.encoding == GSM7:
        units = sum(segments.septets(c) for c in text)
        assert all(segments.septets(c) for c in text)
    else:
        units = len(text.encode("utf-16-le", "surrogatepass")) // 2
        assert any(segments.septets(c) == 0 for c in text)
    if units == 0:
        assert result.count == 0
    elif units <= segments.SINGLE[result.encoding]:
        assert result.count == 1
    else:
        size = segments.PER_SEGMENT[result.encoding]
        assert math.ceil(units / size) <= result.count <= math.ceil(units / (size - 1))


# --- at the edge: ScheduleRequest.parse ------------------------------------------------------------

NOW = datetime(2025, 6, 2, 15, 0, tzinfo=UTC)
USER = "9b2f0c1e-4a57-4a8e-9d51-2f3c1f7d8a10"
CURLY = "\u201cDon\u2019t\u201d \u2014 ok\u2026"


def parse(body: dict[str, Any], **options: Any) -> ScheduleRequest:
    return ScheduleRequest.parse({"userId": USER, "agentId": "a", **body}, now=NOW, **options)


def errors(body: dict[str, Any], **options: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as caught:
        parse(body, **options)
    return list(caught.value.details["errors"])


def test_every_field_over_the_segment_limit_is_named_with_the_others() -> None:
    found = errors(
        {
            "sequence": [{"content": "ok"}, {"content": "a" * 1531}, {"content": "Ж" * 700}],
            "priority": "asap",
        }
    )
    assert [e["field"] for e in found] == ["sequence[1].content", "sequence[2].content", "priority"]
    assert "11 segments of GSM-7" in found[0]["reason"]
    assert "11 segments of UCS-2" in found[1]["reason"] and '"Ж"' in found[1]["reason"]


def test_the_segment_limit_is_the_parsers_option() -> None:
    assert parse({"messageData": {"content": "a" * 1531}}, max_segments=11).content == "a" * 1531
    assert parse({"messageData": {"content": "a" * 9000}}, max_segments=0, max_content_length=9000)
    [error] = errors({"messageData": {"content": "a" * 161}}, max_segments=1)
    assert error["field"] == "messageData.content" and "2 segments" in error["reason"]


def test_smart_encoding_changes_the_text_to_send_not_the_request() -> None:
    single = {"messageData": {"content": CURLY}}
    sequence = {"sequence": [{"content": CURLY}, {"type": "intro"}]}
    for body in (single, sequence):
        plain, smart = parse(body), parse(body, smart_encoding=True)
        assert plain.request_hash == smart.request_hash  # a retry is a retry whatever the setting
        assert plain.message_data == smart.message_data
        assert CURLY in str(smart.message_data)  # stored as the agent sent it
    assert parse(single, smart_encoding=True).content == '"Don\'t" - ok...'
    parts = parse(sequence, smart_encoding=True).parts
    assert [p.content for p in parts] == ['"Don\'t" - ok...', ""] and parts[1].data == {"type": "intro"}


def test_smart_encoding_counts_the_replaced_text() -> None:
    # 80 curly quotes: 80 UCS-2 units (2 segments) as written, 80 GSM-7 septets (1) replaced.
    body = {"messageData": {"content": "\u201c" * 80}}
    assert errors(body, max_segments=1)[0]["field"] == "messageData.content"
    assert parse(body, max_segments=1, smart_encoding=True).content == '"' * 80
