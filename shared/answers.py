"""The JSON answers of the HTTP functions: a stored message, a schedule result, the health
document, a consent history. shared/web.py sends them; openapi.yaml describes each shape."""

from __future__ import annotations

from typing import Any

from shared import policy, service
from shared.domain import Segments, StoredMessage
from shared.models import CancelResult, ConsentHistory, iso


def segments_json(s: Segments | None) -> dict[str, Any]:
    """`encoding` (GSM-7 | UCS-2) and `segments` of a text; both null before it has one."""
    return {"encoding": s.encoding if s else None, "segments": s.count if s else None}


def message_json(m: StoredMessage) -> dict[str, Any]:
    """A stored message as agents read it (GET /messages/<id>, cancel)."""
    return {
        "messageId": str(m.id),
        "userId": str(m.user_id),
        "agentId": m.agent_id,
        "status": m.status,
        "priority": m.priority,
        "scheduledFor": iso(m.scheduled_for),
        "sentAt": iso(m.sent_at),
        "reason": m.reason,
        "explanation": policy.REASONS.get(m.reason) if m.reason else None,
        "lastError": m.last_error,
        "attempts": m.attempts,
        "expiresAt": iso(m.expires_at),
        "twilioMessageSid": m.twilio_message_sid,
        "deliveryStatus": m.delivery_status,
        "deliveredAt": iso(m.delivered_at),
        "deliveryErrorCode": m.delivery_error_code,
        "topicKey": m.topic_key,
        "supersededBy": str(m.superseded_by) if m.superseded_by else None,
        **segments_json(m.segments),  # a sequence: the parts' total
        "parts": [
            {
                "position": p.position,
                "content": p.content,
                "delaySeconds": p.delay_seconds,
                "status": p.status,
                "twilioMessageSid": p.twilio_message_sid,
                "sentAt": iso(p.sent_at),
                **segments_json(p.segments),
            }
            for p in m.parts
        ]
        or None,
    }


def cancel_json(result: CancelResult) -> dict[str, Any]:
    """The answer to a cancel: the message, and the reason its agent gave (stored as `lastError`),
    the first cancel's when it was cancelled before; null if none was given or the message was
    cancelled by something else (an opt-out: `reason` says what)."""
    m = result.message
    assert m is not None
    return {
        "success": True,
        "alreadyCancelled": result.already,
        **message_json(m),
        "cancelReason": m.last_error if m.reason == "cancelled" else None,
    }


def page_json(page: service.MessagePage) -> dict[str, Any]:
    """One page of a user's messages (GET /users/<id>/messages), newest first."""
    return {
        "userId": page.user_id,
        "messages": [message_json(m) for m in page.messages],
        "nextCursor": page.next_cursor,
    }


def consent_json(history: ConsentHistory) -> dict[str, Any]:
    """A user's consent history as operators read it (GET /users/<id>/consent)."""
    return {
        "userId": str(history.user_id),
        "optedOut": history.opted_out_at is not None,
        "optedOutAt": iso(history.opted_out_at),
        "events": [
            {
                "id": e.id,
                "event": e.event,
                "source": e.source,
                "occurredAt": iso(e.occurred_at),
                "rawText": e.raw_text,
                "messageSid": e.message_sid,
                "recordedAt": iso(e.created_at),
            }
            for e in history.events
        ],
    }


def timeline_json(m: StoredMessage) -> list[dict[str, Any]]:
    """The message's decisions, oldest first: what happened, when, and why (GET /messages/<id>)."""
    entries = []
    for e in m.timeline:
        reason = e.output.get("reason")
        entries.append(
            {
                "at": iso(e.at),
                "action": e.action,
                "reason": reason,
                "explanation": policy.REASONS.get(reason) if isinstance(reason, str) else None,
                "scheduledFor": e.output.get("scheduledFor"),
                "twilioMessageSid": e.output.get("twilioMessageSid"),
                "error": e.error,
                "details": dict(e.output),
            }
        )
    return entries


def schedule_body(result: service.ScheduleResult) -> dict[str, Any]:
    """The answer to a schedule request (201 created, 200 an idempotent replay)."""
    m = result.message
    return {
        "success": True,
        "messageId": str(m.id),
        "status": m.status,
        "scheduledFor": iso(m.scheduled_for),
        "reason": m.reason,
        "explanation": policy.REASONS.get(m.reason or "", m.reason),
        "blockedBy": list(result.blocked_by),
        "priority": m.priority,
        "idempotentReplay": not result.created,
        "parts": len(m.parts) or None,
        "topicKey": m.topic_key,
        "superseded": [str(s) for s in result.superseded],
        **segments_json(m.segments),  # a sequence: the parts' total
    }


def health_answer(report: service.HealthReport) -> tuple[int, dict[str, Any]]:
    """The seed's health document: 200 healthy, 503 with the reason when not."""
    body: dict[str, Any] = {
        "status": "healthy",
        "service": "message-orchestrator",
        "timestamp": iso(report.now),
    }
    h = report.queue
    if h is not None:
        overdue = (report.now - h.oldest_overdue_at).total_seconds() if h.oldest_overdue_at else 0.0
        body["stats"] = {
            "messagesQueued": h.queued,
            "messagesSending": h.sending,
            "messagesProcessed": h.sent_24h,
            "lastProcessTime": iso(h.last_sweep_at),
            "lastSweep": h.last_sweep_counts,
            "oldestOverdueSeconds": max(0.0, overdue),
            "processorRunning": report.problem is None,
        }
    if report.problem is not None:
        return 503, body | {"status": "unhealthy", "reason": report.problem}
    return 200, body
