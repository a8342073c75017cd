"""The Store on PostgreSQL through psycopg (DATABASE_URL; Supabase's transaction pooler included).

Every method is one `select mq_...(...)` in autocommit mode: one round trip, one transaction.
`prepare_threshold=None` because Supabase's transaction pooler (PgBouncer/Supavisor in transaction
mode) cannot keep server-side prepared statements across transactions.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from shared.domain import AccountCaps, Limits, StoredMessage
from shared.errors import StoreError, StoreUnavailable
from shared.models import (
    CancelResult,
    Claim,
    DeliveryContext,
    EnqueueResult,
    NewMessage,
    PendingEvent,
    QueueHealth,
    StaleClaim,
    TaskRef,
    Turn,
    UserContext,
)
from shared.store import decode

log = logging.getLogger(__name__)


class PostgresStore:
    def __init__(self, conninfo: str, *, max_size: int = 4, timeout: float = 5.0) -> None:
        # No connection check on checkout: it costs a round trip per call (bench: 6 instead of 3 per
        # delivery). A connection that died (database or pooler restart) fails its one call with
        # StoreUnavailable (503: Cloud Tasks and Pub/Sub retry), and the pool discards it.
        self._pool = ConnectionPool(
            conninfo,
            min_size=0,
            max_size=max_size,
            timeout=timeout,
            open=True,
            kwargs={"autocommit": True, "prepare_threshold": None, "connect_timeout": max(1, int(timeout))},
            name="message-orchestrator",
        )

    def close(self) -> None:
        self._pool.close()

    def call(self, function: str, args: Sequence[Any]) -> Any:
        """`select function(args...)`, translating database errors at this boundary."""
        placeholders = ", ".join(["%s"] * len(args))
        query = f"select {function}({placeholders})"
        try:
            with self._pool.connection() as conn:
                row = conn.execute(query, list(args)).fetchone()
        except PoolTimeout as exc:
            raise StoreUnavailable() from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StoreUnavailable() from exc
        except psycopg.Error as exc:
            raise StoreError(f"database error in {function}: {type(exc).__name__}") from exc
        return None if row is None else row[0]

    def user_context(
        self,
        user_id: uuid.UUID,
        now: datetime,
        exclude: uuid.UUID | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> UserContext | None:
        agent_id, key = idempotency or (None, None)
        return decode.user_context(self.call("mq_user_context", [user_id, now, exclude, agent_id, key]))

    def enqueue(self, message: NewMessage) -> EnqueueResult:
        r = message.request
        doc = self.call(
            "mq_enqueue",
            [
                r.user_id,
                r.agent_id,
                Jsonb(r.message_data),
                message.final_message,
                message.scheduled_for,
                r.priority,
                r.can_delay,
                r.requires_fresh_context,
                r.conversation_id,
                r.idempotency_key,
                r.request_hash,
                r.expires_at,
                message.reason,
                message.now,
                r.topic_key,
                None if not message.parts else Jsonb(decode.parts_param(message.parts)),
            ],
        )
        return decode.enqueue_result(doc)

    def get_message(self, message_id: uuid.UUID) -> StoredMessage | None:
        doc = self.call("mq_get", [message_id])
        return None if doc is None else decode.message(doc)

    def delivery_context(self, message_id: uuid.UUID, now: datetime) -> DeliveryContext | None:
        return decode.delivery_context(self.call("mq_delivery_context", [message_id, now]))

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
        doc = self.call(
            "mq_claim",
            [
                message_id,
                generation,
                now,
                lease_seconds,
                limits.cooldown_seconds,
                limits.hourly_limit,
                daily_cap,
                day_start,
                day_end,
                weekly_cap,
                week[0] if week else None,
                week[1] if week else None,
                Jsonb(account.to_json()) if account and account.enabled else None,
            ],
        )
        return decode.claim(doc)

    def reschedule(
        self, message_id: uuid.UUID, generation: int, at: datetime, reason: str, now: datetime
    ) -> int | None:
        doc = self.call("mq_reschedule", [message_id, generation, at, reason, now])
        return None if doc is None else int(doc)

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
        doc = self.call("mq_record_sent", [message_id, token, sid, body, now, local_date, reconciled])
        return bool(doc and doc.get("recorded"))

    def record_part(
        self, message_id: uuid.UUID, token: uuid.UUID, *, position: int, sid: str, now: datetime
    ) -> bool:
        doc = self.call("mq_record_part", [message_id, token, position, sid, now])
        return bool(doc and doc.get("recorded"))

    def cancel(
        self, message_id: uuid.UUID, *, agent_id: str | None, reason: str | None, now: datetime
    ) -> CancelResult:
        return decode.cancel_result(self.call("mq_cancel", [message_id, agent_id, reason, now]))

    def conversation(self, user_id: uuid.UUID, limit: int) -> list[Turn]:
        return decode.turns(self.call("mq_conversation", [user_id, limit]))

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
        self.call(
            "mq_log_model_call",
            [
                user_id,
                message_id,
                action,
                Jsonb(usage),
                None if output is None else Jsonb(output),
                error,
                now,
            ],
        )

    def record_part_render(
        self, message_id: uuid.UUID, position: int, text: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        return bool(self.call("mq_record_part_render", [message_id, position, text, Jsonb(usage), now]))

    def record_render(self, message_id: uuid.UUID, text: str, usage: dict[str, Any], now: datetime) -> bool:
        return bool(self.call("mq_record_render", [message_id, text, Jsonb(usage), now]))

    def render_failed(
        self, message_id: uuid.UUID, *, error: str, usage: dict[str, Any], max_attempts: int, now: datetime
    ) -> tuple[str, int]:
        doc = self.call("mq_render_failed", [message_id, error, Jsonb(usage), max_attempts, now])
        return decode.render_failed(doc)

    def supersede_stale(
        self, message_id: uuid.UUID, *, reason: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        return bool(self.call("mq_supersede_stale", [message_id, reason, Jsonb(usage), now]))

    def release(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, now: datetime, max_attempts: int
    ) -> str:
        return decode.release_status(self.call("mq_release", [message_id, token, error, now, max_attempts]))

    def fail(self, message_id: uuid.UUID, *, error: str, reason: str, now: datetime) -> bool:
        return bool(self.call("mq_fail", [message_id, error, reason, now]))

    def expire(self, message_id: uuid.UUID, now: datetime) -> bool:
        return bool(self.call("mq_expire", [message_id, now]))

    def hold_for_reconcile(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, reconcile_at: datetime, now: datetime
    ) -> bool:
        return bool(self.call("mq_hold_for_reconcile", [message_id, token, error, reconcile_at, now]))

    def take_stale_claims(
        self, now: datetime, *, lease_seconds: int, limit: int, message_id: uuid.UUID | None = None
    ) -> list[StaleClaim]:
        return decode.stale_claims(self.call("mq_take_stale_claims", [now, lease_seconds, limit, message_id]))

    def requeue_claim(
        self, message_id: uuid.UUID, token: uuid.UUID, *, reason: str, now: datetime
    ) -> int | None:
        doc = self.call("mq_requeue_claim", [message_id, token, reason, now])
        return None if doc is None else int(doc)

    def sweep_overdue(self, now: datetime, *, grace_seconds: int, limit: int) -> list[TaskRef]:
        return decode.task_refs(self.call("mq_sweep_overdue", [now, grace_seconds, limit]))

    def sweep_horizon(self, now: datetime, *, horizon_seconds: int, limit: int) -> list[TaskRef]:
        return decode.task_refs(self.call("mq_sweep_horizon", [now, horizon_seconds, limit]))

    def sweep_expire(self, now: datetime, *, limit: int) -> int:
        return int(self.call("mq_sweep_expire", [now, limit]) or 0)

    def record_sweep(
        self,
        trigger: str,
        started_at: datetime,
        finished_at: datetime,
        counts: dict[str, int],
        error: str | None,
    ) -> None:
        self.call("mq_record_sweep", [trigger, started_at, finished_at, Jsonb(counts), error])

    def health(self, now: datetime) -> QueueHealth:
        return decode.health(self.call("mq_health", [now]))

    def inbound(
        self, from_number: str, body: str, sid: str, *, keyword: str | None, num_media: int, now: datetime
    ) -> dict[str, Any]:
        return dict(self.call("mq_inbound", [from_number, body, sid, keyword, num_media, now]))

    def status_callback(self, sid: str, status: str, error_code: str | None, now: datetime) -> dict[str, Any]:
        return dict(self.call("mq_status_callback", [sid, status, error_code, now]))

    def events_pending(self, limit: int, *, lease_seconds: int, now: datetime) -> list[PendingEvent]:
        return decode.pending_events(self.call("mq_events_pending", [limit, lease_seconds, now]))

    def events_published(self, ids: list[int], now: datetime) -> int:
        return int(self.call("mq_events_published", [ids, now]) or 0)

    def events_failed(self, ids: list[int], error: str, now: datetime) -> int:
        return int(self.call("mq_events_failed", [ids, error, now]) or 0)

    # Not part of the use cases' port: demo, tests and operators.
    def upsert_user(self, phone_number: str, timezone: str, **settings: Any) -> dict[str, Any]:
        names = ["p_" + k for k in settings]
        args: list[Any] = [phone_number, timezone, *settings.values()]
        named = ", ".join(f"{n} => %s" for n in names)
        query_args = ", ".join(["%s", "%s"] + ([named] if named else []))
        try:
            with self._pool.connection() as conn:
                row = conn.execute(f"select mq_upsert_user({query_args})", args).fetchone()
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise StoreUnavailable() from exc
        except psycopg.Error as exc:
            raise StoreError(f"database error in mq_upsert_user: {type(exc).__name__}") from exc
        assert row is not None
        return dict(row[0])

    def record_inbound(self, user_id: uuid.UUID, body: str, sid: str | None, now: datetime) -> dict[str, Any]:
        return dict(self.call("mq_record_inbound", [user_id, body, sid, now]))
