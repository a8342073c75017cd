"""The small requests, parsed at the edge like a schedule request (shared/parsing.py, whose Errors
collector and field parsers they use): an agent's cancel, an operator's consent-history query, and
the deliver task's body."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import ValidationError
from shared.parsing import Errors, parse_uuid, text_problem

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
        raw = query.get("limit")
        limit = CONSENT_LIMIT_DEFAULT
        if raw is not None:
            text = raw.strip()
            # ASCII digits only, and few: int() of a 5000-digit string raises.
            limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else 0
            if not 1 <= limit <= CONSENT_LIMIT_MAX:
                bad("limit", f"must be an integer from 1 to {CONSENT_LIMIT_MAX}")
        bad.raise_any()
        assert parsed is not None
        return cls(user_id=parsed, limit=limit)


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
