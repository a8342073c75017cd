"""Twilio's webhook forms, validated: an inbound SMS, a status callback, and the keywords a reply may be."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.parsing import Errors

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS = frozenset({"HELP"})
_KEYWORDS = {word: kw for kw, words in (("stop", STOP_WORDS), ("start", START_WORDS), ("help", HELP_WORDS))
             for word in words}  # fmt: skip


def keyword(body: str | None) -> str | None:
    """Twilio's opt-out keywords: the whole message, any case, surrounding spaces ignored."""
    return _KEYWORDS.get((body or "").strip().upper())


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
