"""Settling a stale 'sending' claim with Twilio's record before anything is sent again: what Twilio
has is recorded; what it never got is queued again, due now, through the normal limit checks."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from shared import policy_rules as rules
from shared.domain import Policy, StoredMessage
from shared.errors import TransientSendError
from shared.log import event
from shared.models import StaleClaim
from shared.ports import SmsSender, Store, TaskQueue
from shared.service.common import Clock, log, wake

SENT, REQUEUED, DEFERRED = "sent", "requeued", "deferred"


def reconcile(
    claim: StaleClaim,
    *,
    store: Store,
    tasks: TaskQueue,
    sms: SmsSender,
    config: Policy,
    clock: Clock,
) -> str:
    """SENT (it went out: recorded with its sid), REQUEUED (it did not: queued again, due now) or
    DEFERRED (Twilio could not be asked: the claim is held for another lease)."""
    m = claim.message
    since = m.slot_at or m.updated_at or clock()
    fields: dict[str, Any] = {"userId": str(m.user_id), "agentId": m.agent_id, "reason": "reconcile"}
    try:
        if m.is_sequence:
            return _reconcile_sequence(
                claim, since, store=store, tasks=tasks, sms=sms, clock=clock, fields=fields
            )
        return _reconcile_single(claim, since, store=store, tasks=tasks, sms=sms, clock=clock, fields=fields)
    except TransientSendError as exc:
        event(
            log,
            logging.WARNING,
            "reconcile: Twilio unavailable; held for another lease",
            messageId=str(m.id),
            error=exc.message,
            **fields,
        )
        return DEFERRED


def _reconcile_single(
    claim: StaleClaim,
    since: datetime,
    *,
    store: Store,
    tasks: TaskQueue,
    sms: SmsSender,
    clock: Clock,
    fields: dict[str, Any],
) -> str:
    m = claim.message
    candidates = sms.find_sent(claim.phone_number, m.content, since=since)
    now = clock()
    for found in candidates:
        # Twilio's clock, kept within [claim, now]: skew must not move the send out of the window
        # in which it can have happened (nor out of the user's local day it counts on).
        sent_at = min(max(found.sent_at, since), now)
        # A sid another message already owns is that message's send, not this one's (same text to
        # the same number): record_sent refuses it and the next candidate is tried.
        if store.record_sent(
            m.id,
            claim.token,
            sid=found.sid,
            body=m.content,
            now=sent_at,
            local_date=rules.local_date(claim.timezone, sent_at),
            reconciled=True,
        ):
            _reconciled(m, "reconciled: Twilio had sent it; recorded", twilioMessageSid=found.sid, **fields)
            return SENT
    return _requeue(claim, store, tasks, now, "reconciled: Twilio never got it; queued again", fields)


def _reconcile_sequence(
    claim: StaleClaim,
    since: datetime,
    *,
    store: Store,
    tasks: TaskQueue,
    sms: SmsSender,
    clock: Clock,
    fields: dict[str, Any],
) -> str:
    """Each pending part Twilio has is recorded, in order, up to the first it has not; all sent →
    the message is sent; otherwise queued again and the rest follow (never a resend)."""
    m = claim.message
    recorded: list[int] = []
    for part in (p for p in m.parts if not p.sent):
        candidates = sms.find_sent(claim.phone_number, part.content, since=since)
        now = clock()
        if not any(
            store.record_part(m.id, claim.token, position=part.position, sid=found.sid, now=now)
            for found in candidates
        ):
            break
        recorded.append(part.position)
    now = clock()
    done = {p.position for p in m.parts if p.sent} | set(recorded)
    if len(done) == len(m.parts) and store.record_sent(
        m.id,
        claim.token,
        sid="",
        body=m.content,
        now=now,
        local_date=rules.local_date(claim.timezone, now),
        reconciled=True,
    ):
        _reconciled(
            m,
            "reconciled: Twilio had every part of the sequence; recorded",
            partsRecovered=recorded,
            **fields,
        )
        return SENT
    return _requeue(
        claim,
        store,
        tasks,
        now,
        "reconciled: the sequence stopped halfway, the remaining parts follow; queued again",
        fields,
        partsSent=sorted(done),
    )


def _reconciled(m: StoredMessage, text: str, **extra: Any) -> None:
    event(log, logging.WARNING, text, messageId=str(m.id), action="reconciled", outcome=SENT, **extra)


def _requeue(
    claim: StaleClaim,
    store: Store,
    tasks: TaskQueue,
    now: datetime,
    text: str,
    fields: dict[str, Any],
    **extra: Any,
) -> str:
    """Twilio never got (the rest of) it: queued again, due now, with a task."""
    m = claim.message
    generation = store.requeue_claim(m.id, claim.token, reason="reconciled_not_sent", now=now)
    if generation is not None:
        wake(tasks, m, generation, now, now)
    event(
        log,
        logging.WARNING,
        text,
        messageId=str(m.id),
        generation=generation,
        action="reconciled",
        outcome=REQUEUED,
        **extra,
        **fields,
    )
    return REQUEUED
