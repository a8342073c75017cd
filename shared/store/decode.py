"""Decode the jsonb shapes the SQL functions return into domain types, whichever driver carried them."""

from __future__ import annotations

import uuid
from datetime import datetime, time
from typing import Any

from shared import segments
from shared.domain import History, Part, Reservation, Segments, StoredMessage, TimelineEntry, UserSettings
from shared.errors import AgentRateLimited, NotFound, StoreError, UserQueueFull, ValidationError
from shared.models import (
    CancelResult,
    Claim,
    ConsentEvent,
    ConsentHistory,
    DeliveryContext,
    EnqueueResult,
    PendingEvent,
    QueueHealth,
    StaleClaim,
    TaskRef,
    Turn,
    UserContext,
)


def instant(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _required_instant(value: Any) -> datetime:
    parsed = instant(value)
    if parsed is None:
        raise ValueError("missing timestamp")
    return parsed


def _time(value: Any) -> time | None:
    return None if value is None else time.fromisoformat(str(value))


def _uuid(value: Any) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(str(value))


def _segments(doc: dict[str, Any]) -> Segments | None:
    """A row's (or part's) `encoding` and `segments` columns; None before its text was counted."""
    if doc.get("segments") is None or doc.get("encoding") is None:
        return None
    return Segments(encoding=str(doc["encoding"]), count=int(doc["segments"]))


def segments_args(counted: Segments | None) -> dict[str, Any]:
    """The `encoding` and `segments` arguments that store a text's count (null: no text yet)."""
    if counted is None or counted.count == 0:
        return {"encoding": None, "segments": None}
    return {"encoding": counted.encoding, "segments": counted.count}


def _part(p: dict[str, Any]) -> Part:
    return Part(
        position=int(p["position"]),
        content=str(p["content"]),
        delay_seconds=int(p.get("delay_seconds") or 0),
        status=str(p.get("status") or "pending"),
        twilio_message_sid=p.get("twilio_message_sid"),
        sent_at=instant(p.get("sent_at")),
        data=dict(p["data"]) if isinstance(p.get("data"), dict) else None,
        segments=_segments(p),
    )


def _content(row: dict[str, Any], data: Any) -> str:
    """The text to send: the final (rendered) message, else the agent's own messageData content."""
    return row.get("final_message") or (data.get("content") if isinstance(data, dict) else None) or ""


def _delivery(doc: dict[str, Any]) -> dict[str, Any]:
    """What Twilio's receipts said (mq_get only), as StoredMessage's fields."""
    return {
        "delivery_status": doc.get("status"),
        "delivered_at": instant(doc.get("delivered_at")),
        "delivery_error_code": doc.get("error_code"),
    }


def _first_answer(row: dict[str, Any]) -> dict[str, Any]:
    """What the schedule answer said (a replay answers it again): blockedBy, superseded ids."""
    return {
        "blocked_by": tuple(str(b) for b in row.get("blocked_by") or ()),
        "superseded_ids": tuple(uuid.UUID(str(s)) for s in row.get("superseded_ids") or ()),
    }


def _timeline(entries: list[dict[str, Any]]) -> tuple[TimelineEntry, ...]:
    return tuple(
        TimelineEntry(
            at=_required_instant(e["at"]),
            action=str(e["action"]),
            output=dict(e.get("output") or {}),
            error=e.get("error"),
        )
        for e in entries
    )


def message(row: dict[str, Any]) -> StoredMessage:
    data = row.get("message_data") or {}
    return StoredMessage(
        id=uuid.UUID(str(row["id"])),
        user_id=uuid.UUID(str(row["user_id"])),
        agent_id=row["agent_id"],
        status=row["status"],
        priority=row["priority"],
        content=_content(row, data),
        scheduled_for=_required_instant(row["scheduled_for"]),
        can_delay=bool(row.get("can_delay", True)),
        generation=int(row.get("task_generation") or 0),
        attempts=int(row.get("attempts") or 0),
        reason=row.get("reason"),
        last_error=row.get("last_error"),
        expires_at=instant(row.get("expires_at")),
        sent_at=instant(row.get("sent_at")),
        twilio_message_sid=row.get("twilio_message_sid"),
        conversation_id=_uuid(row.get("conversation_context_id")),
        created_at=instant(row.get("created_at")),
        updated_at=instant(row.get("updated_at")),
        request_hash=row.get("request_hash"),
        claim_token=_uuid(row.get("claim_token")),
        slot_at=instant(row.get("slot_at")),
        lease_expires_at=instant(row.get("lease_expires_at")),
        topic_key=row.get("topic_key"),
        parts=tuple(_part(p) for p in sorted(row.get("parts") or [], key=lambda p: int(p["position"]))),
        superseded_by=_uuid(row.get("superseded_by_message_id")),
        message_data=dict(data) if isinstance(data, dict) else {},
        requires_fresh_context=bool(row.get("requires_fresh_context")),
        render_attempts=int(row.get("render_attempts") or 0),
        transactional=bool(row.get("transactional")),
        **_delivery(row.get("delivery") or {}),
        timeline=_timeline(row.get("timeline") or []),
        segments=_segments(row),
        **_first_answer(row),
    )


def user_settings(row: dict[str, Any]) -> UserSettings:
    return UserSettings(
        timezone=row.get("timezone") or "UTC",
        quiet_hours_start=_time(row.get("quiet_hours_start")),
        quiet_hours_end=_time(row.get("quiet_hours_end")),
        quiet_hours_enabled=bool(row.get("quiet_hours_enabled", True)),
        daily_limit=row.get("daily_limit"),
        hourly_limit=row.get("hourly_limit"),
        opted_out=row.get("opted_out_at") is not None,
        undeliverable=row.get("undeliverable_at") is not None,
        notifications_enabled=bool(row.get("notifications_enabled", True)),
        preferred_days=None
        if row.get("preferred_days") is None
        else frozenset(int(d) for d in row["preferred_days"]),
        preferred_start=_time(row.get("preferred_window_start")),
        preferred_end=_time(row.get("preferred_window_end")),
        weekly_limit=row.get("weekly_limit"),
        timezone_source=row.get("timezone_source") or "user",
    )


def refused(doc: dict[str, Any] | None) -> None:
    """Raise the admission refusal mq_admission answered, if it did."""
    if not doc:
        return
    if doc.get("error") == "user_queue_full":
        raise UserQueueFull(
            f"the user has {doc['queued']} messages queued, the most allowed is {doc['limit']}",
            queued=int(doc["queued"]),
            limit=int(doc["limit"]),
        )
    if doc.get("error") == "agent_rate_limited":
        raise AgentRateLimited(
            f"this agent may schedule at most {doc['limit']} messages a minute",
            retry_after=int(doc["retryAfterSeconds"]),
            limit=int(doc["limit"]),
        )
    raise StoreError(f"unknown admission refusal {doc!r}")


def user_context(doc: dict[str, Any] | None) -> UserContext | None:
    if not doc:
        return None
    refused(doc.get("refused"))
    user = doc["user"]
    history = History(
        sends=[_required_instant(s) for s in doc.get("sends") or []],
        reservations=[
            Reservation(at=_required_instant(r["at"]), priority=r["priority"])
            for r in doc.get("reservations") or []
        ],
        last_inbound_at=instant(doc.get("last_inbound_at")),
        topic_sends=[_required_instant(s) for s in doc.get("topic_sends") or []],
        topic_reservations=[_required_instant(s) for s in doc.get("topic_reservations") or []],
    )
    return UserContext(
        user_id=uuid.UUID(str(user["id"])),
        phone_number=user["phone_number"],
        settings=user_settings(user),
        history=history,
        replay=message(doc["replay"]) if doc.get("replay") else None,
    )


def delivery_context(doc: dict[str, Any] | None) -> DeliveryContext | None:
    if not doc:
        return None
    ctx = user_context(doc.get("context"))
    if ctx is None:
        return None
    return DeliveryContext(message=message(doc["message"]), user=ctx)


def claim(doc: dict[str, Any]) -> Claim:
    return Claim(
        claimed=bool(doc.get("claimed")),
        reason=str(doc.get("reason")),
        token=_uuid(doc.get("token")),
        status=doc.get("status"),
        attempts=int(doc.get("attempts") or 0),
        retry_at=instant(doc.get("retry_at")),
    )


def enqueue_result(doc: dict[str, Any]) -> EnqueueResult:
    error = doc.get("error")
    if error == "refused":
        refused(doc["refused"])
    if error == "unknown_user":
        raise NotFound("no such user", field="userId")
    if error == "unknown_conversation":
        raise ValidationError([{"field": "conversationId", "reason": "no such conversation for this user"}])
    stored = message(doc["message"])
    return EnqueueResult(
        message=stored,
        created=bool(doc.get("created")),
        request_hash=stored.request_hash,
        superseded=tuple(uuid.UUID(str(s)) for s in doc.get("superseded") or []),
    )


def turns(doc: Any) -> list[Turn]:
    return [
        Turn(
            direction=str(d["direction"]), content=str(d.get("content") or ""), at=_required_instant(d["at"])
        )
        for d in doc or []
    ]


def render_failed(doc: dict[str, Any]) -> tuple[str, int]:
    return str(doc.get("status")), int(doc.get("attempts") or 0)


def parts_param(parts: tuple[Part, ...]) -> list[dict[str, Any]] | None:
    """A sequence's parts as mq_enqueue takes them (in position order), None for a single message."""
    if not parts:
        return None
    return [
        {"content": p.content, "delay_seconds": p.delay_seconds}
        | ({"data": p.data} if p.data is not None else {})
        | (segments_args(segments.count(p.content)) if p.content else {})
        for p in parts
    ]


def cancel_result(doc: dict[str, Any]) -> CancelResult:
    error = doc.get("error")
    if error == "not_found":
        raise NotFound("no such message", field="messageId")
    row = doc.get("message")
    return CancelResult(
        cancelled=bool(doc.get("cancelled")),
        already=bool(doc.get("already")),
        error=error,
        status=doc.get("status"),
        message=None if row is None else message(row),
    )


def release_status(doc: Any) -> str:
    """mq_release answers the message's status after the release; NULL means no such message."""
    if doc is None:
        raise NotFound("no such message", field="messageId")
    return str(doc)


def task_refs(doc: Any) -> list[TaskRef]:
    return [
        TaskRef(
            message_id=uuid.UUID(str(d["id"])),
            generation=int(d["generation"]),
            scheduled_for=_required_instant(d["scheduled_for"]),
        )
        for d in doc or []
    ]


def stale_claims(doc: Any) -> list[StaleClaim]:
    claims = []
    for d in doc or []:
        m = message(d["message"])
        assert m.claim_token is not None
        claims.append(
            StaleClaim(message=m, token=m.claim_token, phone_number=d["phone_number"], timezone=d["timezone"])
        )
    return claims


def health(doc: dict[str, Any]) -> QueueHealth:
    last = doc.get("last_sweep") or {}
    return QueueHealth(
        queued=int(doc.get("queued") or 0),
        sending=int(doc.get("sending") or 0),
        sent_24h=int(doc.get("sent_24h") or 0),
        last_sweep_at=instant(last.get("finished_at")),
        last_sweep_counts=dict(last.get("counts") or {}),
        oldest_overdue_at=instant(doc.get("oldest_overdue_at")),
    )


def pending_events(doc: Any) -> list[PendingEvent]:
    return [
        PendingEvent(
            id=int(d["id"]),
            topic=str(d["topic"]),
            event_type=str(d["event_type"]),
            payload=dict(d.get("payload") or {}),
            attributes={str(k): str(v) for k, v in (d.get("attributes") or {}).items()},
        )
        for d in doc or []
    ]


def consent_history(doc: dict[str, Any] | None) -> ConsentHistory | None:
    if not doc:
        return None
    return ConsentHistory(
        user_id=uuid.UUID(str(doc["user_id"])),
        opted_out_at=instant(doc.get("opted_out_at")),
        events=tuple(
            ConsentEvent(
                id=int(e["id"]),
                event=str(e["event"]),
                source=str(e["source"]),
                occurred_at=_required_instant(e["occurred_at"]),
                raw_text=e.get("raw_text"),
                message_sid=e.get("message_sid"),
                created_at=_required_instant(e["created_at"]),
            )
            for e in doc.get("events") or []
        ),
    )
