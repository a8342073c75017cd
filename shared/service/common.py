"""What every use case shares: the clock type, the logger, a task for a stored row, an Outcome."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from shared import compliance
from shared.domain import Policy, StoredMessage
from shared.errors import Unavailable
from shared.log import event
from shared.models import Outcome, UserContext, iso
from shared.ports import TaskQueue

log = logging.getLogger("orchestrator")

Clock = Callable[[], datetime]


def wake(tasks: TaskQueue, message: StoredMessage, generation: int, at: datetime, now: datetime) -> None:
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


def outcome(
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
    """What a delivery attempt did, logged once with everything an operator needs to act on it."""
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


def located(user: UserContext, config: Policy, agent_id: str, *, transactional: bool = False) -> UserContext:
    """The user as the policy must see them for this agent's message: where they are and the law
    there (shared.compliance); a transactional message of an allowed agent is not bound by the
    calling hours."""
    settings = compliance.recipient(
        user.settings,
        user.phone_number,
        config.compliance_profile,
        transactional=transactional and config.privileged(agent_id),
    )
    return replace(user, settings=settings)
