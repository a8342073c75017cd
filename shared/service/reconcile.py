"""Settling a stale 'sending' claim with Twilio's record before anything is sent again: what Twilio
has is recorded; what it never got is queued again, due now, through the normal limit checks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared import policy
from shared.domain import Policy
from shared.errors import TransientSendError
from shared.log import event
from shared.models import StaleClaim
from shared.policy import rules
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
    r = _Reconciliation(claim, store, tasks, sms, clock)
    try:
        return r.sequence() if claim.message.is_sequence else r.single()
    except TransientSendError as exc:
        event(
            log,
            logging.WARNING,
            "reconcile: Twilio unavailable; held for another lease",
            messageId=str(claim.message.id),
            error=exc.message,
            **r.fields,
        )
        return DEFERRED


@dataclass
class _Reconciliation:
    claim: StaleClaim
    store: Store
    tasks: TaskQueue
    sms: SmsSender
    clock: Clock

    def __post_init__(self) -> None:
        m = self.claim.message
        # The window in which the send can have happened starts with the claim.
        self.since = m.slot_at or m.updated_at or self.clock()
        self.fields: dict[str, Any] = {"userId": str(m.user_id), "agentId": m.agent_id, "reason": "reconcile"}

    def single(self) -> str:
        claim, m = self.claim, self.claim.message
        candidates = self.sms.find_sent(claim.phone_number, m.content, since=self.since)
        now = self.clock()
        for found in candidates:
            # Twilio's clock, kept within [claim, now]: skew must not move the send out of the window
            # in which it can have happened (nor out of the user's local day it counts on).
            sent_at = min(max(found.sent_at, self.since), now)
            # A sid another message already owns is that message's send, not this one's (same text
            # to the same number): record_sent refuses it and the next candidate is tried.
            if self._record_sent(found.sid, sent_at):
                self._reconciled("reconciled: Twilio had sent it; recorded", twilioMessageSid=found.sid)
                return SENT
        return self._requeue(now, "reconciled: Twilio never got it; queued again")

    def sequence(self) -> str:
        """Each pending part Twilio has is recorded, in order, up to the first it has not; all sent
        → the message is sent; otherwise queued again and the rest follow (never a resend)."""
        claim, m = self.claim, self.claim.message
        recorded: list[int] = []
        for part in (p for p in m.parts if not p.sent):
            candidates = self.sms.find_sent(claim.phone_number, part.content, since=self.since)
            now = self.clock()
            if not any(
                self.store.record_part(m.id, claim.token, position=part.position, sid=found.sid, now=now)
                for found in candidates
            ):
                break
            recorded.append(part.position)
        now = self.clock()
        done = {p.position for p in m.parts if p.sent} | set(recorded)
        if len(done) == len(m.parts) and self._record_sent("", now):
            self._reconciled(
                "reconciled: Twilio had every part of the sequence; recorded", partsRecovered=recorded
            )
            return SENT
        return self._requeue(
            now,
            "reconciled: the sequence stopped halfway, the remaining parts follow; queued again",
            partsSent=sorted(done),
        )

    def _record_sent(self, sid: str, at: datetime) -> bool:
        claim = self.claim
        return self.store.record_sent(
            claim.message.id,
            claim.token,
            sid=sid,
            body=claim.message.content,
            now=at,
            local_date=self._local_date(at),
            reconciled=True,
        )

    def _local_date(self, at: datetime) -> str:
        """The day the send counts on. Twilio has the message, so it is recorded whatever the
        user's stored timezone says: for a timezone that is not an IANA name (set by hand, say) on
        the UTC date, rather than failing the reconciliation on every sweep and never recording a
        send the user got (the user's next messages fail with invalid_timezone at delivery)."""
        if policy.is_timezone(self.claim.timezone):
            return rules.local_date(self.claim.timezone, at)
        event(
            log,
            logging.WARNING,
            "reconcile: the user's timezone is unknown; the send counts on the UTC date",
            messageId=str(self.claim.message.id),
            timezone=self.claim.timezone,
            **self.fields | {"reason": "invalid_timezone"},
        )
        return at.astimezone(UTC).date().isoformat()

    def _reconciled(self, text: str, **extra: Any) -> None:
        m = self.claim.message
        event(
            log,
            logging.WARNING,
            text,
            messageId=str(m.id),
            action="reconciled",
            outcome=SENT,
            **extra,
            **self.fields,
        )

    def _requeue(self, now: datetime, text: str, **extra: Any) -> str:
        """Twilio never got (the rest of) it: queued again, due now, with a task."""
        m = self.claim.message
        generation = self.store.requeue_claim(m.id, self.claim.token, reason="reconciled_not_sent", now=now)
        if generation is not None:
            wake(self.tasks, m, generation, now, now)
        event(
            log,
            logging.WARNING,
            text,
            messageId=str(m.id),
            generation=generation,
            action="reconciled",
            outcome=REQUEUED,
            **extra,
            **self.fields,
        )
        return REQUEUED
