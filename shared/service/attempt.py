"""DeliveryAttempt: what every step of one delivery needs (the ports, the policy, the clock, the
message and its user as loaded, the instant the attempt started), and the small moves each step
ends with: defer, expire, fail, answer."""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from shared.domain import EXPIRED, FAILED, QUEUED, Policy, StoredMessage
from shared.models import DeliveryContext, Outcome
from shared.policy import rules
from shared.ports import Renderer, SmsSender, Store, TaskQueue
from shared.service.common import Clock, outcome, wake


@dataclass
class DeliveryAttempt:
    store: Store
    tasks: TaskQueue
    sms: SmsSender
    config: Policy
    clock: Clock
    ctx: DeliveryContext
    now: datetime
    renderer: Renderer | None = None
    sleep: Callable[[float], None] = _time.sleep
    # Logged with every outcome of this attempt.
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> StoredMessage:
        return self.ctx.message

    def update(self, message: StoredMessage) -> None:
        """The message with the text rendered for this attempt."""
        self.ctx = replace(self.ctx, message=message)

    def answer(self, level: int, action: str, reason: str, status: str, **extra: Any) -> Outcome:
        return outcome(level, self.message.id, action, reason, status, **extra, **self.fields)

    def skip(self, reason: str, status: str | None = None, **extra: Any) -> Outcome:
        return self.answer(logging.INFO, "skipped", reason, status or self.message.status, **extra)

    def fail(self, reason: str, error: str) -> Outcome:
        self.store.fail(self.message.id, error=error, reason=reason, now=self.now)
        return self.answer(logging.INFO, FAILED, reason, FAILED)

    def expire(self, reason: str = EXPIRED) -> Outcome:
        self.store.expire(self.message.id, self.now)
        return self.answer(logging.INFO, EXPIRED, reason, EXPIRED)

    def defer(self, at: datetime, reason: str) -> Outcome:
        """Plan the row for `at` with a new task; skipped if it is no longer queued."""
        m = self.message
        generation = self.store.reschedule(m.id, m.generation, at, reason, self.now)
        if generation is None:
            return self.skip("not_queued")
        wake(self.tasks, m, generation, at, self.now)
        return self.answer(logging.INFO, "deferred", reason, QUEUED, scheduled_for=at, generation=generation)

    def defer_before_expiry(self, at: datetime, reason: str) -> Outcome:
        """Defer to `at`, unless the message expires first: then it expires now."""
        if rules.expires_before(at, self.message.expires_at):
            return self.expire(f"expires_before_allowed:{reason}")
        return self.defer(at, reason)
