"""Conversations: Twilio's webhooks (an SMS from a user, a delivery receipt) and the event outbox
that tells agents about them."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from typing import Any

from shared import compliance
from shared.errors import Unavailable
from shared.log import event
from shared.ports import EventPublisher, Store
from shared.service.common import Clock, log
from shared.twilio_forms import InboundSms, StatusCallback, reply_keyword


def inbound(form: dict[str, str], *, store: Store, now: datetime) -> dict[str, Any]:
    """An SMS from a user: recorded once per MessageSid; an opt-out keyword or revocation phrase
    opts them out (and cancels what is queued for them), an opt-in keyword back in, each with its
    consent ledger row; the inbound_message event, raw text included, goes to the outbox. The
    answer carries `keyword` (stop/start/help or None) even for a repeated webhook, so the same
    reply can be given again."""
    sms = InboundSms.parse(form)
    reply = reply_keyword(sms.body)
    word = reply.keyword if reply else None
    result = store.inbound(
        sms.from_number,
        sms.body,
        sms.sid,
        keyword=word,
        source=reply.source if reply else None,
        num_media=sms.num_media,
        now=now,
    )
    derived = compliance.timezone_for(sms.from_number)
    if derived and result.get("userId") and not result.get("duplicate"):
        # A user created by this SMS has no timezone yet: the number's, if it names one zone.
        store.set_timezone(
            uuid.UUID(str(result["userId"])), derived, source="phone_number", now=now, only_if_unknown=True
        )
    event(
        log,
        logging.INFO,
        "inbound: duplicate webhook ignored"
        if result.get("duplicate")
        else f"inbound: recorded ({word or 'message'})",
        userId=result.get("userId"),
        twilioMessageSid=sms.sid,
        reason=word,
        source=reply.source if reply else None,
        cancelled=result.get("cancelled"),
        optedOut=result.get("optedOut"),
    )
    return result | {"keyword": word}


def status_callback(form: dict[str, str], *, store: Store, now: datetime) -> dict[str, Any]:
    """Twilio's delivery receipt: the outbound message's status moves forward, never back."""
    cb = StatusCallback.parse(form)
    result = store.status_callback(cb.sid, cb.status, cb.error_code, now)
    if not result.get("known"):
        event(
            log,
            logging.WARNING,
            "status callback for an unknown sid",
            twilioMessageSid=cb.sid,
            reason=cb.status,
        )
    else:
        event(
            log,
            logging.INFO,
            f"status callback: {cb.status}" + ("" if result.get("changed") else " (no change)"),
            twilioMessageSid=cb.sid,
            reason=cb.status,
            errorCode=cb.error_code,
            cancelled=result.get("cancelled"),
        )
    return result


def drain_events(
    *, store: Store, publisher: EventPublisher | None, clock: Clock, limit: int = 100, lease_seconds: int = 30
) -> tuple[int, int]:
    """Publish what waits in the outbox; (published, failed). A failure leaves the event for the next
    drain (the sweep drains every minute), so Pub/Sub trouble never loses or blocks anything."""
    if publisher is None:
        return 0, 0
    pending = store.events_pending(limit, lease_seconds=lease_seconds, now=clock())
    done: list[int] = []
    failed: list[int] = []
    error = ""
    for e in pending:
        data = json.dumps({"eventType": e.event_type, **e.payload}, default=str).encode()
        try:
            publisher.publish(e.topic, data, e.attributes)
        except Unavailable as exc:
            failed.append(e.id)
            error = exc.message
            continue
        done.append(e.id)
    if done:
        store.events_published(done, clock())
    if failed:
        store.events_failed(failed, error, clock())
        event(
            log,
            logging.WARNING,
            "events: publish failed; kept for the next drain",
            failed=len(failed),
            error=error,
        )
    return len(done), len(failed)
