"""Twilio's webhook forms, validated: an inbound SMS, a status callback, and what a reply means for
consent (the opt-out, opt-in and help keywords, and the phrases that revoke consent)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from shared.parsing import Errors

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")

# Reply keywords: the whole message, after `normalise`. Sources:
# - Twilio's default keywords, which its STOP filtering (and Advanced Opt-Out on a Messaging
#   Service) acts on: opt-out STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE, OPTOUT; opt-in
#   START, UNSTOP, YES; help HELP, INFO ("Twilio support for opt-out keywords (SMS STOP
#   filtering)", help.twilio.com/articles/223134027; twilio.com/docs/messaging/tutorials/advanced-opt-out).
# - The FCC's 2024 revocation order (FCC 24-24, CG Docket 02-278, 89 FR 15756; 47 CFR
#   64.1200(a)(10), in force since April 11, 2025): a reply of "stop", "quit", "end", "revoke",
#   "opt out", "cancel" or "unsubscribe" revokes consent, so "OPT OUT" (two words) counts, and
#   "STOP ALL" is STOPALL as people type it.
STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "OPT OUT"}
)
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS = frozenset({"HELP", "INFO"})
_KEYWORDS = {word: kw for kw, words in (("stop", STOP_WORDS), ("start", START_WORDS), ("help", HELP_WORDS))
             for word in words}  # fmt: skip

# Revocations in other words. 47 CFR 64.1200(a)(10) also makes any reply a reasonable person would
# read as a revocation one. This list is deliberately conservative: only whole messages that can
# mean nothing else (a message that merely contains "stop" - "stop by tomorrow", "don't stop" -
# is a conversation for the agent, not an opt-out). Matched on `_words` (punctuation inside the
# message dropped too), alone or with "please" before or after.
STOP_PHRASES = frozenset(
    {
        # the keywords with "please" or punctuation inside ("stop, please", "opt-out"), which
        # Twilio's filter does not act on
        "STOP",
        "STOP ALL",
        "STOPALL",
        "UNSUBSCRIBE",
        "OPT OUT",
        "OPTOUT",
        "STOP TEXTING ME",
        "STOP TEXTING",
        "STOP MESSAGING ME",
        "STOP MESSAGING",
        "STOP SENDING ME MESSAGES",
        "STOP SENDING ME TEXTS",
        "STOP SENDING MESSAGES",
        "STOP SENDING TEXTS",
        "STOP CONTACTING ME",
        "STOP ALL MESSAGES",
        "STOP ALL TEXTS",
        "UNSUBSCRIBE ME",
        "DON'T TEXT ME",
        "DONT TEXT ME",
        "DO NOT TEXT ME",
        "DON'T MESSAGE ME",
        "DONT MESSAGE ME",
        "DO NOT MESSAGE ME",
        "DON'T CONTACT ME",
        "DONT CONTACT ME",
        "DO NOT CONTACT ME",
        "NO MORE TEXTS",
        "NO MORE MESSAGES",
        "REMOVE ME",
        "REMOVE ME FROM THIS LIST",
        "REMOVE ME FROM YOUR LIST",
        "REMOVE ME FROM THE LIST",
        "TAKE ME OFF THIS LIST",
        "TAKE ME OFF YOUR LIST",
        "TAKE ME OFF THE LIST",
        "OPT ME OUT",
        "I WANT TO OPT OUT",
        "I WANT TO UNSUBSCRIBE",
    }
)
_POLITE = "PLEASE"

# Typographic apostrophes phones insert ("don’t"), read as the ASCII one.
_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u2032": "'", "\uff07": "'"})
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")

# How a keyword changes consent (consent_events.event), and where it was recognised (.source).
CONSENT_EVENTS = {"stop": "opt_out", "start": "opt_in", "help": "help"}
KEYWORD = "keyword"
PHRASE = "phrase"


def _is_edge(ch: str) -> bool:
    """Ignored around a keyword: whitespace and punctuation ("Stop!", "(stop)", " stop. ")."""
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalise(body: str | None) -> str:
    """The message as keywords are matched: Unicode-compatible forms folded (full-width letters),
    typographic apostrophes made ASCII, upper case, surrounding whitespace and punctuation dropped,
    inner whitespace collapsed to one space."""
    text = unicodedata.normalize("NFKC", body or "").translate(_APOSTROPHES).upper()
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return " ".join(text[start:end].split())


def _words(text: str) -> str:
    """`normalise`d text as its words only (apostrophes inside a word kept): "stop texting me,
    please" and "stop - texting me please" read alike."""
    return " ".join(_WORD.findall(text))


@dataclass(frozen=True)
class Reply:
    """What a user's message means for consent: `keyword` stop/start/help, recognised as a Twilio
    or FCC keyword or as one of the revocation phrases (`source`)."""

    keyword: str
    source: str

    @property
    def event(self) -> str:
        """consent_events.event: opt_out, opt_in or help."""
        return CONSENT_EVENTS[self.keyword]


def reply_keyword(body: str | None) -> Reply | None:
    """The keyword a whole message is, or the opt-out a revocation phrase is; None otherwise."""
    text = normalise(body)
    word = _KEYWORDS.get(text)
    if word is not None:
        return Reply(word, KEYWORD)
    words = _words(text).split(" ")
    if words and words[0] == _POLITE:
        words = words[1:]
    if words and words[-1] == _POLITE:
        words = words[:-1]
    if " ".join(words) in STOP_PHRASES:
        return Reply("stop", PHRASE)
    return None


def keyword(body: str | None) -> str | None:
    """stop, start or help: what the message asks for (a phrase revocation is stop), else None."""
    found = reply_keyword(body)
    return None if found is None else found.keyword


def _message_sid(form: dict[str, str], bad: Errors) -> str:
    sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
    if not sid:
        bad("MessageSid", "is required")
    return sid


@dataclass(frozen=True)
class InboundSms:
    """Twilio's inbound-message webhook form, validated."""

    from_number: str
    body: str
    sid: str
    num_media: int

    @classmethod
    def parse(cls, form: dict[str, str]) -> InboundSms:
        bad = Errors()
        sender = (form.get("From") or "").strip()
        if not E164.match(sender):
            bad("From", "must be an E.164 phone number")
        sid = _message_sid(form, bad)
        raw_media = form.get("NumMedia") or "0"
        num_media = int(raw_media) if raw_media.isdigit() else -1
        if num_media < 0:
            bad("NumMedia", "must be a non-negative integer")
        bad.raise_any()
        return cls(from_number=sender, body=form.get("Body") or "", sid=sid, num_media=num_media)


@dataclass(frozen=True)
class StatusCallback:
    """Twilio's message status callback form, validated."""

    sid: str
    status: str
    error_code: str | None

    STATUSES = frozenset({"accepted", "scheduled", "queued", "sending", "sent", "delivered", "undelivered",
                          "failed", "read", "canceled"})  # fmt: skip

    @classmethod
    def parse(cls, form: dict[str, str]) -> StatusCallback:
        bad = Errors()
        sid = _message_sid(form, bad)
        status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
        if status not in cls.STATUSES:
            bad("MessageStatus", f"must be one of {', '.join(sorted(cls.STATUSES))}")
        bad.raise_any()
        return cls(sid=sid, status=status, error_code=(form.get("ErrorCode") or "").strip() or None)
