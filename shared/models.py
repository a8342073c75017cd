"""Response, store and use-case types, and the validation of a structured messageData.

What agents and Twilio send us is parsed in shared/parsing.py, which imports this module; this
module imports it only for type checking (NewMessage holds a ScheduleRequest).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared import segments
from shared.domain import Admission, History, Part, Segments, StoredMessage, UserSettings

if TYPE_CHECKING:
    from shared.parsing import ScheduleRequest


def iso(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with millisecond precision, as agents and the seed's API expect."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


STYLES = ("supportive", "snarky", "chaotic", "neutral")
DEFAULT_STYLE = "neutral"
MAX_TYPE_LENGTH = 100
MAX_STRUCTURED_SIZE = 4000


@dataclass(frozen=True)
class Turn:
    """One message of the conversation, oldest first."""

    direction: str  # "inbound" (from the user) | "outbound" (from us)
    content: str
    at: datetime


@dataclass(frozen=True)
class Usage:
    """What one model call cost, for agent_actions_log."""

    model: str  # "template" for the template renderer
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    latency_ms: int = 0
    cost_usd: float = 0.0

    def to_log(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "cacheCreationInputTokens": self.cache_creation_input_tokens,
            "cacheReadInputTokens": self.cache_read_input_tokens,
            "latencyMs": self.latency_ms,
            "costUsd": self.cost_usd,
        }


@dataclass(frozen=True)
class Rendered:
    text: str  # the SMS text: never empty, at most max_length characters, never raw JSON
    usage: Usage


@dataclass(frozen=True)
class Relevance:
    relevant: bool
    reason: str  # a short explanation, at most MAX_REASON_LENGTH characters
    usage: Usage


def validate_structured(message_data: Mapping[str, Any]) -> list[dict[str, str]]:
    """Errors (`[{"field": "messageData.type", "reason": ...}]`) of a structured messageData; [] if valid.

    `type` is required (a non-empty string, at most 100 characters); `style` is optional, one of STYLES;
    every other key is a free-form field of any JSON, the whole object at most 4000 characters as JSON.
    """
    if not isinstance(message_data, Mapping):
        return [{"field": "messageData", "reason": "must be an object"}]
    errors: list[dict[str, str]] = []
    kind = message_data.get("type")
    if not isinstance(kind, str) or not kind.strip():
        errors.append(
            {
                "field": "messageData.type",
                "reason": "is required: a non-empty string (or give messageData.content, the finished text)",
            }
        )
    elif len(kind) > MAX_TYPE_LENGTH:
        errors.append({"field": "messageData.type", "reason": f"at most {MAX_TYPE_LENGTH} characters"})
    style = message_data.get("style")
    if style is not None and style not in STYLES:
        errors.append({"field": "messageData.style", "reason": f"must be one of {', '.join(STYLES)}"})
    if "content" in message_data and not isinstance(message_data["content"], str):
        # A non-string content is more likely a mistake than a field meant for the renderer.
        errors.append({"field": "messageData.content", "reason": "must be a string when present"})
    try:
        size = len(json.dumps(message_data, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError):
        errors.append({"field": "messageData", "reason": "must be plain JSON"})
    else:
        if size > MAX_STRUCTURED_SIZE:
            errors.append(
                {"field": "messageData", "reason": f"at most {MAX_STRUCTURED_SIZE} characters as JSON"}
            )
    return errors


@dataclass(frozen=True)
class UserContext:
    """A user as the policy sees them, loaded in one round trip."""

    user_id: uuid.UUID
    phone_number: str
    settings: UserSettings
    history: History
    # The message this agent already stored under the request's idempotency key, if asked for
    # (then history is left empty: a replay plans nothing).
    replay: StoredMessage | None = None


@dataclass(frozen=True)
class NewMessage:
    """A validated message ready to be stored with its planned time."""

    request: ScheduleRequest
    scheduled_for: datetime
    reason: str
    now: datetime
    rendered: str | None = None  # the text rendered at schedule time, for structured messageData
    rendered_parts: tuple[Part, ...] | None = None  # a sequence's parts after schedule-time rendering
    admission: Admission | None = None  # the limits it is stored under (None: none)
    blocked_by: tuple[str, ...] = ()  # the plan's rules met on the way, stored for a replay's answer

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.rendered_parts if self.rendered_parts is not None else self.request.parts

    @property
    def final_message(self) -> str | None:
        if self.parts:
            return "\n".join(p.content for p in self.parts if p.content) or None
        return self.rendered or self.request.content or None

    @property
    def segments(self) -> Segments | None:
        """Of a single message's text to send; None while it is still to render, and for a
        sequence, whose parts are counted one by one (the database sums them)."""
        text = None if self.parts else self.final_message
        return segments.count(text) if text else None


@dataclass(frozen=True)
class EnqueueResult:
    message: StoredMessage
    created: bool  # False: an earlier request with the same idempotency key
    request_hash: str | None = None
    superseded: tuple[uuid.UUID, ...] = ()


@dataclass(frozen=True)
class CancelResult:
    cancelled: bool
    already: bool = False
    error: str | None = None  # not_owner | not_queued
    status: str | None = None
    message: StoredMessage | None = None


@dataclass(frozen=True)
class DeliveryContext:
    """Everything deliver needs, loaded in one round trip."""

    message: StoredMessage
    user: UserContext


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to claim a message for sending under the user's lock."""

    claimed: bool
    reason: str  # "ok" when claimed; otherwise a policy reason or the row's state
    token: uuid.UUID | None = None
    status: str | None = None
    attempts: int = 0
    retry_at: datetime | None = None  # account-wide caps: the earliest instant that can allow it


@dataclass(frozen=True)
class Outcome:
    """What a delivery attempt did, for the HTTP answer and the logs."""

    message_id: uuid.UUID
    action: str  # sent | deferred | skipped | failed | retry
    reason: str
    status: str
    scheduled_for: datetime | None = None
    sid: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SentRecord:
    """A message the SMS provider has on record (for reconciliation)."""

    sid: str
    sent_at: datetime


@dataclass(frozen=True)
class TaskRef:
    """A queued message that needs a (new) Cloud Task."""

    message_id: uuid.UUID
    generation: int
    scheduled_for: datetime


@dataclass(frozen=True)
class StaleClaim:
    """A 'sending' row whose lease ran out, re-claimed (new token) for reconciliation."""

    message: StoredMessage
    token: uuid.UUID
    phone_number: str
    timezone: str


@dataclass(frozen=True)
class QueueHealth:
    queued: int
    sending: int
    sent_24h: int
    last_sweep_at: datetime | None
    last_sweep_counts: dict[str, Any]
    oldest_overdue_at: datetime | None


@dataclass
class SweepReport:
    """What one sweep did, for the sweep_runs row, the logs and process_queue's answer."""

    expired: int = 0
    reconciled_sent: int = 0
    reconciled_requeued: int = 0
    reconcile_deferred: int = 0
    overdue_requeued: int = 0
    horizon_tasked: int = 0
    task_errors: int = 0
    events_published: int = 0
    events_failed: int = 0
    row_errors: int = 0  # rows (messages, events) whose step raised: isolated, the batch went on
    batches: int = 0

    def counts(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PendingEvent:
    """An event from the outbox, leased for publishing."""

    id: int
    topic: str  # logical: "events" or "inbound"
    event_type: str
    payload: dict[str, Any]
    attributes: dict[str, str]


@dataclass(frozen=True)
class ConsentEvent:
    """One row of the consent ledger (consent_events)."""

    id: int
    event: str  # opt_in | opt_out | help
    source: str  # keyword | phrase | api | twilio_21610 | operator
    occurred_at: datetime
    raw_text: str | None
    message_sid: str | None
    created_at: datetime


@dataclass(frozen=True)
class ConsentHistory:
    """A user's consent: opted out now (since when), and the ledger, newest first."""

    user_id: uuid.UUID
    opted_out_at: datetime | None
    events: tuple[ConsentEvent, ...]


@dataclass(frozen=True)
class MessageFilter:
    """Which of a user's messages a listing answers: only `agent_ids` (None: every agent), and
    only the status, agent and topic given; `before`: strictly older than that (created_at, id)."""

    agent_ids: frozenset[str] | None
    status: str | None = None
    agent_id: str | None = None
    topic_key: str | None = None
    before: tuple[datetime, uuid.UUID] | None = None
