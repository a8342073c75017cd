"""The delivery gate, one Cloud Task at a time: re-check → decide → prepare the text → claim → send
→ record. Safe to run any number of times for the same task."""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from shared import policy
from shared.domain import FINAL_STATUSES, SENDING, Policy, StoredMessage, sequence_span
from shared.models import Claim, Outcome, UserContext
from shared.policy import Decision, rules
from shared.ports import Renderer, SmsSender, Store, TaskQueue
from shared.service.attempt import DeliveryAttempt
from shared.service.common import Clock, located, outcome
from shared.service.content import prepare_content
from shared.service.reconcile import DEFERRED, reconcile
from shared.service.send import send
from shared.small_requests import parse_task


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
    """Handle one Cloud Task's body ({"messageId", "generation"}).

    `sleep` paces the parts of a sequence (tests pass one that advances their virtual clock)."""
    message_id, generation = parse_task(body)
    now = clock()
    ctx = store.delivery_context(message_id, now)
    if ctx is None:
        return outcome(logging.WARNING, message_id, "skipped", "not_found", "unknown")
    m = ctx.message
    if policy.is_timezone(ctx.user.settings.timezone):  # else _settled fails the message
        ctx = replace(ctx, user=located(ctx.user, config, m.agent_id, transactional=m.transactional))
    a = DeliveryAttempt(
        store=store,
        tasks=tasks,
        sms=sms,
        config=config,
        clock=clock,
        ctx=ctx,
        now=now,
        renderer=renderer,
        sleep=sleep,
        fields={"userId": str(m.user_id), "agentId": m.agent_id, "priority": m.priority},
    )
    # Each step answers an Outcome (always truthy) when the delivery ends there, else None.
    return _settled(a, generation) or _recheck(a) or prepare_content(a) or _claim_and_send(a)


def _settled(a: DeliveryAttempt, generation: int | None) -> Outcome | None:
    """What this task should not act on: a final or in-flight row, an old task, an expired message,
    a user whose timezone is unknown, a wake-up before the planned time."""
    m = a.message
    if m.status in FINAL_STATUSES:
        return a.skip(f"already_{m.status}")
    if m.status == SENDING:
        return _in_flight(a)
    if generation is not None and generation != m.generation:
        return a.skip("stale_task", taskGeneration=generation)
    if m.expires_at is not None and m.expires_at <= a.now:
        return a.expire()
    timezone = a.ctx.user.settings.timezone
    if not policy.is_timezone(timezone):
        a.store.fail(m.id, error=f"unknown timezone {timezone!r}", reason="invalid_timezone", now=a.now)
        return a.answer(logging.ERROR, "failed", "invalid_timezone", "failed")
    if rules.woken_early(a.now, m.scheduled_for):
        # Keep the plan, with a fresh task.
        return a.defer(m.scheduled_for, "early_task")
    return None


def _in_flight(a: DeliveryAttempt) -> Outcome:
    m = a.message
    if m.lease_expires_at is not None and m.lease_expires_at <= a.now:
        # The claim's holder died or timed out: ask Twilio before anything is sent again.
        claims = a.store.take_stale_claims(
            a.now, lease_seconds=a.config.lease_seconds, limit=1, message_id=m.id
        )
        if claims:
            result = reconcile(
                claims[0], store=a.store, tasks=a.tasks, sms=a.sms, config=a.config, clock=a.clock
            )
            if result == DEFERRED:
                return a.answer(logging.WARNING, "retry", f"reconciled_{result}", m.status)
            return a.answer(logging.INFO, "reconciled", f"reconciled_{result}", m.status)
    if m.reason == "outcome_unknown":
        # Keep Cloud Tasks retrying with backoff until the hold ends and this task can reconcile.
        return a.answer(logging.INFO, "retry", "awaiting_reconciliation", m.status)
    return a.skip("in_flight")


def remaining_span(m: StoredMessage) -> timedelta:
    """How long the rest of a sequence takes once it starts (zero for a single message)."""
    return timedelta(seconds=sequence_span(tuple(p for p in m.parts if not p.sent)))


def _check(a: DeliveryAttempt, user: UserContext) -> Decision:
    """The policy now, for this message and this view of its user."""
    m = a.message
    return policy.check_now(
        user.settings,
        a.config.limits,
        user.history,
        a.now,
        m.priority,
        m.can_delay,
        span=remaining_span(m),
        urgent_skips_quiet=a.config.privileged(m.agent_id),
    )


def _recheck(a: DeliveryAttempt) -> Outcome | None:
    """The policy at execution time, against the sends made so far."""
    m, user = a.message, a.ctx.user
    decision = _check(a, user)
    if rules.never_sends(decision.reason):
        return a.fail(decision.reason, policy.REASONS[decision.reason])
    if rules.yields_to(m.priority, user.history.reservations, a.now):
        return a.defer(rules.yield_until(a.now, a.config.limits), "priority_yield")
    if not decision.allowed_now:
        return _replan(a, decision.reason, refresh=False)
    return None


def _replan(a: DeliveryAttempt, reason: str, *, refresh: bool) -> Outcome:
    """Not allowed now: a new task at the next allowed time.

    The next allowed time is the hard one (sends made, quiet hours), not a fresh plan around the
    user's other queued messages: those were spread when they were scheduled, and re-spreading a
    message that slipped by a second behind a reservation planned for it would push it an hour.
    `refresh`: the database refused a claim the policy allowed (a racing claim it had not seen),
    so plan from what the database holds now.
    """
    m = a.message
    user = a.ctx.user
    if refresh:
        fresh = a.store.user_context(m.user_id, a.now, exclude=m.id, due_only=True)
        if fresh is not None:
            user = located(fresh, a.config, m.agent_id, transactional=m.transactional)
    decision = _check(a, user)
    if rules.never_sends(decision.reason):
        return a.fail(decision.reason, policy.REASONS[decision.reason])
    return a.defer_before_expiry(rules.replan_at(decision.at, reason, a.now, a.config.limits), reason)


def _claim_and_send(a: DeliveryAttempt) -> Outcome:
    """Claim under the user's lock (the database re-counts every limit), then send."""
    m = a.message
    settings = a.ctx.user.settings
    limits = settings.limits(a.config.limits)
    _, day_start, day_end = policy.local_day_bounds(settings.timezone, a.now)
    claim = a.store.claim(
        m.id,
        m.generation,
        a.now,
        limits=limits,
        daily_cap=limits.cap(m.priority, m.can_delay),
        day_start=day_start,
        day_end=day_end,
        lease_seconds=a.config.lease_seconds,
        weekly_cap=limits.weekly_limit,
        week=policy.local_week_bounds(settings.timezone, a.now) if limits.weekly_limit else None,
        account=a.config.account_caps,
    )
    if not claim.claimed:
        return _refused(a, claim)
    assert claim.token is not None
    return send(a, claim.token, claim.attempts)


def _refused(a: DeliveryAttempt, claim: Claim) -> Outcome:
    action = rules.after_refused_claim(claim.reason, claim.retry_at)
    if action == rules.SKIP:
        return a.skip(claim.reason, claim.status)
    if action == rules.FAIL:
        return a.fail(claim.reason, rules.REFUSAL_ERRORS[claim.reason])
    if action == rules.EXPIRE:
        return a.expire()
    if action == rules.WAIT:
        assert claim.retry_at is not None
        return a.defer_before_expiry(rules.account_retry_at(claim.retry_at, a.now), claim.reason)
    return _replan(a, claim.reason, refresh=True)
