"""Use cases: schedule a message, deliver it. Ports come in as arguments (cosmicpython style);
nothing here knows about HTTP, psycopg, gRPC or Twilio's client."""

from __future__ import annotations

import json
import logging
import time as _time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from shared import policy
from shared.domain import (
    FINAL_STATUSES,
    QUEUED,
    RANK,
    SENDING,
    SUPERSEDED,
    AccountCaps,
    Limits,
    Part,
    StoredMessage,
    sequence_span,
)
from shared.errors import (
    Forbidden,
    IdempotencyConflict,
    NotCancellable,
    NotDeliverable,
    NotFound,
    NotificationsDisabled,
    OptedOut,
    PermanentSendError,
    RenderUnavailable,
    StoreUnavailable,
    TransientSendError,
    Unavailable,
    Undeliverable,
    ValidationError,
)
from shared.log import event
from shared.models import (
    CancelResult,
    DeliveryContext,
    InboundSms,
    NewMessage,
    Outcome,
    Rendered,
    ScheduleRequest,
    StaleClaim,
    StatusCallback,
    SweepReport,
    TaskRef,
    Turn,
    UserContext,
    field_name,
    iso,
    keyword,
    parse_uuid,
    text_problem,
)
from shared.ports import EventPublisher, Renderer, SmsSender, Store, TaskQueue

log = logging.getLogger("orchestrator")

Clock = Callable[[], datetime]

# Reasons a message will never go out; deliver fails it with the reason.
NEVER = frozenset({policy.OPTED_OUT, policy.UNDELIVERABLE, policy.NOTIFICATIONS_DISABLED})

# Cloud Tasks may fire a moment before schedule_time; earlier than this counts as an early wake-up.
EARLY_TOLERANCE = timedelta(seconds=1)
# record_sent is retried briefly: the SMS is already out, and losing that fact is the worst outcome.
RECORD_RETRY_DELAYS = (0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Policy:
    """The policy settings the use cases need (a slice of Settings)."""

    limits: Limits
    max_attempts: int = 5
    lease_seconds: int = 120
    max_content_length: int = 1600
    reconcile_after_seconds: int = 30
    sweep_grace_seconds: int = 120
    sweep_batch: int = 200
    sweep_time_budget_seconds: float = 50.0
    task_horizon_seconds: int = 30 * 86400 - 300
    health_stale_seconds: int = 300
    render_max_length: int = 320
    conversation_turns: int = 20
    account_caps: AccountCaps = field(default_factory=AccountCaps)
    sweep_task_concurrency: int = 1  # the deployed default is SWEEP_TASK_CONCURRENCY (16)


@dataclass(frozen=True)
class ScheduleResult:
    created: bool
    message: StoredMessage
    blocked_by: tuple[str, ...] = ()
    superseded: tuple[uuid.UUID, ...] = ()

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
            "parts": len(m.parts) or None,
            "topicKey": m.topic_key,
            "superseded": [str(s) for s in self.superseded],
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


def _replay(message: StoredMessage, request: ScheduleRequest) -> ScheduleResult:
    """The message stored under the request's idempotency key, if the request is the same one."""
    if message.request_hash != request.request_hash:
        raise IdempotencyConflict(idempotencyKey=request.idempotency_key, messageId=str(message.id))
    event(log, logging.INFO, "idempotent replay", messageId=str(message.id), agentId=request.agent_id)
    return ScheduleResult(created=False, message=message)


def schedule(
    body: Any,
    *,
    store: Store,
    tasks: TaskQueue,
    config: Policy,
    now: datetime,
    idempotency_header: str | None = None,
    renderer: Renderer | None = None,
) -> ScheduleResult:
    """Validate, plan the earliest allowed time, store the row, create its Cloud Task.

    Structured messageData (no `content`) is rendered now unless it asked for fresh context (then
    at delivery, with the conversation as it is then); a failed render here is retried at delivery."""
    request = ScheduleRequest.parse(
        body, now=now, max_content_length=config.max_content_length, idempotency_header=idempotency_header
    )
    key = (request.agent_id, request.idempotency_key) if request.idempotency_key else None
    ctx = store.user_context(request.user_id, now, idempotency=key)
    if ctx is None:
        raise NotFound(f"no user with id {request.user_id}", field="userId")
    if ctx.replay is not None:
        # Before planning or rendering: the retry of a stored request gets that message back, and
        # costs no model call.
        return _replay(ctx.replay, request)
    _require_timezone(ctx)
    span = timedelta(seconds=sequence_span(request.parts))
    decision = policy.plan(
        ctx.settings, config.limits, ctx.history, now, request.priority, request.can_delay, span=span
    )
    if decision.reason == policy.OPTED_OUT:
        raise OptedOut(userId=str(request.user_id))
    if decision.reason == policy.UNDELIVERABLE:
        raise Undeliverable(userId=str(request.user_id))
    if decision.reason == policy.NOTIFICATIONS_DISABLED:
        raise NotificationsDisabled(userId=str(request.user_id))
    if decision.at is None:
        raise NotDeliverable("no allowed delivery time within the planning horizon", reason=decision.reason)
    if request.expires_at is not None and decision.at >= request.expires_at:
        raise NotDeliverable(
            "the earliest allowed delivery time is after expiresAt",
            reason=decision.reason,
            earliestAllowed=iso(decision.at),
            expiresAt=iso(request.expires_at),
        )
    rendered: Rendered | None = None
    render_error: RenderUnavailable | None = None
    parts = request.parts
    part_usages: list[tuple[int, dict[str, Any]]] = []
    fresh = request.requires_fresh_context
    if renderer is not None and not fresh and (request.structured or any(p.needs_render for p in parts)):
        try:
            turns = store.conversation(request.user_id, config.conversation_turns)
            if request.structured:
                rendered = renderer.render(
                    request.message_data, conversation=turns, max_length=config.render_max_length
                )
            else:
                parts, part_usages = _render_parts(renderer, parts, turns, config)
        except RenderUnavailable as exc:
            render_error = exc  # rendered at delivery instead
    result = store.enqueue(
        NewMessage(
            request=request,
            scheduled_for=decision.at,
            reason=decision.reason,
            now=now,
            rendered=rendered.text if rendered else None,
            rendered_parts=parts if request.parts else None,
        )
    )
    message = result.message
    for position, usage in part_usages if result.created else ():
        store.log_model_call(
            message.user_id, message.id, "rendered", usage, {"part": position, "at": "schedule"}, None, now
        )
    if result.created and (rendered or render_error):
        store.log_model_call(
            message.user_id,
            message.id,
            "rendered" if rendered else "render_failed",
            rendered.usage.to_log() if rendered else _error_usage("render", render_error),
            {"length": len(rendered.text), "at": "schedule"} if rendered else {"at": "schedule"},
            render_error.message if render_error else None,
            now,
        )
    if not result.created:  # a concurrent request with the same key stored it first
        return _replay(message, request)
    for old in result.superseded:
        event(
            log,
            logging.INFO,
            "superseded by a newer message on the same topic",
            messageId=str(old),
            supersededBy=str(message.id),
            userId=str(message.user_id),
            agentId=message.agent_id,
            topicKey=message.topic_key,
            reason="superseded",
        )
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
        parts=len(message.parts) or None,
        topicKey=message.topic_key,
    )
    return ScheduleResult(
        created=True, message=message, blocked_by=decision.blocked_by, superseded=result.superseded
    )


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


def cancel(message_id: str, body: Any, *, store: Store, now: datetime) -> CancelResult:
    """An agent withdraws a queued message: 200 cancelled (again: the same answer), 409 when it is
    being sent or already final, 403 when `agentId` is given and is not the message's agent."""
    parsed = parse_uuid(message_id)
    errors = [] if parsed is not None else [{"field": "messageId", "reason": "must be a UUID"}]
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ValidationError([{"field": "body", "reason": "must be a JSON object"}])
    for name in sorted(set(body) - {"agentId", "reason"}):
        errors.append({"field": field_name(name), "reason": "unknown field"})
    agent_id, reason = body.get("agentId"), body.get("reason")
    if agent_id is not None and (not isinstance(agent_id, str) or not agent_id.strip()):
        errors.append({"field": "agentId", "reason": "must be a non-empty string"})
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500 or text_problem(reason)):
        errors.append({"field": "reason", "reason": "must be text of at most 500 characters"})
    if errors:
        raise ValidationError(errors)
    assert parsed is not None
    result = store.cancel(parsed, agent_id=agent_id, reason=reason, now=now)
    if result.error == "not_owner":
        raise Forbidden("the message belongs to another agent", messageId=str(parsed))
    if result.error == "not_queued":
        raise NotCancellable(messageId=str(parsed), status=result.status)
    assert result.message is not None
    event(
        log,
        logging.INFO,
        "message cancelled" + (" (again)" if result.already else ""),
        messageId=str(parsed),
        userId=str(result.message.user_id),
        agentId=result.message.agent_id,
        reason="cancelled",
    )
    return result


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
    sleep: Callable[[float], None] = _time.sleep,
    renderer: Renderer | None = None,
) -> Outcome:
    """Handle one Cloud Task: re-check, claim, send, record. Safe to run any number of times.

    `sleep` paces the parts of a sequence (tests pass one that advances their virtual clock)."""
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
        ctx.user.settings, config.limits, ctx.user.history, now, m.priority, m.can_delay, span=_span(m)
    )
    if decision.reason in NEVER:
        store.fail(m.id, error=policy.REASONS[decision.reason], reason=decision.reason, now=now)
        return _outcome(logging.INFO, m.id, "failed", decision.reason, "failed", **fields)
    rank = RANK[m.priority]
    if any(r.at <= now and RANK.get(r.priority, rank) < rank for r in ctx.user.history.reservations):
        # A more important message to this user is due too: it takes this slot; this one follows
        # it after the cooldown, whichever task Cloud Tasks happened to fire first.
        at = now + max(config.limits.cooldown, timedelta(seconds=1))
        return _defer(store, tasks, m, at, "priority_yield", now, fields)
    if not decision.allowed_now:
        return _replan(store, tasks, ctx, config, now, decision.reason, fields, refresh=False)
    prepared = _prepare_content(store, tasks, renderer, ctx, config, now, fields)
    if isinstance(prepared, Outcome):
        return prepared
    ctx, m = prepared, prepared.message

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
        weekly_cap=limits.weekly_limit,
        week=policy.local_week_bounds(ctx.user.settings.timezone, now) if limits.weekly_limit else None,
        account=config.account_caps,
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
        if claim.reason == policy.NOTIFICATIONS_DISABLED:
            store.fail(m.id, error=policy.REASONS[claim.reason], reason=claim.reason, now=now)
            return _outcome(logging.INFO, m.id, "failed", claim.reason, "failed", **fields)
        if claim.reason.startswith("account_") and claim.retry_at is not None:
            # The whole account is at a cap: wait for the instant the database computed for it.
            at = max(claim.retry_at, now + timedelta(seconds=1))
            return _defer_before_expiry(store, tasks, m, at, claim.reason, now, fields)
        # Another delivery for this user won the lock: plan again from what the database now holds.
        return _replan(store, tasks, ctx, config, now, claim.reason, fields, refresh=True)
    assert claim.token is not None
    if m.is_sequence:
        return _send_sequence(store, sms, ctx, config, clock, sleep, claim.token, claim.attempts, fields)
    return _send(store, sms, ctx, config, clock, claim.token, claim.attempts, fields)


def _error_usage(operation: str, exc: RenderUnavailable | None) -> dict[str, Any]:
    details = dict(exc.details) if exc else {}
    return {"operation": operation, **{k: v for k, v in details.items() if isinstance(v, str | int | bool)}}


def _prepare_content(
    store: Store,
    tasks: TaskQueue,
    renderer: Renderer | None,
    ctx: DeliveryContext,
    config: Policy,
    now: datetime,
    fields: dict[str, Any],
) -> DeliveryContext | Outcome:
    """The relevance check and the final text, before the claim (a model call takes seconds; the
    claim's lease should not).

    With requiresFreshContext, and only if the user wrote since the message was queued, the model
    judges whether it is still relevant: stale → superseded, nothing sent, no budget used.
    Structured messageData is rendered now if it has no text yet, or again with fresh context.
    A failed call keeps the row queued and tries again later (never sends raw data)."""
    m = ctx.message
    turns: list[Turn] | None = None
    last_in = ctx.user.history.last_inbound_at
    check = (
        m.requires_fresh_context
        and last_in is not None
        and m.created_at is not None
        and last_in > m.created_at
    )
    render_parts = (
        m.is_sequence
        and any(p.data is not None and not p.sent for p in m.parts)
        and (m.requires_fresh_context or any(p.needs_render for p in m.parts))
    )
    render_one = m.structured and (not m.content or m.requires_fresh_context)
    if not (check or render_parts or render_one):
        return ctx
    if renderer is None:
        operation = "relevance" if check else "render"
        return _render_failed(
            store, tasks, m, config, now, fields, RenderUnavailable("no renderer"), operation
        )
    if check:
        assert m.created_at is not None
        turns = store.conversation(m.user_id, config.conversation_turns)
        try:
            verdict = renderer.judge_relevance(
                m.content, m.message_data, conversation=turns, queued_at=m.created_at
            )
        except RenderUnavailable as exc:
            return _render_failed(store, tasks, m, config, now, fields, exc, "relevance")
        if not verdict.relevant:
            if not store.supersede_stale(m.id, reason=verdict.reason, usage=verdict.usage.to_log(), now=now):
                return _outcome(logging.INFO, m.id, "skipped", "not_queued", m.status, **fields)
            return _outcome(
                logging.INFO, m.id, "superseded", "stale", SUPERSEDED, explanation=verdict.reason, **fields
            )
        store.log_model_call(
            m.user_id,
            m.id,
            "relevance_checked",
            verdict.usage.to_log(),
            {"relevant": True, "reason": verdict.reason},
            None,
            now,
        )
    if render_parts:
        try:
            if turns is None:
                turns = store.conversation(m.user_id, config.conversation_turns)
            parts, usages = _render_parts(renderer, m.parts, turns, config)
        except RenderUnavailable as exc:
            return _render_failed(store, tasks, m, config, now, fields, exc, "render")
        by_position = {p.position: p for p in parts}
        for position, usage in usages:
            if not store.record_part_render(m.id, position, by_position[position].content, usage, now):
                return _outcome(logging.INFO, m.id, "skipped", "not_queued", m.status, **fields)
        m = replace(m, parts=parts, content="\n".join(p.content for p in parts))
        ctx = replace(ctx, message=m)
    if render_one:
        try:
            if turns is None:
                turns = store.conversation(m.user_id, config.conversation_turns)
            rendered = renderer.render(
                m.message_data, conversation=turns, max_length=config.render_max_length
            )
        except RenderUnavailable as exc:
            return _render_failed(store, tasks, m, config, now, fields, exc, "render")
        if not store.record_render(m.id, rendered.text, rendered.usage.to_log(), now):
            return _outcome(logging.INFO, m.id, "skipped", "not_queued", m.status, **fields)
        m = replace(m, content=rendered.text)
        ctx = replace(ctx, message=m)
    return ctx


def _render_parts(
    renderer: Renderer, parts: tuple[Part, ...], turns: list[Turn], config: Policy
) -> tuple[tuple[Part, ...], list[tuple[int, dict[str, Any]]]]:
    """The structured parts of a sequence rendered (all or none: raises RenderUnavailable)."""
    done: list[Part] = []
    usages: list[tuple[int, dict[str, Any]]] = []
    for p in parts:
        if p.data is not None and not p.sent:
            out = renderer.render(p.data, conversation=turns, max_length=config.render_max_length)
            p = replace(p, content=out.text)
            usages.append((p.position, out.usage.to_log()))
        done.append(p)
    return tuple(done), usages


def _render_failed(
    store: Store,
    tasks: TaskQueue,
    m: StoredMessage,
    config: Policy,
    now: datetime,
    fields: dict[str, Any],
    exc: RenderUnavailable,
    operation: str,
) -> Outcome:
    status, attempts = store.render_failed(
        m.id, error=exc.message, usage=_error_usage(operation, exc), max_attempts=config.max_attempts, now=now
    )
    if status == "failed":
        return _outcome(
            logging.ERROR,
            m.id,
            "failed",
            "render_failed",
            status,
            error=exc.message,
            attempts=attempts,
            **fields,
        )
    if status != QUEUED:
        return _outcome(logging.INFO, m.id, "skipped", "not_queued", status, **fields)
    # The queue's own retry would come back in seconds; a model outage usually lasts longer.
    backoff = timedelta(seconds=min(30 * 2 ** max(attempts - 1, 0), 900))
    event(
        log,
        logging.WARNING,
        f"{operation} failed; the message stays queued and is tried again",
        messageId=str(m.id),
        error=exc.message,
        permanent=exc.permanent,
        attempts=attempts,
        reason="render_unavailable",
    )
    return _defer(store, tasks, m, now + backoff, "render_unavailable", now, fields)


def _span(m: StoredMessage) -> timedelta:
    """How long the rest of a sequence takes once it starts (zero for a single message)."""
    return timedelta(seconds=sequence_span(tuple(p for p in m.parts if not p.sent)))


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
    record = partial(
        store.record_sent, m.id, token, sid=sid, body=m.content, now=sent_at, local_date=local_date
    )
    _record(record, m, sid, fields)
    return _outcome(
        logging.INFO, m.id, "sent", "ok", "sent", sid=sid, attempts=attempts, sentAt=iso(sent_at), **fields
    )


def _record(fn: Callable[[], bool], m: StoredMessage, sid: str, fields: dict[str, Any]) -> bool:
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
                    messageId=str(m.id),
                    twilioMessageSid=sid,
                    reason="record_failed",
                    **fields,
                )
                raise
            _time.sleep(delay)
    return False  # pragma: no cover - the loop returns or raises


def _send_sequence(
    store: Store,
    sms: SmsSender,
    ctx: DeliveryContext,
    config: Policy,
    clock: Clock,
    sleep: Callable[[float], None],
    token: uuid.UUID,
    attempts: int,
    fields: dict[str, Any],
) -> Outcome:
    """The parts of a claimed sequence, in position order, each recorded as soon as Twilio takes it.

    The claim is one slot for the whole sequence. A part already sent (an earlier attempt that
    failed halfway) is skipped, never resent. A failure after the first part keeps the claim and
    its slot and hands the rest to reconciliation: it records what Twilio has, then queues the
    message again so the remaining parts follow.
    """
    m = ctx.message
    fields = {**fields, "parts": len(m.parts)}
    pending = [p for p in m.parts if not p.sent]
    started = len(pending) < len(m.parts)
    last_sid = next((p.twilio_message_sid for p in reversed(m.parts) if p.sent), None)
    for i, part in enumerate(pending):
        if i and part.delay_seconds:
            sleep(part.delay_seconds)
        try:
            sid = sms.send(ctx.user.phone_number, part.content, message_id=m.id)
        except PermanentSendError as exc:
            code = exc.provider_code or "unknown"
            store.fail(m.id, error=f"twilio {code}: {exc.message}", reason=f"twilio_{code}", now=clock())
            return _outcome(
                logging.WARNING,
                m.id,
                "failed",
                f"twilio_{code}",
                "failed",
                error=exc.message,
                part=part.position,
                **fields,
            )
        except TransientSendError as exc:
            code = exc.provider_code or str(exc.provider_status or "transient")
            if not started and not exc.maybe_sent:
                # Nothing of it went out: give the claim back, as for a single message.
                status = store.release(
                    m.id,
                    token,
                    error=f"twilio {code}: {exc.message}",
                    now=clock(),
                    max_attempts=config.max_attempts,
                )
                action = "failed" if status == "failed" else "retry"
                reason = "attempts_exhausted" if status == "failed" else f"twilio_{code}"
                return _outcome(
                    logging.WARNING,
                    m.id,
                    action,
                    reason,
                    status,
                    attempts=attempts,
                    error=exc.message,
                    **fields,
                )
            reconcile_at = clock() + timedelta(seconds=config.reconcile_after_seconds)
            store.hold_for_reconcile(
                m.id,
                token,
                error=f"twilio {code} at part {part.position}: {exc.message}",
                reconcile_at=reconcile_at,
                now=clock(),
            )
            return _outcome(
                logging.WARNING,
                m.id,
                "retry",
                "outcome_unknown" if exc.maybe_sent else "sequence_interrupted",
                SENDING,
                scheduled_for=reconcile_at,
                attempts=attempts,
                error=exc.message,
                part=part.position,
                **fields,
            )
        started = True
        last_sid = sid
        at = clock()
        position = part.position
        if not _record(
            partial(store.record_part, m.id, token, position=position, sid=sid, now=at), m, sid, fields
        ):
            # Someone else holds the row now (a reconciler after a lapsed lease): stop; it settles it.
            return _outcome(
                logging.WARNING, m.id, "skipped", "claim_lost", SENDING, sid=sid, part=position, **fields
            )
    assert last_sid is not None
    sent_at = clock()
    local_date = sent_at.astimezone(policy.zone(ctx.user.settings.timezone)).date().isoformat()
    _record(
        lambda: store.record_sent(
            m.id, token, sid=last_sid, body=m.content, now=sent_at, local_date=local_date
        ),
        m,
        last_sid,
        fields,
    )
    return _outcome(
        logging.INFO,
        m.id,
        "sent",
        "ok",
        "sent",
        sid=last_sid,
        attempts=attempts,
        sentAt=iso(sent_at),
        **fields,
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
    decision = policy.check_now(
        user.settings, config.limits, user.history, now, m.priority, m.can_delay, span=_span(m)
    )
    if decision.reason in NEVER:
        store.fail(m.id, error=policy.REASONS[decision.reason], reason=decision.reason, now=now)
        return _outcome(logging.INFO, m.id, "failed", decision.reason, "failed", **fields)
    at = decision.at or now + timedelta(hours=1)
    # Never re-plan for now, which would spin; a message in flight holds the user for a cooldown.
    floor = now + (config.limits.cooldown if reason == policy.IN_FLIGHT else timedelta(seconds=1))
    return _defer_before_expiry(store, tasks, m, max(at, floor), reason, now, fields)


def _defer_before_expiry(
    store: Store,
    tasks: TaskQueue,
    m: StoredMessage,
    at: datetime,
    reason: str,
    now: datetime,
    fields: dict[str, Any],
) -> Outcome:
    """Defer to `at`, unless the message expires first: never sent late, so it expires now."""
    if m.expires_at is not None and at >= m.expires_at:
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
    if m.is_sequence:
        return _reconcile_sequence(
            claim, since, store=store, tasks=tasks, sms=sms, clock=clock, fields=fields
        )
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
    """A stale sequence: record each pending part Twilio has, in order, up to the first it has not;
    all sent → the message is sent; otherwise queued again and the rest follow (never a resend)."""
    m = claim.message
    recorded: list[int] = []
    try:
        for part in (p for p in m.parts if not p.sent):
            candidates = sms.find_sent(claim.phone_number, part.content, since=since)
            now = clock()
            if not any(
                store.record_part(m.id, claim.token, position=part.position, sid=found.sid, now=now)
                for found in candidates
            ):
                break
            recorded.append(part.position)
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
    done = {p.position for p in m.parts if p.sent} | set(recorded)
    if len(done) == len(m.parts):
        local_date = now.astimezone(policy.zone(claim.timezone)).date().isoformat()
        if store.record_sent(
            m.id, claim.token, sid="", body=m.content, now=now, local_date=local_date, reconciled=True
        ):
            event(
                log,
                logging.WARNING,
                "reconciled: Twilio had every part of the sequence; recorded",
                messageId=str(m.id),
                action="reconciled",
                outcome="sent",
                partsRecovered=recorded,
                **fields,
            )
            return "sent"
    generation = store.requeue_claim(m.id, claim.token, reason="reconciled_not_sent", now=now)
    if generation is not None:
        _wake(tasks, m, generation, now, now)
    event(
        log,
        logging.WARNING,
        "reconciled: the sequence stopped halfway, the remaining parts follow; queued again",
        messageId=str(m.id),
        generation=generation,
        action="reconciled",
        outcome="requeued",
        partsSent=sorted(done),
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
            count += len(refs)
            report.task_errors += _create_tasks(tasks, refs, now, due_now, config.sweep_task_concurrency)
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


def _create_tasks(
    tasks: TaskQueue, refs: list[TaskRef], now: datetime, due_now: bool, concurrency: int
) -> int:
    """Create a batch's tasks; how many failed. Each Cloud Tasks call is a network round trip
    (tens of ms), so a large backlog is only re-tasked at speed with several calls in flight."""

    def one(ref: TaskRef) -> bool:
        return _task(tasks, ref, now if due_now else ref.scheduled_for, now)

    if concurrency <= 1 or len(refs) <= 1:
        return sum(not one(ref) for ref in refs)
    with ThreadPoolExecutor(max_workers=min(concurrency, len(refs)), thread_name_prefix="sweep-task") as pool:
        return sum(not ok for ok in pool.map(one, refs))


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
