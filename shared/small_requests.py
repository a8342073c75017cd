"""The small requests, parsed at the edge like a schedule request (shared/parsing.py, whose Errors
collector and field parsers they use): an agent's cancel, an operator's consent-history query, a
listing of a user's messages, and the deliver task's body."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.errors import ValidationError
from shared.parsing import MAX_AGENT_ID, MAX_TOPIC_KEY, Errors, parse_uuid, text_problem

CANCEL_FIELDS = frozenset({"agentId", "reason"})
MAX_CANCEL_REASON = 500


@dataclass(frozen=True)
class CancelRequest:
    """An agent withdrawing a queued message: the id from the path, the optional JSON body."""

    message_id: uuid.UUID
    agent_id: str | None = None
    reason: str | None = None

    @classmethod
    def parse(cls, message_id: str, body: Any) -> CancelRequest:
        """Body {"agentId"?: string, "reason"?: string}, or none; raises ValidationError."""
        bad = Errors()
        parsed = parse_uuid(message_id)
        if parsed is None:
            bad("messageId", "must be a UUID")
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ValidationError([{"field": "body", "reason": "must be a JSON object"}])
        bad.unknown(body, CANCEL_FIELDS)
        agent_id, reason = body.get("agentId"), body.get("reason")
        if agent_id is not None and (not isinstance(agent_id, str) or not agent_id.strip()):
            bad("agentId", "must be a non-empty string")
        if reason is not None and (
            not isinstance(reason, str) or len(reason) > MAX_CANCEL_REASON or text_problem(reason)
        ):
            bad("reason", f"must be text of at most {MAX_CANCEL_REASON} characters")
        bad.raise_any()
        assert parsed is not None
        return cls(message_id=parsed, agent_id=agent_id, reason=reason)


CONSENT_LIMIT_DEFAULT = 100
CONSENT_LIMIT_MAX = 1000
CONSENT_PARAMETERS = frozenset({"limit"})


@dataclass(frozen=True)
class ConsentQuery:
    """An operator reading a user's consent history: the user from the path, `?limit=` (1-1000)."""

    user_id: uuid.UUID
    limit: int = CONSENT_LIMIT_DEFAULT

    @classmethod
    def parse(cls, user_id: str, query: Mapping[str, str]) -> ConsentQuery:
        bad = Errors()
        parsed = parse_uuid(user_id)
        if parsed is None:
            bad("userId", "must be a UUID")
        bad.unknown(dict(query), CONSENT_PARAMETERS)
        limit = _limit(bad, query.get("limit"), CONSENT_LIMIT_DEFAULT, CONSENT_LIMIT_MAX)
        bad.raise_any()
        assert parsed is not None
        return cls(user_id=parsed, limit=limit)


def _limit(bad: Errors, raw: str | None, default: int, maximum: int) -> int:
    """`?limit=`: an integer from 1 to `maximum`, `default` when absent."""
    if raw is None:
        return default
    text = raw.strip()
    # ASCII digits only, and few: int() of a 5000-digit string raises.
    limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else 0
    if not 1 <= limit <= maximum:
        bad("limit", f"must be an integer from 1 to {maximum}")
    return limit


LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 200
LIST_PARAMETERS = frozenset({"status", "agentId", "topic", "limit", "cursor"})
MESSAGE_STATUSES = ("queued", "sending", "sent", "failed", "superseded", "cancelled", "expired")


@dataclass(frozen=True)
class Cursor:
    """Where the next page of a listing starts: strictly after this row (newest first)."""

    created_at: datetime
    message_id: uuid.UUID

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), str(self.message_id)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor | None:
        """None for anything this class did not encode: the cursor is opaque to callers."""
        try:
            doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            at, message_id = doc
            created_at = datetime.fromisoformat(at)
            parsed = uuid.UUID(message_id)
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            return None
        # An instant without its offset would be read in the database's zone.
        return None if created_at.utcoffset() is None else cls(created_at, parsed)


@dataclass(frozen=True)
class ListQuery:
    """A listing of a user's messages: the user from the path; `status`, `agentId`, `topic`,
    `limit` and `cursor` (the previous page's nextCursor) from the query."""

    user_id: uuid.UUID
    limit: int = LIST_LIMIT_DEFAULT
    status: str | None = None
    agent_id: str | None = None
    topic_key: str | None = None
    after: Cursor | None = None

    @classmethod
    def parse(cls, user_id: str, query: Mapping[str, str]) -> ListQuery:
        bad = Errors()
        parsed = parse_uuid(user_id)
        if parsed is None:
            bad("userId", "must be a UUID")
        bad.unknown(dict(query), LIST_PARAMETERS)
        status = query.get("status")
        if status is not None and status not in MESSAGE_STATUSES:
            bad("status", f"must be one of {', '.join(MESSAGE_STATUSES)}")
        agent_id = _text(bad, "agentId", query.get("agentId"), MAX_AGENT_ID)
        topic_key = _text(bad, "topic", query.get("topic"), MAX_TOPIC_KEY)
        limit = _limit(bad, query.get("limit"), LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX)
        after = None if query.get("cursor") is None else Cursor.decode(query["cursor"])
        if query.get("cursor") is not None and after is None:
            bad("cursor", "must be a nextCursor this API answered")
        bad.raise_any()
        assert parsed is not None
        return cls(parsed, limit, status, agent_id, topic_key, after)


def _text(bad: Errors, name: str, value: str | None, max_length: int) -> str | None:
    if value is None:
        return None
    if not value.strip() or len(value) > max_length or text_problem(value):
        bad(name, f"must be a non-empty string of at most {max_length} characters")
        return None
    return value.strip()


def parse_task(body: Any) -> tuple[uuid.UUID, int | None]:
    """The deliver task's body: {"messageId": uuid, "generation": int (optional)}."""
    if not isinstance(body, dict):
        raise ValidationError([{"field": "body", "reason": "must be a JSON object"}])
    bad = Errors()
    message_id = parse_uuid(body.get("messageId"))
    if message_id is None:
        bad("messageId", "must be a UUID")
    generation = body.get("generation")
    if generation is not None and (
        not isinstance(generation, int) or isinstance(generation, bool) or generation < 0
    ):
        bad("generation", "must be a non-negative integer")
    bad.raise_any()
    assert message_id is not None
    return message_id, generation
