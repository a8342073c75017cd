"""Parsing at the edge: what agents and Twilio send us, validated into request types.

Every parser raises ValidationError naming every bad field (`[{"field": ..., "reason": ...}]`).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.domain import DEFAULT_PART_DELAY_SECONDS, PRIORITIES, Part, needs_render
from shared.errors import ValidationError
from shared.models import iso, validate_structured

SCHEDULE_FIELDS = frozenset(
    {
        "userId",
        "agentId",
        "messageData",
        "priority",
        "canDelay",
        "requiresFreshContext",
        "conversationId",
        "idempotencyKey",
        "expiresAt",
        "sequence",
        "topicKey",
    }
)
PART_FIELDS = frozenset({"content", "delaySeconds"})
MAX_AGENT_ID = 100
MAX_TOPIC_KEY = 100
MIN_PARTS, MAX_PARTS = 2, 5
MAX_PART_DELAY_SECONDS = 10
MAX_IDEMPOTENCY_KEY = 255


def parse_uuid(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
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
    if isinstance(value, dict):
        for k, v in value.items():
            problem = text_problem(k) or text_problem(v)
            if problem:
                return problem
    if isinstance(value, list):
        for item in value:
            problem = text_problem(item)
            if problem:
                return problem
    return None


def field_name(name: str) -> str:
    """A field name as an error names it: as sent, JSON-quoted if empty or not plain printable text."""
    if name and name.isprintable() and text_problem(name) is None:
        return name
    return json.dumps(name)


def parts_json(parts: tuple[Part, ...]) -> list[dict[str, Any]]:
    """As the agent sent them (the request digest and message_data): text, or structured data."""
    return [
        {"content": p.content, "delaySeconds": p.delay_seconds}
        if p.data is None
        else {**p.data, "delaySeconds": p.delay_seconds}
        for p in parts
    ]


@dataclass(frozen=True)
class ScheduleRequest:
    user_id: uuid.UUID
    agent_id: str
    message_data: dict[str, Any]
    content: str
    priority: str = "medium"
    can_delay: bool = True
    requires_fresh_context: bool = False
    conversation_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    expires_at: datetime | None = None
    topic_key: str | None = None
    parts: tuple[Part, ...] = ()

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
            canonical["sequence"] = parts_json(self.parts)
        raw = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def parse(
        cls,
        body: Any,
        *,
        now: datetime,
        max_content_length: int = 1600,
        idempotency_header: str | None = None,
    ) -> ScheduleRequest:
        """Validate an agent's JSON body; raises ValidationError naming every bad field."""
        errors: list[dict[str, str]] = []

        def bad(name: str, reason: str) -> None:
            errors.append({"field": name, "reason": reason})

        if not isinstance(body, dict):
            raise ValidationError([{"field": "body", "reason": "must be a JSON object"}])
        for name in sorted(set(body) - SCHEDULE_FIELDS):
            bad(field_name(name), "unknown field")
        for name in sorted(SCHEDULE_FIELDS & set(body)):
            problem = text_problem(body[name])
            if problem:
                bad(name, problem)

        user_id = parse_uuid(body.get("userId"))
        if "userId" not in body:
            bad("userId", "is required")
        elif user_id is None:
            bad("userId", "must be a UUID")

        agent_id = body.get("agentId")
        if "agentId" not in body:
            bad("agentId", "is required")
        elif not isinstance(agent_id, str) or not agent_id.strip():
            bad("agentId", "must be a non-empty string")
        elif len(agent_id) > MAX_AGENT_ID:
            bad("agentId", f"must be at most {MAX_AGENT_ID} characters")

        message_data = body.get("messageData")
        content = ""
        parts: tuple[Part, ...] = ()
        if "sequence" in body:
            if "messageData" in body:
                bad("sequence", "give either messageData or sequence, not both")
            parts = _parse_sequence(body["sequence"], bad, max_content_length)
            content = "\n".join(p.content for p in parts if p.content)
            message_data = {"sequence": parts_json(parts)}
        elif "messageData" not in body:
            bad("messageData", "is required (or sequence)")
        elif not isinstance(message_data, dict):
            bad("messageData", "must be an object")
        elif "content" not in message_data:
            for e in validate_structured(message_data):
                bad(e["field"], e["reason"])
        else:
            content = _parse_content(message_data, "messageData", bad, max_content_length)

        topic_key = body.get("topicKey")
        if topic_key is not None and (
            not isinstance(topic_key, str) or not topic_key.strip() or len(topic_key) > MAX_TOPIC_KEY
        ):
            bad("topicKey", f"must be a non-empty string of at most {MAX_TOPIC_KEY} characters")

        priority = body.get("priority", "medium")
        if priority not in PRIORITIES:
            bad("priority", f"must be one of {', '.join(PRIORITIES)}")

        flags: dict[str, bool] = {}
        for name, default in (("canDelay", True), ("requiresFreshContext", False)):
            value = body.get(name, default)
            if not isinstance(value, bool):
                bad(name, "must be true or false")
            flags[name] = bool(value) if isinstance(value, bool) else default

        conversation_id = None
        if body.get("conversationId") is not None:
            conversation_id = parse_uuid(body["conversationId"])
            if conversation_id is None:
                bad("conversationId", "must be a UUID")

        key = body.get("idempotencyKey")
        if key is None:
            key = idempotency_header
        elif idempotency_header is not None and idempotency_header != key:
            bad("idempotencyKey", "differs from the Idempotency-Key header")
        if key is not None and (
            not isinstance(key, str) or not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY
        ):
            bad("idempotencyKey", f"must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} characters")

        expires_at = None
        if body.get("expiresAt") is not None:
            expires_at = parse_instant(body["expiresAt"])
            if expires_at is None:
                bad("expiresAt", "must be an ISO 8601 timestamp with a timezone offset")
            elif expires_at <= now:
                bad("expiresAt", "must be in the future")

        if errors:
            raise ValidationError(errors)
        assert user_id is not None and isinstance(agent_id, str) and isinstance(message_data, dict)
        return cls(
            user_id=user_id,
            agent_id=agent_id.strip(),
            message_data=message_data,
            content=content,
            priority=str(priority),
            can_delay=flags["canDelay"],
            requires_fresh_context=flags["requiresFreshContext"],
            conversation_id=conversation_id,
            idempotency_key=key.strip() if isinstance(key, str) else None,
            expires_at=expires_at,
            topic_key=topic_key.strip() if isinstance(topic_key, str) else None,
            parts=parts,
        )


def _parse_content(data: dict[str, Any], name: str, bad: Callable[[str, str], None], max_length: int) -> str:
    raw = data.get("content")
    if "content" not in data:
        bad(f"{name}.content", "is required")
    elif not isinstance(raw, str):
        bad(f"{name}.content", "must be a string")
    elif not raw.strip():
        bad(f"{name}.content", "must not be empty")
    elif len(raw) > max_length:
        bad(f"{name}.content", f"must be at most {max_length} characters")
    else:
        return raw
    return ""


def _parse_sequence(value: Any, bad: Callable[[str, str], None], max_length: int) -> tuple[Part, ...]:
    if not isinstance(value, list):
        bad("sequence", "must be an array of parts")
        return ()
    if not MIN_PARTS <= len(value) <= MAX_PARTS:
        bad("sequence", f"must have {MIN_PARTS} to {MAX_PARTS} parts, got {len(value)}")
        return ()
    parts = []
    for i, item in enumerate(value):
        name = f"sequence[{i}]"
        if not isinstance(item, dict):
            bad(name, "must be an object")
            continue
        data: dict[str, Any] | None = None
        content = ""
        if "content" in item:
            for extra in sorted(set(item) - PART_FIELDS):
                bad(f"{name}.{field_name(extra)}", "unknown field")
            content = _parse_content(item, name, bad, max_length)
        else:
            # Structured, like messageData without content: rendered to text before it is sent.
            data = {k: v for k, v in item.items() if k != "delaySeconds"}
            for e in validate_structured(data):
                bad(e["field"].replace("messageData", name, 1), e["reason"])
        delay = item.get("delaySeconds", DEFAULT_PART_DELAY_SECONDS)
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_PART_DELAY_SECONDS:
            bad(f"{name}.delaySeconds", f"must be an integer from 0 to {MAX_PART_DELAY_SECONDS}")
            delay = DEFAULT_PART_DELAY_SECONDS
        parts.append(Part(position=i + 1, content=content, delay_seconds=delay, data=data))
    return tuple(parts)


E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_WORDS = frozenset({"HELP"})


def keyword(body: str | None) -> str | None:
    """Twilio's opt-out keywords: the whole message, any case, surrounding spaces ignored."""
    word = (body or "").strip().upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    if word in HELP_WORDS:
        return "help"
    return None


@dataclass(frozen=True)
class InboundSms:
    """Twilio's inbound-message webhook form, validated."""

    from_number: str
    body: str
    sid: str
    num_media: int

    @classmethod
    def parse(cls, form: dict[str, str]) -> InboundSms:
        errors: list[dict[str, str]] = []
        sender = (form.get("From") or "").strip()
        if not E164.match(sender):
            errors.append({"field": "From", "reason": "must be an E.164 phone number"})
        sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
        if not sid:
            errors.append({"field": "MessageSid", "reason": "is required"})
        raw_media = form.get("NumMedia") or "0"
        num_media = int(raw_media) if raw_media.isdigit() else -1
        if num_media < 0:
            errors.append({"field": "NumMedia", "reason": "must be a non-negative integer"})
        if errors:
            raise ValidationError(errors)
        return cls(from_number=sender, body=form.get("Body") or "", sid=sid, num_media=num_media)


@dataclass(frozen=True)
class StatusCallback:
    """Twilio's message status callback form, validated."""

    sid: str
    status: str
    error_code: str | None

    STATUSES = frozenset(
        {
            "accepted",
            "scheduled",
            "queued",
            "sending",
            "sent",
            "delivered",
            "undelivered",
            "failed",
            "read",
            "canceled",
        }
    )

    @classmethod
    def parse(cls, form: dict[str, str]) -> StatusCallback:
        errors: list[dict[str, str]] = []
        sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
        if not sid:
            errors.append({"field": "MessageSid", "reason": "is required"})
        status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
        if status not in cls.STATUSES:
            errors.append(
                {"field": "MessageStatus", "reason": f"must be one of {', '.join(sorted(cls.STATUSES))}"}
            )
        code = (form.get("ErrorCode") or "").strip() or None
        if errors:
            raise ValidationError(errors)
        return cls(sid=sid, status=status, error_code=code)


MAX_CANCEL_REASON = 500


@dataclass(frozen=True)
class CancelRequest:
    """An agent's request to withdraw a queued message."""

    message_id: uuid.UUID
    agent_id: str | None = None
    reason: str | None = None

    @classmethod
    def parse(cls, message_id: str, body: Any) -> CancelRequest:
        """The message id from the path and the optional JSON body {"agentId", "reason"}."""
        parsed = parse_uuid(message_id)
        errors = [] if parsed is not None else [{"field": "messageId", "reason": "must be a UUID"}]
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ValidationError([{"field": "body", "reason": "must be a JSON object"}])
        for name in sorted(set(body) - {"agentId", "reason"}):
            errors.append({"field": field_name(name), "reason": "unknown field"})
        agent_id, reason = body.get("agentId"), body.get("reason")
        if agent_id is not None and (not isinstance(agent_id, str) or not agent_id.strip()):
            errors.append({"field": "agentId", "reason": "must be a non-empty string"})
        if reason is not None and (
            not isinstance(reason, str) or len(reason) > MAX_CANCEL_REASON or text_problem(reason)
        ):
            errors.append(
                {"field": "reason", "reason": f"must be text of at most {MAX_CANCEL_REASON} characters"}
            )
        if errors:
            raise ValidationError(errors)
        assert parsed is not None
        return cls(message_id=parsed, agent_id=agent_id, reason=reason)


def parse_task(body: Any) -> tuple[uuid.UUID, int | None]:
    """The deliver task's body: {"messageId": uuid, "generation": int (optional)}."""
    if not isinstance(body, dict):
        raise ValidationError([{"field": "body", "reason": "must be a JSON object"}])
    errors = []
    message_id = parse_uuid(body.get("messageId"))
    if message_id is None:
        errors.append({"field": "messageId", "reason": "must be a UUID"})
    generation = body.get("generation")
    if generation is not None and (
        not isinstance(generation, int) or isinstance(generation, bool) or generation < 0
    ):
        errors.append({"field": "generation", "reason": "must be a non-negative integer"})
    if errors:
        raise ValidationError(errors)
    assert message_id is not None
    return message_id, generation
