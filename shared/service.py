"""Use cases: schedule a message, deliver it. Ports come in as arguments (cosmicpython style);
nothing here knows about HTTP, psycopg, gRPC or Twilio's client."""

from __future__ import annotations

import json
import logging
import time as _time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared import policy
from shared.errors import (
    IdempotencyConflict,
    NotDeliverable,
    NotFound,
    OptedOut,
    PermanentSendError,
    StoreUnavailable,
    TransientSendError,
    Unavailable,
    Undeliverable,
    ValidationError,
)
from shared.log import event
from shared.models import (
    FINAL_STATUSES,
    QUEUED,
    SENDING,
    DeliveryContext,
    InboundSms,
    NewMessage,
    Outcome,
    ScheduleRequest,
    StaleClaim,
    StatusCallback,
    StoredMessage,
    SweepReport,
    TaskRef,
    UserContext,
    iso,
    keyword,
    parse_uuid,
)
from shared.ports import EventPublisher, SmsSender, Store, TaskQueue

log = logging.getLogger("orchestrator")

Clock = Callable[[], datetime]

# Cloud Tasks may fire a moment before schedule_time; earlier than this counts as an early wake-up.
EARLY_TOLERANCE = timedelta(seconds=1)
# record_sent is retried briefly: the SMS is already out, and losing that fact is the worst outcome.
RECORD_RETRY_DELAYS = (0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Policy:
    """The policy settings the use cases need (a slice of Settings)."""

    limits: policy.Limits
    max_attempts: int = 5
    lease_seconds: int = 120
    max_content_length: int = 1600
    reconcile_after_seconds: int = 30
    sweep_grace_seconds: int = 120
    sweep_batch: int = 200
    sweep_time_budget_seconds: float = 50.0
    task_horizon_seconds: int = 30 * 86400 - 300
    health_stale_seconds: int = 300


@dataclass(frozen=True)
class ScheduleResult:
    created: bool
    message: StoredMessage
    blocked_by: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        m = self.message
        return {
            "success": True,
            "messageId": str(m.id),
            "status": m.status,
            "scheduledFor": iso(m.scheduled_for),
            "reason": m.reason,
            "explanation": policy.REASONS.get(m.reason or "", m.reason),
            "blockedBy": list(self.blocked_by),
            "priority": m.priority,
            "idempotentReplay": not self.created,
        }


def _require_timezone(ctx: UserContext) -> None:
    if not policy.is_timezone(ctx.settings.timezone):
        raise ValidationError(
            [
                {
                    "field": "userId",
                    "reason": f"the user's timezone {ctx.settings.timezone!r} is not a known IANA name",
                }
            ]
        )


def schedule(
    body: Any,
    *,
    store: Store,
    tasks: TaskQueue,
    config: Policy,
    now: datetime,
    idempotency_header: str | None = None,
) -> ScheduleResult:
    """Validate, plan the earliest allowed time, store the row, create its Cloud Task."""
    request = ScheduleRequest.parse(
        body, now=now, max_content_length=config.max_content_length, idempotency_header=idempotency_header
    )
    ctx = store.user_context(request.user_id, now)
    if ctx is None:
        raise NotFound(f"no user with id {request.user_id}", field="userId")
    _require_timezone(ctx)
    decision = policy.plan(ctx.settings, config.limits, ctx.history, now, request.priority, request.can_delay)
    if decision.reason == policy.OPTED_OUT:
        raise OptedOut(userId=str(request.user_id))
    if decision.reason == policy.UNDELIVERABLE:
        raise Undeliverable(userId=str(request.user_id))
    if decision.at is None:
        raise NotDeliverable("no allowed delivery time within the planning horizon", reason=decision.reason)
    if request.expires_at is not None and decision.at >= request.expires_at:
        raise NotDeliverable(
            "the earliest allowed delivery time is after expiresAt",
            reason=decision.reason,
            earliestAllowed=iso(decision.at),
            expiresAt=iso(request.expires_at),
        )
    result = store.enqueue(
        NewMessage(request=request, scheduled_for=decision.at, reason=decision.reason, now=now)
    )
    message = result.message
    if not result.created:
        if result.request_hash != request.request_hash:
            raise IdempotencyConflict(idempotencyKey=request.idempotency_key, messageId=str(message.id))
        event(log, logging.INFO, "idempotent replay", messageId=str(message.id), agentId=request.agent_id)
        return ScheduleResult(created=False, message=message)
    _wake(tasks, message, message.generation, message.scheduled_for, now)
    event(
        log,
        logging.INFO,
        "message scheduled",
        messageId=str(message.id),
        userId=str(message.user_id),
        agentId=message.agent_id,
        priority=message.priority,
        scheduledFor=iso(message.scheduled_for),
        reason=decision.reason,
        blockedBy=list(decision.blocked_by),
    )
    return ScheduleResult(created=True, message=message, blocked_by=decision.blocked_by)


def _wake(tasks: TaskQueue, message: StoredMessage, generation: int, at: datetime, now: datetime) -> None:
    """Create the Cloud Task for a stored row. A failure is logged, not raised: the row is the truth
    and the sweep creates tasks for queued rows that have none."""
    try:
        name = tasks.schedule(message.id, generation, at, now)
    except Unavailable as exc:
        event(
            log,
            logging.ERROR,
            "task creation failed; the sweep will pick the message up",
            messageId=str(message.id),
            userId=str(message.user_id),
            generation=generation,
            reason="task_create_failed",
            error=exc.message,
            cause=repr(exc.__cause__) if exc.__cause__ else None,
        )
        return
    if name is None:
        event(
            log,
            logging.INFO,
            "beyond the Cloud Tasks horizon; the sweep will create the task when it comes in range",
            messageId=str(message.id),
            scheduledFor=iso(at),
            reason="beyond_task_horizon",
        )


def get_message(message_id: str, *, store: Store) -> StoredMessage:
    parsed = parse_uuid(message_id)
    if parsed is None:
        raise ValidationError([{"field": "messageId", "reason": "must be a UUID"}])
    message = store.get_message(parsed)
    if message is None:
        raise NotFound(f"no message with id {parsed}", field="messageId")
    return message


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


def deliver(
    body: Any,
    *,
    store: Store,
    tasks: TaskQueue,
    sms: SmsSender,
    config: Policy,
    clock: Clock,
) -> Outcome:
    """Handle one Cloud Task: re-check, claim, send, record. Safe to run any number of times."""
    message_id, generation = parse_task(body)
    now = clock()
    ctx = store.delivery_context(message_id, now)
    if ctx is None:
        return _outcome(logging.WARNING, message_id, "skipped", "not_found", "unknown")
    m = ctx.message
    fields: dict[str, Any] = {"userId": str(m.user_id), "agentId": m.agent_id, "priority": m.priority}
    if m.status in FINAL_STATUSES:
        return _outcome(logging.INFO, m.id, "skipped", f"already_{m.status}", m.status, **fields)
    if m.status == SENDING:
        if m.lease_expires_at is not None and m.lease_expires_at <= now:
            # The claim's holder died or timed out: ask Twilio before anything is sent again.
            claims = store.take_stale_claims(
                now, lease_seconds=config.lease_seconds, limit=1, message_id=m.id
            )
            if claims:
                result = reconcile(claims[0], store=store, tasks=tasks, sms=sms, config=config, clock=clock)
                level = logging.WARNING if result == "deferred" else logging.INFO
                action = "retry" if result == "deferred" else "reconciled"
                return _outcome(level, m.id, action, f"reconciled_{result}", m.status, **fields)
        if m.reason == "outcome_unknown":
            # Keep Cloud Tasks retrying with backoff until the hold ends and this task can reconcile.
            return _outcome(logging.INFO, m.id, "retry", "awaiting_reconciliation", m.status, **fields)
        return _outcome(logging.INFO, m.id, "skipped", "in_flight", m.status, **fields)
    if generation is not None and generation != m.generation:
        return _outcome(
            logging.INFO, m.id, "skipped", "stale_task", m.status, taskGeneration=generation, **fields
        )
    if m.expires_at is not None and m.expires_at <= now:
        store.expire(m.id, now)
        return _outcome(logging.INFO, m.id, "expired", "expired", "expired", **fields)
    if not policy.is_timezone(ctx.user.settings.timezone):
        store.fail(
            m.id, error=f"unknown timezone {ctx.user.settings.timezone!r}", reason="invalid_timezone", now=now
        )
        return _outcome(logging.ERROR, m.id, "failed", "invalid_timezone", "failed", **fields)
    if now < m.scheduled_for - EARLY_TOLERANCE:
        # Woken early (or by an old task of the same generation): keep the plan, with a fresh task.
        return _defer(store, tasks, m, m.scheduled_for, "early_task", now, fields)

    decision = policy.check_now(
        ctx.user.settings, config.limits, ctx.user.history, now, m.priority, m.can_delay
    )
    if decision.reason in (policy.OPTED_OUT, policy.UNDELIVERABLE):
        store.fail(m.id, error=policy.REASONS[decision.reason], reason=decision.reason, now=now)
        return _outcome(logging.INFO, m.id, "failed", decision.reason, "failed", **fields)
    if not decision.allowed_now:
        return _replan(store, tasks, ctx, config, now, decision.reason, fields, refresh=False)

    limits = ctx.user.settings.limits(config.limits)
    _, day_start, day_end = policy.local_day_bounds(ctx.user.settings.timezone, now)
    claim = store.claim(
        m.id,
        m.generation,
        now,
        limits=limits,
        daily_cap=limits.cap(m.priority, m.can_delay),
        day_start=day_start,
        day_end=day_end,
        lease_seconds=config.lease_seconds,
    )
    if not claim.claimed:
        if claim.reason in ("not_found", "not_queued", "stale_task"):
            return _outcome(logging.INFO, m.id, "skipped", claim.reason, claim.status or m.status, **fields)
        if claim.reason == "opted_out":
            store.fail(m.id, error="the user opted out", reason="opted_out", now=now)
            return _outcome(logging.INFO, m.id, "failed", "opted_out", "failed", **fields)
        if claim.reason == "expired":
            store.expire(m.id, now)
            return _outcome(logging.INFO, m.id, "expired", "expired", "expired", **fields)
        # Another delivery for this user won the lock: plan again from what the database now holds.
        return _replan(store, tasks, ctx, config, now, claim.reason, fields, refresh=True)
    assert claim.token is not None
    return _send(store, sms, ctx, config, clock, claim.token, claim.attempts, fields)


def _send(
    store: Store,
    sms: SmsSender,
    ctx: DeliveryContext,
    config: Policy,
    clock: Clock,
    token: uuid.UUID,
    attempts: int,
    fields: dict[str, Any],
) -> Outcome:
    m = ctx.message
    try:
        sid = sms.send(ctx.user.phone_number, m.content, message_id=m.id)
    except PermanentSendError as exc:
        code = exc.provider_code or "unknown"
        store.fail(m.id, error=f"twilio {code}: {exc.message}", reason=f"twilio_{code}", now=clock())
        return _outcome(
            logging.WARNING, m.id, "failed", f"twilio_{code}", "failed", error=exc.message, **fields
        )
    except TransientSendError as exc:
        code = exc.provider_code or str(exc.provider_status or "transient")
        if exc.maybe_sent:
            # Twilio may have the message: never resend before asking it. The claim (and its slot)
            # stays until reconcile_at; then a retried task or the sweep reconciles.
            reconcile_at = clock() + timedelta(seconds=config.reconcile_after_seconds)
            store.hold_for_reconcile(
                m.id, token, error=f"twilio {code}: {exc.message}", reconcile_at=reconcile_at, now=clock()
            )
            return _outcome(
                logging.WARNING,
                m.id,
                "retry",
                "outcome_unknown",
                SENDING,
                scheduled_for=reconcile_at,
                attempts=attempts,
                error=exc.message,
                **fields,
            )
        status = store.release(
            m.id, token, error=f"twilio {code}: {exc.message}", now=clock(), max_attempts=config.max_attempts
        )
        if status == "failed":
            return _outcome(
                logging.ERROR,
                m.id,
                "failed",
                "attempts_exhausted",
                status,
                attempts=attempts,
                error=exc.message,
                **fields,
            )
        return _outcome(
            logging.WARNING,
            m.id,
            "retry",
            f"twilio_{code}",
            status,
            attempts=attempts,
            error=exc.message,
            **fields,
        )
    sent_at = clock()
    local_date = sent_at.astimezone(policy.zone(ctx.user.settings.timezone)).date().isoformat()
    for delay in (*RECORD_RETRY_DELAYS, None):
        try:
            store.record_sent(m.id, token, sid=sid, body=m.content, now=sent_at, local_date=local_date)
            break
        except StoreUnavailable:
            if delay is None:
                # The SMS went out; the row stays 'sending' and the sweep reconciles it by sid.
                event(
                    log,
                    logging.CRITICAL,
                    "sent but not recorded: database unavailable",
                    messageId=str(m.id),
                    twilioMessageSid=sid,
                    reason="record_failed",
                    **fields,
                )
                raise
            _time.sleep(delay)
    return _outcome(
        logging.INFO, m.id, "sent", "ok", "sent", sid=sid, attempts=attempts, sentAt=iso(sent_at), **fields
    )


def _replan(
    store: Store,
    tasks: TaskQueue,
    ctx: DeliveryContext,
    config: Policy,
    now: datetime,
    reason: str,
    fields: dict[str, Any],
    *,
    refresh: bool,
) -> Outcome:
    """Not allowed now: a new task at the next allowed time.

    The next allowed time is the hard one (sends made, quiet hours), not a fresh plan around the
    user's other queued messages: those were spread when they were scheduled, and re-spreading a
    message that slipped by a second behind a reservation planned for it would push it an hour.
    `refresh`: the database refused a claim the policy allowed (a racing claim it had not seen),
    so plan from what the database holds now.
    """
    m = ctx.message
    user = (store.user_context(m.user_id, now, exclude=m.id) or ctx.user) if refresh else ctx.user
    decision = policy.check_now(user.settings, config.limits, user.history, now, m.priority, m.can_delay)
    if decision.reason in (policy.OPTED_OUT, policy.UNDELIVERABLE):
        store.fail(m.id, error=policy.REASONS[decision.reason], reason=decision.reason, now=now)
        return _outcome(logging.INFO, m.id, "failed", decision.reason, "failed", **fields)
    at = decision.at or now + timedelta(hours=1)
    # Never re-plan for now, which would spin; a message in flight holds the user for a cooldown.
    floor = now + (config.limits.cooldown if reason == policy.IN_FLIGHT else timedelta(seconds=1))
    at = max(at, floor)
    if m.expires_at is not None and at >= m.expires_at:
        # Never sent late: it cannot go out before it expires, so it expires now, with the reason.
        store.expire(m.id, now)
        return _outcome(
            logging.INFO, m.id, "expired", f"expires_before_allowed:{reason}", "expired", **fields
        )
    return _defer(store, tasks, m, at, reason, now, fields)


def _defer(
    store: Store,
    tasks: TaskQueue,
    m: StoredMessage,
    at: datetime,
    reason: str,
    now: datetime,
    fields: dict[str, Any],
) -> Outcome:
    generation = store.reschedule(m.id, m.generation, at, reason, now)
    if generation is None:
        return _outcome(logging.INFO, m.id, "skipped", "not_queued", m.status, **fields)
    _wake(tasks, m, generation, at, now)
    return _outcome(
        logging.INFO, m.id, "deferred", reason, QUEUED, scheduled_for=at, generation=generation, **fields
    )


def _outcome(
    level: int,
    message_id: uuid.UUID,
    action: str,
    reason: str,
    status: str,
    *,
    scheduled_for: datetime | None = None,
    sid: str | None = None,
    **extra: Any,
) -> Outcome:
    event(
        log,
        level,
        f"deliver: {action} ({reason})",
        messageId=str(message_id),
        action=action,
        reason=reason,
        status=status,
        scheduledFor=iso(scheduled_for),
        twilioMessageSid=sid,
        **extra,
    )
    return Outcome(
        message_id=message_id,
        action=action,
        reason=reason,
        status=status,
        scheduled_for=scheduled_for,
        sid=sid,
        extra=extra,
    )


def reconcile(
    claim: StaleClaim,
    *,
    store: Store,
    tasks: TaskQueue,
    sms: SmsSender,
    config: Policy,
    clock: Clock,
) -> str:
    """Settle a stale 'sending' claim with Twilio's record: "sent" (it went out: recorded with its
    sid), "requeued" (it did not: queued again, due now, through the normal limit checks) or
    "deferred" (Twilio could not be asked: the claim is held for another lease)."""
    m = claim.message
    since = m.slot_at or m.updated_at or clock()
    fields: dict[str, Any] = {"userId": str(m.user_id), "agentId": m.agent_id, "reason": "reconcile"}
    try:
        candidates = sms.find_sent(claim.phone_number, m.content, since=since)
    except TransientSendError as exc:
        event(
            log,
            logging.WARNING,
            "reconcile: Twilio unavailable; held for another lease",
            messageId=str(m.id),
            error=exc.message,
            **fields,
        )
        return "deferred"
    now = clock()
    for found in candidates:
        # Twilio's clock, kept within [claim, now]: skew must not move the send out of the window
        # in which it can have happened (nor out of the user's local day it counts on).
        sent_at = min(max(found.sent_at, since), now)
        local_date = sent_at.astimezone(policy.zone(claim.timezone)).date().isoformat()
        # A sid another message already owns is that message's send, not this one's (same text to
        # the same number): record_sent refuses it and the next candidate is tried.
        if store.record_sent(
            m.id,
            claim.token,
            sid=found.sid,
            body=m.content,
            now=sent_at,
            local_date=local_date,
            reconciled=True,
        ):
            event(
                log,
                logging.WARNING,
                "reconciled: Twilio had sent it; recorded",
                messageId=str(m.id),
                twilioMessageSid=found.sid,
                action="reconciled",
                outcome="sent",
                **fields,
            )
            return "sent"
    generation = store.requeue_claim(m.id, claim.token, reason="reconciled_not_sent", now=now)
    if generation is not None:
        _wake(tasks, m, generation, now, now)
    event(
        log,
        logging.WARNING,
        "reconciled: Twilio never got it; queued again",
        messageId=str(m.id),
        generation=generation,
        action="reconciled",
        outcome="requeued",
        **fields,
    )
    return "requeued"


def sweep(
    *,
    store: Store,
    tasks: TaskQueue,
    sms: SmsSender,
    config: Policy,
    clock: Clock,
    trigger: str,
    events: EventPublisher | None = None,
) -> SweepReport:
    """One pass over what Cloud Tasks may have missed; recorded in sweep_runs. Safe to run twice at
    once: every batch is claimed with SKIP LOCKED."""
    started = clock()
    deadline = _time.monotonic() + config.sweep_time_budget_seconds
    report = SweepReport()
    error: str | None = None
    limit = config.sweep_batch

    def more(got: int) -> bool:
        report.batches += 1
        return got >= limit and _time.monotonic() < deadline

    def retask(fetch: Callable[[datetime], list[TaskRef]], *, due_now: bool) -> int:
        """Batches of rows that need a task: overdue ones (due now) or ones come within the horizon."""
        count = 0
        while True:
            now = clock()
            refs = fetch(now)
            for ref in refs:
                count += 1
                if not _task(tasks, ref, now if due_now else ref.scheduled_for, now):
                    report.task_errors += 1
            if not more(len(refs)):
                return count

    try:
        while True:
            n = store.sweep_expire(clock(), limit=limit)
            report.expired += n
            if not more(n):
                break
        while True:
            claims = store.take_stale_claims(clock(), lease_seconds=config.lease_seconds, limit=limit)
            for c in claims:
                result = reconcile(c, store=store, tasks=tasks, sms=sms, config=config, clock=clock)
                if result == "sent":
                    report.reconciled_sent += 1
                elif result == "requeued":
                    report.reconciled_requeued += 1
                else:
                    report.reconcile_deferred += 1
            if not more(len(claims)):
                break
        report.overdue_requeued += retask(
            lambda now: store.sweep_overdue(now, grace_seconds=config.sweep_grace_seconds, limit=limit),
            due_now=True,
        )
        report.horizon_tasked += retask(
            lambda now: store.sweep_horizon(now, horizon_seconds=config.task_horizon_seconds, limit=limit),
            due_now=False,
        )
        while True:
            published, failed = drain_events(store=store, publisher=events, clock=clock, limit=limit)
            report.events_published += published
            report.events_failed += failed
            if failed or not more(published):
                break
    except StoreUnavailable as exc:
        error = exc.message
        raise
    except Exception as exc:
        # Not recorded as a run: health must not take a failed sweep for a working one.
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        finished = clock()
        level = logging.ERROR if error or report.task_errors else logging.INFO
        event(log, level, "sweep finished", trigger=trigger, error=error, **report.counts())
        if error is None:
            store.record_sweep(trigger, started, finished, report.counts(), None)
    return report


def _task(tasks: TaskQueue, ref: TaskRef, at: datetime, now: datetime) -> bool:
    try:
        tasks.schedule(ref.message_id, ref.generation, at, now)
    except Unavailable as exc:
        event(
            log,
            logging.ERROR,
            "sweep: task creation failed; retried next sweep",
            messageId=str(ref.message_id),
            generation=ref.generation,
            reason="task_create_failed",
            error=exc.message,
        )
        return False
    return True


def health(*, store: Store, config: Policy, now: datetime) -> tuple[int, dict[str, Any]]:
    """The seed's health document, 503 with a reason when the database is unreachable or the
    sweep has not finished a run for health_stale_seconds."""
    body: dict[str, Any] = {"status": "healthy", "service": "message-orchestrator", "timestamp": iso(now)}
    try:
        h = store.health(now)
    except StoreUnavailable:
        return 503, body | {"status": "unhealthy", "reason": "database_unavailable"}
    stale = h.last_sweep_at is None or (now - h.last_sweep_at).total_seconds() > config.health_stale_seconds
    body["stats"] = {
        "messagesQueued": h.queued,
        "messagesSending": h.sending,
        "messagesProcessed": h.sent_24h,
        "lastProcessTime": iso(h.last_sweep_at),
        "lastSweep": h.last_sweep_counts,
        "oldestOverdueSeconds": max(0.0, (now - h.oldest_overdue_at).total_seconds())
        if h.oldest_overdue_at
        else 0.0,
        "processorRunning": not stale,
    }
    if stale:
        reason = "no_sweep_yet" if h.last_sweep_at is None else "sweep_stale"
        return 503, body | {"status": "unhealthy", "reason": reason}
    return 200, body


# -- conversations: Twilio's webhooks and events for agents ---------------------------------------


def inbound(form: dict[str, str], *, store: Store, now: datetime) -> dict[str, Any]:
    """An SMS from a user: recorded once per MessageSid; STOP/START change the opt-out (STOP also
    cancels what is queued for them); the inbound_message event goes to the outbox."""
    sms = InboundSms.parse(form)
    word = keyword(sms.body)
    result = store.inbound(sms.from_number, sms.body, sms.sid, keyword=word, num_media=sms.num_media, now=now)
    event(
        log,
        logging.INFO,
        "inbound: duplicate webhook ignored"
        if result.get("duplicate")
        else f"inbound: recorded ({word or 'message'})",
        userId=result.get("userId"),
        twilioMessageSid=sms.sid,
        reason=word,
        cancelled=result.get("cancelled"),
        optedOut=result.get("optedOut"),
    )
    return result


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
