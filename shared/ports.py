"""The interfaces the use cases need. Adapters implement them; tests may fake only those that leave
the machine (Cloud Tasks, Twilio, Pub/Sub, Anthropic), never the Store."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from shared.domain import AccountCaps, Admission, Limits, StoredMessage
from shared.models import (
    CancelResult,
    Claim,
    ConsentHistory,
    DeliveryContext,
    EnqueueResult,
    MessageFilter,
    NewMessage,
    PendingEvent,
    QueueHealth,
    Relevance,
    Rendered,
    SentRecord,
    StaleClaim,
    TaskRef,
    Turn,
    UserContext,
)


class Store(Protocol):
    """The database. Every method is one atomic SQL function call (one transaction).

    Raises shared.errors.StoreUnavailable when the database cannot be reached.
    """

    def user_context(
        self,
        user_id: uuid.UUID,
        now: datetime,
        exclude: uuid.UUID | None = None,
        idempotency: tuple[str, str] | None = None,
        admission: Admission | None = None,
        due_only: bool = False,
    ) -> UserContext | None:
        """The user's settings, recent sends, queued reservations (but `exclude`) and last inbound;
        None if there is no such user. With idempotency = (agent id, key) and a message stored under
        it, that message as `replay` instead of the history. With `admission`, raises
        UserQueueFull or AgentRateLimited when the request is past its limits (a replay is not).
        With `due_only`, only the reservations due by `now` and no topic reservations: what a
        delivery's check reads, at a cost that does not grow with the user's backlog."""
        ...

    def enqueue(self, message: NewMessage) -> EnqueueResult:
        """Insert a queued message (or return the earlier one with the same idempotency key);
        within message.admission's limits, checked atomically (raises as user_context does)."""
        ...

    def get_message(self, message_id: uuid.UUID) -> StoredMessage | None: ...

    def delivery_context(self, message_id: uuid.UUID, now: datetime) -> DeliveryContext | None:
        """The message and its user's context, or None if there is no such message. Of the user's
        other queued messages, only those due by `now` (what the delivery-time check reads)."""
        ...

    def claim(
        self,
        message_id: uuid.UUID,
        generation: int,
        now: datetime,
        *,
        limits: Limits,
        daily_cap: int,
        day_start: datetime,
        day_end: datetime,
        lease_seconds: int,
        weekly_cap: int | None = None,
        week: tuple[datetime, datetime] | None = None,
        account: AccountCaps | None = None,
    ) -> Claim:
        """Move a queued message to 'sending' if, under the user's row lock, no limit forbids it."""
        ...

    def reschedule(
        self, message_id: uuid.UUID, generation: int, at: datetime, reason: str, now: datetime
    ) -> int | None:
        """Plan a queued message for `at`; returns the new task generation, None if not queued."""
        ...

    def record_sent(
        self,
        message_id: uuid.UUID,
        token: uuid.UUID,
        *,
        sid: str,
        body: str,
        now: datetime,
        local_date: str,
        reconciled: bool = False,
    ) -> bool:
        """Mark sent, write the outbound messages row and count the budget, in one transaction.
        `reconciled`: found at Twilio after the claim's holder lost track of it."""
        ...

    def record_part(
        self, message_id: uuid.UUID, token: uuid.UUID, *, position: int, sid: str, now: datetime
    ) -> bool:
        """One part of a claimed sequence went out (with its outbound messages row): never resent."""
        ...

    def cancel(
        self, message_id: uuid.UUID, *, agent_id: str | None, reason: str | None, now: datetime
    ) -> CancelResult:
        """Withdraw a queued message (only `agent_id`'s own, when given). Raises NotFound."""
        ...

    def conversation(self, user_id: uuid.UUID, limit: int) -> list[Turn]:
        """The user's latest `limit` messages (both directions), oldest first."""
        ...

    def log_model_call(
        self,
        user_id: uuid.UUID,
        message_id: uuid.UUID,
        action: str,
        usage: dict[str, Any],
        output: dict[str, Any] | None,
        error: str | None,
        now: datetime,
    ) -> None:
        """One model call (model, tokens, latency, cost) into agent_actions_log."""
        ...

    def record_part_render(
        self, message_id: uuid.UUID, position: int, text: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        """The rendered text of one structured part of a queued sequence."""
        ...

    def record_render(self, message_id: uuid.UUID, text: str, usage: dict[str, Any], now: datetime) -> bool:
        """The rendered text of a queued message (logged with the call's usage)."""
        ...

    def render_failed(
        self, message_id: uuid.UUID, *, error: str, usage: dict[str, Any], max_attempts: int, now: datetime
    ) -> tuple[str, int]:
        """A failed render counted; (status, render attempts): 'failed' once the attempts are spent."""
        ...

    def supersede_stale(
        self, message_id: uuid.UUID, *, reason: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        """A queued message the model judged stale: superseded, nothing sent, no budget used."""
        ...

    def release(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, now: datetime, max_attempts: int
    ) -> str:
        """Give a claim back after a transient failure; returns the new status (queued or failed)."""
        ...

    def fail(self, message_id: uuid.UUID, *, error: str, reason: str, now: datetime) -> bool:
        """Mark a queued or sending message failed for good."""
        ...

    def expire(self, message_id: uuid.UUID, now: datetime) -> bool:
        """Mark a queued message expired."""
        ...

    def hold_for_reconcile(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, reconcile_at: datetime, now: datetime
    ) -> bool:
        """Keep a claim whose send outcome is unknown until `reconcile_at` (its slot keeps counting)."""
        ...

    def take_stale_claims(
        self, now: datetime, *, lease_seconds: int, limit: int, message_id: uuid.UUID | None = None
    ) -> list[StaleClaim]:
        """Re-claim 'sending' rows whose lease ran out, for reconciliation (SKIP LOCKED)."""
        ...

    def requeue_claim(
        self, message_id: uuid.UUID, token: uuid.UUID, *, reason: str, now: datetime
    ) -> int | None:
        """The provider never got a stale claim's message: queued again, due now; the new generation."""
        ...

    def sweep_overdue(self, now: datetime, *, grace_seconds: int, limit: int) -> list[TaskRef]:
        """Queued rows overdue (their task lost): bumped to a new generation that needs a task."""
        ...

    def sweep_horizon(self, now: datetime, *, horizon_seconds: int, limit: int) -> list[TaskRef]:
        """Queued rows planned beyond the task horizon that came within it: they need a task."""
        ...

    def sweep_expire(self, now: datetime, *, limit: int) -> int:
        """Expire queued rows past expires_at; how many."""
        ...

    def record_sweep(
        self,
        trigger: str,
        started_at: datetime,
        finished_at: datetime,
        counts: dict[str, int],
        error: str | None,
    ) -> None: ...

    def health(self, now: datetime) -> QueueHealth: ...

    def inbound(
        self,
        from_number: str,
        body: str,
        sid: str,
        *,
        keyword: str | None,
        num_media: int,
        now: datetime,
        source: str | None = None,
    ) -> dict[str, Any]:
        """Record an inbound SMS (deduplicated by sid); a `keyword` (stop/start/help, recognised as
        `source` keyword or phrase) changes consent and is written to the consent ledger in the
        same transaction; emits inbound_message."""
        ...

    def fail_opted_out(self, message_id: uuid.UUID, *, error: str, now: datetime) -> bool:
        """The provider refused a send because the recipient unsubscribed (Twilio 21610): the
        message fails and the user is opted out (ledger row, queued messages cancelled), atomically.
        False when the message was no longer queued or sending (then nothing changed)."""
        ...

    def consent_history(self, user_id: uuid.UUID, limit: int) -> ConsentHistory | None:
        """The user's consent ledger, newest first (at most `limit` rows); None for no such user."""
        ...

    def list_messages(
        self, user_id: uuid.UUID, limit: int, which: MessageFilter
    ) -> list[StoredMessage] | None:
        """A user's messages newest first by (created_at, id), at most `limit`, those `which`
        selects; each with its delivery status, no timeline. None for no such user."""
        ...

    def set_timezone(
        self, user_id: uuid.UUID, timezone: str, *, source: str, now: datetime, only_if_unknown: bool = False
    ) -> bool:
        """Store a user's timezone with its source (`phone_number`, `user`); with `only_if_unknown`,
        only if it is not known yet. Whether a row changed."""
        ...

    def status_callback(self, sid: str, status: str, error_code: str | None, now: datetime) -> dict[str, Any]:
        """Move an outbound message's status forward (never back); emits delivered/failed events."""
        ...

    def events_pending(self, limit: int, *, lease_seconds: int, now: datetime) -> list[PendingEvent]: ...

    def events_published(self, ids: list[int], now: datetime) -> int: ...

    def events_failed(self, ids: list[int], error: str, now: datetime) -> int: ...


class Renderer(Protocol):
    def render(
        self, message_data: Mapping[str, Any], *, conversation: Sequence[Turn], max_length: int
    ) -> Rendered:
        """The SMS text for `message_data`. Raises RenderUnavailable."""
        ...

    def judge_relevance(
        self,
        text: str,
        message_data: Mapping[str, Any],
        *,
        conversation: Sequence[Turn],
        queued_at: datetime,
    ) -> Relevance:
        """Whether `text`, queued at `queued_at`, is still worth sending. Raises RenderUnavailable."""
        ...


class EventPublisher(Protocol):
    """Pub/Sub: events for agents. `topic` is logical ("events" or "inbound")."""

    def publish(
        self, topic: str, data: bytes, attributes: dict[str, str], *, timeout: float | None = None
    ) -> str:
        """Publish one message; returns its id. Raises shared.errors.Unavailable on failure, and
        within `timeout` seconds, retries included, when given (else the adapter's own bound)."""
        ...


class TaskQueue(Protocol):
    """Cloud Tasks: wake deliver_message for a message at a time. Idempotent per generation."""

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        """Create the task; returns its name, or None when `at` is beyond the queue's horizon.

        Raises shared.errors.Unavailable if the task could not be created.
        """
        ...


class SmsSender(Protocol):
    """Twilio."""

    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        """Send one SMS; returns the provider's message sid.

        Raises PermanentSendError (never retry) or TransientSendError (retry later; its
        `maybe_sent` says whether the provider may have accepted it anyway).
        """
        ...

    def find_sent(self, to: str, body: str, *, since: datetime) -> list[SentRecord]:
        """The provider's records of messages with this body to `to`, accepted at or after `since`,
        newest first (several messages may share a text: the caller picks one no other row owns).
        The body matches after the provider's own rewriting (Twilio's Smart Encoding), nothing more.

        Raises TransientSendError when the provider cannot be asked.
        """
        ...
