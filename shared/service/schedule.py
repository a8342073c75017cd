"""Scheduling: plan the earliest allowed time, store the row, create its Cloud Task. And an agent's
look at a message (get) and withdrawal of one (cancel)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared import policy
from shared.domain import Part, Policy, StoredMessage, sequence_span
from shared.errors import (
    Forbidden,
    IdempotencyConflict,
    NotCancellable,
    NotDeliverable,
    NotFound,
    NotificationsDisabled,
    OptedOut,
    OrchestratorError,
    RenderUnavailable,
    Undeliverable,
    ValidationError,
)
from shared.identity import ANYONE, Caller
from shared.log import event
from shared.models import CancelResult, EnqueueResult, NewMessage, Rendered, UserContext, iso
from shared.parsing import ScheduleRequest, parse_uuid
from shared.policy import Decision, rules
from shared.ports import Renderer, Store, TaskQueue
from shared.service.common import located, log, wake
from shared.service.content import error_usage, render, render_parts
from shared.small_requests import CancelRequest

# Plans that mean the message will never go out: the request is refused with the error.
REFUSED: dict[str, type[OrchestratorError]] = {
    policy.OPTED_OUT: OptedOut,
    policy.UNDELIVERABLE: Undeliverable,
    policy.NOTIFICATIONS_DISABLED: NotificationsDisabled,
}


@dataclass(frozen=True)
class ScheduleResult:
    created: bool  # False: an idempotent replay of a stored request
    message: StoredMessage
    blocked_by: tuple[str, ...] = ()
    superseded: tuple[uuid.UUID, ...] = ()


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
    """Validate an agent's JSON body, then schedule_request."""
    request = ScheduleRequest.parse(
        body,
        now=now,
        max_content_length=config.max_content_length,
        idempotency_header=idempotency_header,
        max_segments=config.max_segments_per_message,
        smart_encoding=config.smart_encoding,
    )
    return schedule_request(request, store=store, tasks=tasks, config=config, now=now, renderer=renderer)


def schedule_request(
    request: ScheduleRequest,
    *,
    store: Store,
    tasks: TaskQueue,
    config: Policy,
    now: datetime,
    renderer: Renderer | None = None,
    caller: Caller = ANYONE,
) -> ScheduleResult:
    """Plan the earliest allowed time, store the row, create its Cloud Task.

    Structured messageData (no `content`) is rendered now unless it asked for fresh context (then
    at delivery, with the conversation as it is then); a failed render here is retried at delivery.
    The caller must be allowed to act as the request's agent (ForbiddenAgent), and the request
    within its admission limits (UserQueueFull, AgentRateLimited); neither stores anything."""
    caller.require(request.agent_id)
    key = (request.agent_id, request.idempotency_key) if request.idempotency_key else None
    admission = config.admission(request.agent_id, request.topic_key)
    ctx = store.user_context(request.user_id, now, idempotency=key, admission=admission)
    if ctx is None:
        raise NotFound(f"no user with id {request.user_id}", field="userId")
    if ctx.replay is not None:
        # Before planning or rendering: the retry of a stored request gets that message back, and
        # costs no model call.
        return _replay(ctx.replay, request)
    decision = _plan(request, ctx, config, now)
    assert decision.at is not None  # _plan refuses a plan without a time
    content = _render_now(request, store, renderer, config)
    result = store.enqueue(
        NewMessage(
            request=request,
            scheduled_for=decision.at,
            reason=decision.reason,
            now=now,
            rendered=content.rendered.text if content.rendered else None,
            rendered_parts=content.parts if request.parts else None,
            admission=admission,
            blocked_by=decision.blocked_by,
        )
    )
    if not result.created:  # a concurrent request with the same key stored it first
        return _replay(result.message, request)
    _log_renders(store, result.message, content, now)
    _scheduled(tasks, result, decision, now)
    return ScheduleResult(
        created=True, message=result.message, blocked_by=decision.blocked_by, superseded=result.superseded
    )


def _replay(message: StoredMessage, request: ScheduleRequest) -> ScheduleResult:
    """The message stored under the request's idempotency key, if the request is the same one,
    answered as it was first: its plan's blockedBy and what it superseded are stored with it."""
    if message.request_hash != request.request_hash:
        raise IdempotencyConflict(idempotencyKey=request.idempotency_key, messageId=str(message.id))
    event(log, logging.INFO, "idempotent replay", messageId=str(message.id), agentId=request.agent_id)
    return ScheduleResult(
        created=False, message=message, blocked_by=message.blocked_by, superseded=message.superseded_ids
    )


def _plan(request: ScheduleRequest, ctx: UserContext, config: Policy, now: datetime) -> Decision:
    """The earliest allowed time; raises when there is none the message can use."""
    if not policy.is_timezone(ctx.settings.timezone):
        reason = f"the user's timezone {ctx.settings.timezone!r} is not a known IANA name"
        raise ValidationError([{"field": "userId", "reason": reason}])
    span = timedelta(seconds=sequence_span(request.parts))
    user = located(ctx, config, request.agent_id, transactional=request.transactional)
    decision = policy.plan(
        user.settings,
        config.limits,
        ctx.history,
        now,
        request.priority,
        request.can_delay,
        span=span,
        urgent_skips_quiet=config.privileged(request.agent_id),
    )
    refusal = REFUSED.get(decision.reason)
    if refusal is not None:
        raise refusal(userId=str(request.user_id))
    if decision.at is None:
        raise NotDeliverable("no allowed delivery time within the planning horizon", reason=decision.reason)
    if rules.expires_before(decision.at, request.expires_at):
        assert request.expires_at is not None
        raise NotDeliverable(
            "the earliest allowed delivery time is after expiresAt",
            reason=decision.reason,
            earliestAllowed=iso(decision.at),
            expiresAt=iso(request.expires_at),
        )
    return decision


@dataclass
class _Content:
    """What schedule-time rendering produced: the text, the sequence's parts, or the failure."""

    parts: tuple[Part, ...]
    rendered: Rendered | None = None
    part_usages: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    error: RenderUnavailable | None = None


def _render_now(
    request: ScheduleRequest, store: Store, renderer: Renderer | None, config: Policy
) -> _Content:
    parts = request.parts
    wanted = request.structured or any(p.needs_render for p in parts)
    if renderer is None or request.requires_fresh_context or not wanted:
        return _Content(parts=parts)
    try:
        turns = store.conversation(request.user_id, config.conversation_turns)
        if request.structured:
            return _Content(parts=parts, rendered=render(renderer, request.message_data, turns, config))
        rendered_parts, usages = render_parts(renderer, parts, turns, config)
        return _Content(parts=rendered_parts, part_usages=usages)
    except RenderUnavailable as exc:
        return _Content(parts=parts, error=exc)  # rendered at delivery instead


def _log_renders(store: Store, message: StoredMessage, content: _Content, now: datetime) -> None:
    """Each schedule-time model call into agent_actions_log, once the message exists."""
    for position, usage in content.part_usages:
        store.log_model_call(
            message.user_id, message.id, "rendered", usage, {"part": position, "at": "schedule"}, None, now
        )
    rendered, error = content.rendered, content.error
    if rendered is not None:
        output = {"length": len(rendered.text), "at": "schedule"}
        store.log_model_call(
            message.user_id, message.id, "rendered", rendered.usage.to_log(), output, None, now
        )
    elif error is not None:
        usage = error_usage("render", error)
        store.log_model_call(
            message.user_id, message.id, "render_failed", usage, {"at": "schedule"}, error.message, now
        )


def _scheduled(tasks: TaskQueue, result: EnqueueResult, decision: Decision, now: datetime) -> None:
    """A new message stored: the ones it superseded logged, its task created, itself logged."""
    message = result.message
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
    wake(tasks, message, message.generation, message.scheduled_for, now)
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


def get_message(message_id: str, *, store: Store, caller: Caller = ANYONE) -> StoredMessage:
    """A stored message, for a caller who may act as its agent (ForbiddenAgent otherwise)."""
    parsed = parse_uuid(message_id)
    if parsed is None:
        raise ValidationError([{"field": "messageId", "reason": "must be a UUID"}])
    return _owned(store, parsed, caller)


def _owned(store: Store, message_id: uuid.UUID, caller: Caller) -> StoredMessage:
    message = store.get_message(message_id)
    if message is None:
        raise NotFound(f"no message with id {message_id}", field="messageId")
    caller.require(message.agent_id, messageId=str(message_id))
    return message


def cancel(
    message_id: str, body: Any, *, store: Store, now: datetime, caller: Caller = ANYONE
) -> CancelResult:
    """An agent withdraws a queued message: cancelled (again: the same answer); NotCancellable when
    it is being sent or already final; Forbidden when `agentId` is given and is not its agent, and
    ForbiddenAgent when the caller may not act as the message's agent (or as `agentId`)."""
    request = CancelRequest.parse(message_id, body)
    agent_id = request.agent_id
    if agent_id is not None:
        caller.require(agent_id, messageId=str(request.message_id))
    if caller.agent_ids is not None:
        # A message's agent never changes, so cancelling as the agent just read is race-free.
        agent_id = agent_id or _owned(store, request.message_id, caller).agent_id
    result = store.cancel(request.message_id, agent_id=agent_id, reason=request.reason, now=now)
    if result.error == "not_owner":
        raise Forbidden("the message belongs to another agent", messageId=str(request.message_id))
    if result.error == "not_queued":
        raise NotCancellable(messageId=str(request.message_id), status=result.status)
    assert result.message is not None
    event(
        log,
        logging.INFO,
        "message cancelled" + (" (again)" if result.already else ""),
        messageId=str(request.message_id),
        userId=str(result.message.user_id),
        agentId=result.message.agent_id,
        reason="cancelled",
    )
    return result
