"""Parsing at the edge: what agents send us, validated (ValidationError names every bad field).

Twilio's webhook forms are parsed in shared/twilio_forms.py over the same Errors collector."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import chain
from typing import Any

from shared import segments
from shared.domain import (
    DEFAULT_PART_DELAY_SECONDS,
    MAX_PART_DELAY_SECONDS,
    MAX_PARTS,
    MIN_PARTS,
    PRIORITIES,
    Part,
    Policy,
    needs_render,
)
from shared.errors import ValidationError
from shared.models import iso, validate_structured

SCHEDULE_FIELDS = frozenset({"userId", "agentId", "messageData", "priority", "canDelay",
                             "requiresFreshContext", "conversationId", "idempotencyKey", "expiresAt",
                             "sequence", "topicKey", "transactional"})  # fmt: skip
PART_FIELDS = frozenset({"content", "delaySeconds"})
MAX_AGENT_ID = 100
MAX_TOPIC_KEY = 100
MAX_IDEMPOTENCY_KEY = 255
_NO_ID = uuid.UUID(int=0)  # a placeholder for an id that is not valid (then the request is not)


def parse_uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        return None


def parse_instant(value: Any) -> datetime | None:
    """An ISO 8601 instant with an explicit offset (a trailing Z is accepted); None if not one."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            return None
        parsed.astimezone(UTC)  # 9999-12-31T23:59:59-01:00 is past the last representable instant
    except (ValueError, OverflowError):
        return None
    return parsed


def text_problem(value: Any) -> str | None:
    """Why a string (or any string inside a JSON value) cannot be stored, if it cannot: PostgreSQL
    text and jsonb hold no NUL character, and a lone surrogate is not encodable UTF-8."""
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid UTF-8 text (no unpaired surrogates)"
        return None
    if isinstance(value, dict):  # each key, then its value
        return next(filter(None, map(text_problem, chain.from_iterable(value.items()))), None)
    if isinstance(value, list):
        return next(filter(None, map(text_problem, value)), None)
    return None


def field_name(name: str) -> str:
    """A field name as an error names it: as sent, JSON-quoted if empty or not plain printable text."""
    if name and name.isprintable() and text_problem(name) is None:
        return name
    return json.dumps(name)


class Errors(list[dict[str, str]]):
    """What a parser found wrong, in the order it checked: `bad(field, reason)` adds one."""

    def __call__(self, name: str, reason: str) -> None:
        self.append({"field": name, "reason": reason})

    def unknown(self, data: dict[str, Any], known: frozenset[str], prefix: str = "") -> None:
        for name in sorted(set(data) - known):
            self(prefix + field_name(name), "unknown field")

    def raise_any(self) -> None:
        if self:
            raise ValidationError(list(self))


def parts_json(parts: tuple[Part, ...]) -> list[dict[str, Any]]:
    """As the agent sent them (the request digest and message_data): text, or structured data."""
    return [
        {**({"content": p.content} if p.data is None else p.data), "delaySeconds": p.delay_seconds}
        for p in parts
    ]


# What json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False) would build on every
# call, built once: the same text, without a new encoder per request.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ScheduleRequest:
    user_id: uuid.UUID
    agent_id: str
    message_data: dict[str, Any]  # as the agent sent it (a sequence's: its parts as sent)
    content: str  # the text to send, smart-encoded if SMART_ENCODING (a sequence: its parts', joined)
    priority: str = "medium"
    can_delay: bool = True
    requires_fresh_context: bool = False
    conversation_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    expires_at: datetime | None = None
    topic_key: str | None = None
    parts: tuple[Part, ...] = ()  # each part's content: the text to send, as `content`
    transactional: bool = False  # the agent says so; only an allowed agent's passes calling hours

    @property
    def structured(self) -> bool:
        """messageData without a finished `content`: a Renderer writes the text."""
        return not self.parts and needs_render(self.message_data)

    @property
    def request_hash(self) -> str:
        """A stable digest of what was asked, to tell a retry from a reuse of the same key."""
        canonical = {
            "userId": str(self.user_id),
            "agentId": self.agent_id,
            "messageData": self.message_data,
            "priority": self.priority,
            "canDelay": self.can_delay,
            "requiresFreshContext": self.requires_fresh_context,
            "conversationId": str(self.conversation_id) if self.conversation_id else None,
            "expiresAt": iso(self.expires_at),
        }
        # Only present when used, so digests of requests without them did not change.
        if self.topic_key is not None:
            canonical["topicKey"] = self.topic_key
        if self.parts:
            # As sent, not as smart-encoded: a retry is the same request whatever SMART_ENCODING is.
            canonical["sequence"] = self.message_data["sequence"]
        if self.transactional:
            canonical["transactional"] = True
        return hashlib.sha256(_CANONICAL.encode(canonical).encode()).hexdigest()

    @classmethod
    def parse(
        cls,
        body: Any,
        *,
        now: datetime,
        max_content_length: int = Policy.max_content_length,
        idempotency_header: str | None = None,
        max_segments: int = Policy.max_segments_per_message,
        smart_encoding: bool = Policy.smart_encoding,
    ) -> ScheduleRequest:
        """Validate an agent's JSON body; raises ValidationError naming every bad field. A text of
        more than `max_segments` SMS segments (0: any) is refused; with `smart_encoding` the texts
        to send have their typographic look-alikes replaced (shared/segments.py) before counting."""
        if not isinstance(body, dict):
            raise ValidationError([{"field": "body", "reason": "must be a JSON object"}])
        bad = Errors()
        fields = _ScheduleFields(body, bad, max_content_length, _Sms(max_segments, smart_encoding))
        fields.names()
        user_id, agent_id = fields.uuid("userId", required=True) or _NO_ID, fields.agent_id()
        message_data, content, parts = fields.message()
        request = cls(  # the other fields are parsed as the arguments are evaluated: in this order
            user_id=user_id,
            agent_id=agent_id,
            message_data=message_data,
            content=content,
            parts=parts,
            topic_key=fields.bounded_text("topicKey", body.get("topicKey"), MAX_TOPIC_KEY),
            priority=fields.priority(),
            can_delay=fields.flag("canDelay", True),
            requires_fresh_context=fields.flag("requiresFreshContext", False),
            conversation_id=fields.uuid("conversationId", required=False),
            idempotency_key=fields.idempotency_key(idempotency_header),
            expires_at=fields.expires_at(now),
            transactional=fields.flag("transactional", False),
        )
        bad.raise_any()
        return request


class _ScheduleFields:
    """A schedule request's body, one parser per field or group of fields: each returns the value (a
    placeholder when it is not valid) and tells `bad` what is wrong, in the order they are called."""

    def __init__(self, body: dict[str, Any], bad: Errors, max_length: int, sms: _Sms) -> None:
        self.body, self.bad, self.max_length, self.sms = body, bad, max_length, sms

    def names(self) -> None:
        """Unknown fields first, then the known fields holding text that cannot be stored."""
        self.bad.unknown(self.body, SCHEDULE_FIELDS)
        for name in sorted(SCHEDULE_FIELDS & set(self.body)):
            problem = text_problem(self.body[name])
            if problem:
                self.bad(name, problem)

    def uuid(self, name: str, *, required: bool) -> uuid.UUID | None:
        """userId (required) or conversationId (optional: absent or null is none)."""
        value = self.body.get(name)
        parsed = parse_uuid(value)
        if required and name not in self.body:
            self.bad(name, "is required")
        elif parsed is None and (required or value is not None):
            self.bad(name, "must be a UUID")
        return parsed

    def message(self) -> tuple[dict[str, Any], str, tuple[Part, ...]]:
        """messageData or a sequence of parts: (message_data to store, its finished text or "", parts)."""
        data = self.body.get("messageData")
        if "sequence" in self.body:
            if "messageData" in self.body:
                self.bad("sequence", "give either messageData or sequence, not both")
            parts = self.sequence(self.body["sequence"])
            texts = tuple(
                replace(p, content=self.sms_text(p.content, f"sequence[{p.position - 1}].content"))
                for p in parts
            )
            return {"sequence": parts_json(parts)}, "\n".join(p.content for p in texts if p.content), texts
        if "messageData" not in self.body:
            self.bad("messageData", "is required (or sequence)")
        elif not isinstance(data, dict):
            self.bad("messageData", "must be an object")
        else:
            return data, self.sms_text(self.text(data, "messageData"), "messageData.content"), ()
        return {}, "", ()

    def sms_text(self, content: str, name: str) -> str:
        """A finished content as it will be sent, within the segment limit ("" stays "": structured)."""
        if not content:
            return content
        text = segments.sms_text(content, self.sms.smart_encoding)
        problem = self.sms.problem(text)
        if problem:
            self.bad(name, problem)
        return text

    def text(self, data: dict[str, Any], name: str) -> str:
        """messageData's or a part's finished `content`; without one, structured data to render ("")."""
        if "content" in data:
            return self.content(data, name)
        for e in validate_structured(data):
            self.bad(e["field"].replace("messageData", name, 1), e["reason"])
        return ""

    def agent_id(self) -> str:
        agent_id = self.body.get("agentId")
        if "agentId" not in self.body:
            self.bad("agentId", "is required")
        elif not isinstance(agent_id, str) or not agent_id.strip():
            self.bad("agentId", "must be a non-empty string")
        elif len(agent_id) > MAX_AGENT_ID:
            self.bad("agentId", f"must be at most {MAX_AGENT_ID} characters")
        else:
            return agent_id.strip()
        return ""

    def content(self, data: dict[str, Any], name: str) -> str:
        raw = data.get("content")
        if "content" not in data:
            self.bad(f"{name}.content", "is required")
        elif not isinstance(raw, str):
            self.bad(f"{name}.content", "must be a string")
        elif not raw.strip():
            self.bad(f"{name}.content", "must not be empty")
        elif len(raw) > self.max_length:
            self.bad(f"{name}.content", f"must be at most {self.max_length} characters")
        else:
            return raw
        return ""

    def sequence(self, value: Any) -> tuple[Part, ...]:
        if not isinstance(value, list):
            self.bad("sequence", "must be an array of parts")
            return ()
        if not MIN_PARTS <= len(value) <= MAX_PARTS:
            self.bad("sequence", f"must have {MIN_PARTS} to {MAX_PARTS} parts, got {len(value)}")
            return ()
        parts = [self.part(i, item) for i, item in enumerate(value)]
        return tuple(p for p in parts if p is not None)

    def part(self, i: int, item: Any) -> Part | None:
        name = f"sequence[{i}]"
        if not isinstance(item, dict):
            self.bad(name, "must be an object")
            return None
        data = None if "content" in item else {k: v for k, v in item.items() if k != "delaySeconds"}
        if data is None:
            self.bad.unknown(item, PART_FIELDS, prefix=f"{name}.")
        content = self.text(item if data is None else data, name)
        delay = item.get("delaySeconds", DEFAULT_PART_DELAY_SECONDS)
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_PART_DELAY_SECONDS:
            self.bad(f"{name}.delaySeconds", f"must be an integer from 0 to {MAX_PART_DELAY_SECONDS}")
            delay = DEFAULT_PART_DELAY_SECONDS
        return Part(position=i + 1, content=content, delay_seconds=delay, data=data)

    def bounded_text(self, name: str, value: Any, max_length: int) -> str | None:
        """An optional field: None, or a non-empty string of at most max_length characters (stripped)."""
        if value is None:
            return None
        if isinstance(value, str) and value.strip() and len(value) <= max_length:
            return value.strip()
        self.bad(name, f"must be a non-empty string of at most {max_length} characters")
        return None

    def priority(self) -> str:
        priority = self.body.get("priority", "medium")
        if priority not in PRIORITIES:
            self.bad("priority", f"must be one of {', '.join(PRIORITIES)}")
        return str(priority)

    def flag(self, name: str, default: bool) -> bool:
        value = self.body.get(name, default)
        if not isinstance(value, bool):
            self.bad(name, "must be true or false")
            return default
        return value

    def idempotency_key(self, header: str | None) -> str | None:
        """From the body, else from the Idempotency-Key header; when both are given, they agree."""
        key = self.body.get("idempotencyKey")
        if key is None:
            key = header
        elif header is not None and header != key:
            self.bad("idempotencyKey", "differs from the Idempotency-Key header")
        return self.bounded_text("idempotencyKey", key, MAX_IDEMPOTENCY_KEY)

    def expires_at(self, now: datetime) -> datetime | None:
        if self.body.get("expiresAt") is None:
            return None
        expires_at = parse_instant(self.body["expiresAt"])
        if expires_at is None:
            self.bad("expiresAt", "must be an ISO 8601 timestamp with a timezone offset")
        elif expires_at <= now:
            self.bad("expiresAt", "must be in the future")
        return expires_at


@dataclass(frozen=True)
class _Sms:
    """How a finished text is checked and prepared: MAX_SEGMENTS_PER_MESSAGE, SMART_ENCODING."""

    max_segments: int
    smart_encoding: bool

    def problem(self, text: str) -> str | None:
        """Why `text` is too long in SMS segments, if it is: with its encoding, and what made it UCS-2."""
        size = segments.count(text)
        if not self.max_segments or size.count <= self.max_segments:
            return None
        why = ""
        if size.encoding == segments.UCS2:
            chars = ", ".join(json.dumps(c, ensure_ascii=False) for c in segments.non_gsm(text))
            why = f" ({segments.UCS2} because of {chars}: one character outside GSM-7 makes all of it UCS-2)"
        return (
            f"must fit in at most {self.max_segments} SMS segments; this text is {size.count} segments "
            f"of {size.encoding}{why}"
        )
