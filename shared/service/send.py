"""Sending a claimed message through the SMS provider and recording it: a single SMS, or the parts
of a sequence in order. Both share one error path: a permanent refusal fails the message; a
transient failure before anything went out gives the claim back; anything that may have gone out
keeps the claim for reconciliation, so nothing is ever sent twice."""

from __future__ import annotations

import logging
import time as _time
import uuid
from collections.abc import Callable
from datetime import timedelta
from functools import partial

from shared.domain import FAILED, SENDING, Part
from shared.errors import PermanentSendError, RecipientOptedOut, StoreUnavailable, TransientSendError
from shared.log import event
from shared.models import Outcome, iso
from shared.policy import OPTED_OUT, rules
from shared.service.attempt import DeliveryAttempt
from shared.service.common import log

# record_sent is retried briefly: the SMS is already out, and losing that fact is the worst outcome.
RECORD_RETRY_DELAYS = (0.2, 0.5, 1.0)


def send(a: DeliveryAttempt, token: uuid.UUID, attempts: int) -> Outcome:
    """Send what `a` claimed (`token`, its `attempts`-th claim) and record it."""
    if a.message.is_sequence:
        return _send_sequence(a, token, attempts)
    return _send_single(a, token, attempts)


def _send_single(a: DeliveryAttempt, token: uuid.UUID, attempts: int) -> Outcome:
    m = a.message
    try:
        sid = a.sms.send(a.ctx.user.phone_number, m.content, message_id=m.id)
    except (PermanentSendError, TransientSendError) as exc:
        return _send_failed(a, exc, token, attempts, started=False, part=None)
    return _sent(a, token, attempts, sid)


def _send_sequence(a: DeliveryAttempt, token: uuid.UUID, attempts: int) -> Outcome:
    """The parts of a claimed sequence, in position order, each recorded as soon as Twilio takes it.

    The claim is one slot for the whole sequence. A part already sent (an earlier attempt that
    failed halfway) is skipped, never resent. A failure after the first part keeps the claim and
    its slot and hands the rest to reconciliation: it records what Twilio has, then queues the
    message again so the remaining parts follow.
    """
    m = a.message
    a.fields = {**a.fields, "parts": len(m.parts)}
    pending = [p for p in m.parts if not p.sent]
    started = len(pending) < len(m.parts)
    last_sid = next((p.twilio_message_sid for p in reversed(m.parts) if p.sent), None)
    for i, part in enumerate(pending):
        if i and part.delay_seconds:
            a.sleep(part.delay_seconds)
        try:
            sid = a.sms.send(a.ctx.user.phone_number, part.content, message_id=m.id)
        except (PermanentSendError, TransientSendError) as exc:
            return _send_failed(a, exc, token, attempts, started=started, part=part)
        started, last_sid = True, sid
        record = partial(a.store.record_part, m.id, token, position=part.position, sid=sid, now=a.clock())
        if not _record(a, sid, record):
            # Someone else holds the row now (a reconciler after a lapsed lease): stop; it settles it.
            return a.answer(logging.WARNING, "skipped", "claim_lost", SENDING, sid=sid, part=part.position)
    assert last_sid is not None
    return _sent(a, token, attempts, last_sid)


def _sent(a: DeliveryAttempt, token: uuid.UUID, attempts: int, sid: str) -> Outcome:
    """The whole message went out: recorded as sent (a sequence under its last part's sid)."""
    m = a.message
    sent_at = a.clock()
    local_date = rules.local_date(a.ctx.user.settings.timezone, sent_at)
    record = partial(
        a.store.record_sent, m.id, token, sid=sid, body=m.content, now=sent_at, local_date=local_date
    )
    _record(a, sid, record)
    return a.answer(logging.INFO, "sent", "ok", "sent", sid=sid, attempts=attempts, sentAt=iso(sent_at))


def _record(a: DeliveryAttempt, sid: str, fn: Callable[[], bool]) -> bool:
    """Record a send Twilio accepted, retried briefly: losing that fact is the worst outcome."""
    for delay in (*RECORD_RETRY_DELAYS, None):
        try:
            return fn()
        except StoreUnavailable:
            if delay is None:
                # The SMS went out; the row stays 'sending' and the sweep reconciles it by sid.
                event(
                    log,
                    logging.CRITICAL,
                    "sent but not recorded: database unavailable",
                    messageId=str(a.message.id),
                    twilioMessageSid=sid,
                    reason="record_failed",
                    **a.fields,
                )
                raise
            _time.sleep(delay)
    return False  # pragma: no cover - the loop returns or raises


def _send_failed(
    a: DeliveryAttempt,
    exc: PermanentSendError | TransientSendError,
    token: uuid.UUID,
    attempts: int,
    *,
    started: bool,
    part: Part | None,
) -> Outcome:
    """The one error path of single and sequence sends (`part`: the sequence's part that failed)."""
    m = a.message
    at_part = {} if part is None else {"part": part.position}
    if isinstance(exc, RecipientOptedOut):
        # The recipient unsubscribed at Twilio: every later send would fail the same way, so the
        # user is opted out here too (consent ledger, queued messages cancelled) with the failure.
        error = f"twilio {exc.provider_code}: {exc.message} (the recipient opted out at Twilio)"
        a.store.fail_opted_out(m.id, error=error, now=a.clock())
        return a.answer(logging.WARNING, FAILED, OPTED_OUT, FAILED, error=exc.message, **at_part)
    if isinstance(exc, PermanentSendError):
        code = exc.provider_code or "unknown"
        a.store.fail(m.id, error=f"twilio {code}: {exc.message}", reason=f"twilio_{code}", now=a.clock())
        return a.answer(logging.WARNING, FAILED, f"twilio_{code}", FAILED, error=exc.message, **at_part)
    code = exc.provider_code or str(exc.provider_status or "transient")
    if not started and not exc.maybe_sent:
        return _release(a, exc, token, attempts, code, sequence=part is not None)
    # Twilio may have (some of) it: never resend before asking it. The claim (and its slot) stays
    # until reconcile_at; then a retried task or the sweep reconciles.
    where = "" if part is None else f" at part {part.position}"
    reconcile_at = a.clock() + timedelta(seconds=a.config.reconcile_after_seconds)
    a.store.hold_for_reconcile(
        m.id, token, error=f"twilio {code}{where}: {exc.message}", reconcile_at=reconcile_at, now=a.clock()
    )
    reason = "outcome_unknown" if exc.maybe_sent else "sequence_interrupted"
    return a.answer(
        logging.WARNING,
        "retry",
        reason,
        SENDING,
        scheduled_for=reconcile_at,
        attempts=attempts,
        error=exc.message,
        **at_part,
    )


def _release(
    a: DeliveryAttempt, exc: TransientSendError, token: uuid.UUID, attempts: int, code: str, *, sequence: bool
) -> Outcome:
    """Nothing went out: the claim is given back (failed once the attempts are spent)."""
    m = a.message
    status = a.store.release(
        m.id, token, error=f"twilio {code}: {exc.message}", now=a.clock(), max_attempts=a.config.max_attempts
    )
    if status == FAILED:
        level = logging.WARNING if sequence else logging.ERROR
        return a.answer(level, FAILED, "attempts_exhausted", status, attempts=attempts, error=exc.message)
    return a.answer(logging.WARNING, "retry", f"twilio_{code}", status, attempts=attempts, error=exc.message)
