"""SMS segments: how a text is encoded on the air and how many SMS it is sent (and billed) as.

Pure functions. Whether a text fits the GSM 7-bit default alphabet is decided by the `gsm0338`
codec ("gsm03.38", 3GPP TS 23.038 / ETSI GSM 03.38), not by a table of our own; what a segment
holds follows 3GPP TS 23.040 and Twilio's own counting:

- GSM-7 (TS 23.038 §6.2.1): one septet per character of the default alphabet; a character of the
  extension table (§6.2.1.1: `^ { } \\ [ ~ ] | €` and form feed) is the escape 0x1B plus one
  septet, so 2. One SMS carries 140 octets of user data (TS 23.040 §9.2.3.16): 160 septets.
- UCS-2 (TS 23.038 §6.2.3) as carriers send it: UTF-16, so a character outside the Basic
  Multilingual Plane (an emoji) is a surrogate pair, 2 code units. One SMS: 70 units. A text with
  any character the GSM codec cannot encode is UCS-2 as a whole.
- A longer text is concatenated: each segment carries a user data header with the concatenation
  element (TS 23.040 §9.2.3.24.1: IEI 00, 8-bit reference, 6 octets with the UDHL), leaving 134
  octets: 153 septets or 67 UCS-2 units a segment.
- A character is never split across two segments: "A multipart SMS message using the 7bit
  character set may not be split so that the escape character and the following character end up
  in separate parts" (Twilio, "What the heck is a segment?",
  https://www.twilio.com/docs/glossary/what-the-heck-is-a-segment), and a surrogate pair split in
  two is no character at all. Twilio's Message Segment Calculator
  (https://github.com/TwilioDevEd/message-segment-calculator) moves such a character to the next
  segment; so does `count`, so a text can need one segment more than ceil(units / 153 or 67).

Approximations, each on the side Twilio bills at most as much as we count or within one segment:
the calculator packs whole grapheme clusters (an emoji ZWJ sequence stays in one segment), this
packs code points; US/Canada toll-free senders have 152 / 66 per concatenated segment (Twilio's
"SMS character limit" glossary), not modelled; national language shift tables (TS 23.038 §6.2.1.2)
are not used, as Twilio does not use them for US numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)

from shared.domain import Segments

GSM7 = "GSM-7"
UCS2 = "UCS-2"
ENCODINGS = (GSM7, UCS2)

CODEC = "gsm03.38"
# Units (septets, UTF-16 code units) of one lone SMS, and of each segment of a concatenated one.
SINGLE = {GSM7: 160, UCS2: 70}
PER_SEGMENT = {GSM7: 153, UCS2: 67}

# The escape to the extension table: the codec maps it to itself, but on its own it is no character
# (a handset shows it as a space, TS 23.038 §6.2.1.1), so a text holding U+001B is sent as UCS-2.
_ESCAPE = "\x1b"

# SMART_ENCODING=1: typographic look-alikes replaced with GSM-7 characters, after the table of
# Twilio's Smart Encoding (https://www.twilio.com/docs/messaging/services#smart-encoding; the
# calculator's SmartEncodingMap.ts), limited to what agents' texts hold: the quotes, dashes,
# ellipsis, spaces and invisible characters word processors and models put in. Not the zero width
# joiners (U+200C, U+200D): they shape Persian text and join emoji sequences.
_SMART = {
    # single quotes, apostrophes, primes and accents used as apostrophes
    "\u2018": "'",  # ‘ LEFT SINGLE QUOTATION MARK
    "\u2019": "'",  # ’ RIGHT SINGLE QUOTATION MARK
    "\u201a": "'",  # ‚ SINGLE LOW-9 QUOTATION MARK
    "\u201b": "'",  # ‛ SINGLE HIGH-REVERSED-9 QUOTATION MARK
    "\u2039": "'",  # ‹ SINGLE LEFT-POINTING ANGLE QUOTATION MARK
    "\u203a": "'",  # › SINGLE RIGHT-POINTING ANGLE QUOTATION MARK
    "\u2032": "'",  # ′ PRIME
    "\u2035": "'",  # ‵ REVERSED PRIME
    "\u02bb": "'",  # ʻ MODIFIER LETTER TURNED COMMA
    "\u02bc": "'",  # ʼ MODIFIER LETTER APOSTROPHE
    "\u00b4": "'",  # ´ ACUTE ACCENT
    "\u0060": "'",  # ` GRAVE ACCENT (ASCII, but not in GSM-7)
    # double quotes
    "\u201c": '"',  # “ LEFT DOUBLE QUOTATION MARK
    "\u201d": '"',  # ” RIGHT DOUBLE QUOTATION MARK
    "\u201e": '"',  # „ DOUBLE LOW-9 QUOTATION MARK
    "\u201f": '"',  # ‟ DOUBLE HIGH-REVERSED-9 QUOTATION MARK
    "\u00ab": '"',  # « LEFT-POINTING DOUBLE ANGLE QUOTATION MARK
    "\u00bb": '"',  # » RIGHT-POINTING DOUBLE ANGLE QUOTATION MARK
    "\u2033": '"',  # ″ DOUBLE PRIME
    "\u2036": '"',  # ‶ REVERSED DOUBLE PRIME
    # hyphens and dashes
    "\u2010": "-",  # ‐ HYPHEN
    "\u2011": "-",  # ‑ NON-BREAKING HYPHEN
    "\u2012": "-",  # ‒ FIGURE DASH
    "\u2013": "-",  # – EN DASH
    "\u2014": "-",  # — EM DASH
    "\u2015": "-",  # ― HORIZONTAL BAR
    "\u2212": "-",  # − MINUS SIGN
    "\u2022": "-",  # • BULLET
    # ellipsis
    "\u2026": "...",  # … HORIZONTAL ELLIPSIS
    # spaces
    "\t": " ",  # CHARACTER TABULATION (GSM-7 has none)
    "\u00a0": " ",  # NO-BREAK SPACE
    **{chr(c): " " for c in range(0x2000, 0x200B)},  # EN QUAD ... HAIR SPACE
    "\u202f": " ",  # NARROW NO-BREAK SPACE
    "\u205f": " ",  # MEDIUM MATHEMATICAL SPACE
    "\u3000": " ",  # IDEOGRAPHIC SPACE
    "\u2028": "\n",  # LINE SEPARATOR
    "\u2029": "\n",  # PARAGRAPH SEPARATOR
    # invisible
    "\u00ad": "",  # SOFT HYPHEN
    "\u200b": "",  # ZERO WIDTH SPACE
    "\u2060": "",  # WORD JOINER
    "\ufeff": "",  # ZERO WIDTH NO-BREAK SPACE (byte order mark)
}
SMART_ENCODING_TABLE: dict[str, str] = dict(_SMART)
_SMART_TRANSLATION = str.maketrans(_SMART)


@lru_cache(maxsize=4096)
def septets(char: str) -> int:
    """Septets of one character in GSM-7 (1, or 2 from the extension table); 0 if it has none."""
    if char == _ESCAPE:
        return 0
    try:
        return len(char.encode(CODEC))
    except UnicodeEncodeError:
        return 0


def _pack(units: list[int], encoding: str) -> int:
    """Segments of a text whose characters take `units` each: one SMS if it fits, else segments
    filled in order, a character that does not fit the rest of one starting the next."""
    if not units:
        return 0
    if sum(units) <= SINGLE[encoding]:
        return 1
    size = PER_SEGMENT[encoding]
    segments, used = 1, 0
    for n in units:
        if used + n > size:
            segments, used = segments + 1, 0
        used += n
    return segments


def count(text: str) -> Segments:
    """The encoding and segment count of `text` as it would be sent. An empty text is no SMS: 0."""
    gsm = [septets(c) for c in text]
    if all(gsm):
        return Segments(GSM7, _pack(gsm, GSM7))
    return Segments(UCS2, _pack([2 if ord(c) > 0xFFFF else 1 for c in text], UCS2))


def total(counts: Iterable[Segments]) -> Segments:
    """A sequence's parts together: the segments summed, UCS-2 if any part is."""
    items = list(counts)
    encoding = UCS2 if any(s.encoding == UCS2 for s in items) else GSM7
    return Segments(encoding, sum(s.count for s in items))


def non_gsm(text: str, limit: int = 3) -> list[str]:
    """The first `limit` distinct characters that make `text` UCS-2, in order, to name in an error."""
    found: list[str] = []
    for c in text:
        if not septets(c) and c not in found:
            found.append(c)
            if len(found) == limit:
                break
    return found


def smart_encode(text: str) -> str:
    """`text` with the look-alikes of SMART_ENCODING_TABLE replaced by their GSM-7 characters."""
    return text.translate(_SMART_TRANSLATION)


def sms_text(text: str, smart_encoding: bool) -> str:
    """The text to store and send: smart-encoded when SMART_ENCODING is on, else as written."""
    return smart_encode(text) if smart_encoding else text
