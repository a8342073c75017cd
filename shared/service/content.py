"""The final text of a message and whether it is still worth sending, before the claim (a model
call takes seconds; the claim's lease should not).

With requiresFreshContext, and only if the user wrote since the message was queued, the model
judges whether it is still relevant: stale → superseded, nothing sent, no budget used. Structured
messageData is rendered now if it has no text yet, or again with fresh context. A failed call keeps
the row queued and tries again later: raw data is never sent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from shared import segments
from shared.domain import QUEUED, SUPERSEDED, Part, Policy, StoredMessage
from shared.errors import RenderUnavailable
from shared.log import event
from shared.models import Outcome, Rendered, Turn
from shared.policy import rules
from shared.ports import Renderer
from shared.service.attempt import DeliveryAttempt
from shared.service.common import log

Conversation = Callable[[], list[Turn]]
Step = Callable[[DeliveryAttempt, Renderer, Conversation], Outcome | None]


def error_usage(operation: str, exc: RenderUnavailable | None) -> dict[str, Any]:
    """A failed model call as agent_actions_log records it."""
    details = dict(exc.details) if exc else {}
    return {"operation": operation, **{k: v for k, v in details.items() if isinstance(v, str | int | bool)}}


def render(renderer: Renderer, data: dict[str, Any], turns: list[Turn], config: Policy) -> Rendered:
    """Structured data rendered to the text that will be sent: smart-encoded with SMART_ENCODING,
    like a literal content. No segment limit: RENDER_MAX_LENGTH bounds it (320 characters by default:
    5 UCS-2 segments, 10 if all emoji); the store records its segments with the text."""
    out = renderer.render(data, conversation=turns, max_length=config.render_max_length)
    return replace(out, text=segments.sms_text(out.text, config.smart_encoding))


def render_parts(
    renderer: Renderer, parts: tuple[Part, ...], turns: list[Turn], config: Policy
) -> tuple[tuple[Part, ...], list[tuple[int, dict[str, Any]]]]:
    """The structured parts of a sequence rendered (all or none: raises RenderUnavailable)."""
    done: list[Part] = []
    usages: list[tuple[int, dict[str, Any]]] = []
    for p in parts:
        if p.data is not None and not p.sent:
            out = render(renderer, p.data, turns, config)
            p = replace(p, content=out.text)
            usages.append((p.position, out.usage.to_log()))
        done.append(p)
    return tuple(done), usages


def _relevance_in_doubt(m: StoredMessage, last_inbound_at: datetime | None) -> bool:
    """The user wrote since the message was queued, and it asked to be checked against that."""
    return (
        m.requires_fresh_context
        and last_inbound_at is not None
        and m.created_at is not None
        and last_inbound_at > m.created_at
    )


def _parts_to_render(m: StoredMessage) -> bool:
    return (
        m.is_sequence
        and any(p.data is not None and not p.sent for p in m.parts)
        and (m.requires_fresh_context or any(p.needs_render for p in m.parts))
    )


def prepare_content(a: DeliveryAttempt) -> Outcome | None:
    """None when the message is ready to send (its rendered text in `a.message`), else what
    happened instead (superseded, deferred after a failed render, failed, skipped)."""
    m = a.message
    check = _relevance_in_doubt(m, a.ctx.user.history.last_inbound_at)
    render_sequence = _parts_to_render(m)
    render_single = m.structured and (not m.content or m.requires_fresh_context)
    if not (check or render_sequence or render_single):
        return None
    renderer = a.renderer
    if renderer is None:
        return render_failed(a, RenderUnavailable("no renderer"), "relevance" if check else "render")
    turns: list[list[Turn]] = []

    def conversation() -> list[Turn]:
        if not turns:
            turns.append(a.store.conversation(m.user_id, a.config.conversation_turns))
        return turns[0]

    steps: list[tuple[bool, Step]] = [
        (check, _check_relevance),
        (render_sequence, _render_sequence),
        (render_single, _render_single),
    ]
    for wanted, step in steps:
        done = step(a, renderer, conversation) if wanted else None
        if done is not None:
            return done
    return None


def _check_relevance(a: DeliveryAttempt, renderer: Renderer, conversation: Conversation) -> Outcome | None:
    m = a.message
    assert m.created_at is not None
    turns = conversation()
    try:
        verdict = renderer.judge_relevance(
            m.content, m.message_data, conversation=turns, queued_at=m.created_at
        )
    except RenderUnavailable as exc:
        return render_failed(a, exc, "relevance")
    if not verdict.relevant:
        if not a.store.supersede_stale(m.id, reason=verdict.reason, usage=verdict.usage.to_log(), now=a.now):
            return a.skip("not_queued")
        return a.answer(logging.INFO, "superseded", "stale", SUPERSEDED, explanation=verdict.reason)
    a.store.log_model_call(
        m.user_id,
        m.id,
        "relevance_checked",
        verdict.usage.to_log(),
        {"relevant": True, "reason": verdict.reason},
        None,
        a.now,
    )
    return None


def _render_sequence(a: DeliveryAttempt, renderer: Renderer, conversation: Conversation) -> Outcome | None:
    m = a.message
    try:
        parts, usages = render_parts(renderer, m.parts, conversation(), a.config)
    except RenderUnavailable as exc:
        return render_failed(a, exc, "render")
    by_position = {p.position: p for p in parts}
    for position, usage in usages:
        if not a.store.record_part_render(m.id, position, by_position[position].content, usage, a.now):
            return a.skip("not_queued")
    a.update(replace(m, parts=parts, content="\n".join(p.content for p in parts)))
    return None


def _render_single(a: DeliveryAttempt, renderer: Renderer, conversation: Conversation) -> Outcome | None:
    m = a.message
    try:
        rendered = render(renderer, m.message_data, conversation(), a.config)
    except RenderUnavailable as exc:
        return render_failed(a, exc, "render")
    if not a.store.record_render(m.id, rendered.text, rendered.usage.to_log(), a.now):
        return a.skip("not_queued")
    a.update(replace(m, content=rendered.text))
    return None


def render_failed(a: DeliveryAttempt, exc: RenderUnavailable, operation: str) -> Outcome:
    """A failed model call counted: the message stays queued with a backoff, or fails once its
    render attempts are spent."""
    m = a.message
    status, attempts = a.store.render_failed(
        m.id,
        error=exc.message,
        usage=error_usage(operation, exc),
        max_attempts=a.config.max_attempts,
        now=a.now,
    )
    if status == "failed":
        return a.answer(
            logging.ERROR, "failed", "render_failed", status, error=exc.message, attempts=attempts
        )
    if status != QUEUED:
        return a.skip("not_queued", status)
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
    return a.defer(a.now + rules.render_backoff(attempts), "render_unavailable")
