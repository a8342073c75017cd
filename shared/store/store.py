"""The Store, written once over the SQL functions in infra/supabase/migrations.

Every method is ONE call of one `mq_*` function: one round trip, one transaction, whichever driver
carries it (psycopg straight to Postgres, or supabase-py's rpc() to PostgREST). Arguments are named
as in the SQL function minus its `p_` prefix, so each signature is spelled once in Python, and the
drivers turn names and values into their own wire form. Results are the function's jsonb (or
scalar), decoded by shared.store.decode.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from shared import models, segments
from shared.domain import AccountCaps, Admission, Limits, StoredMessage
from shared.log import scrub
from shared.store import decode
from shared.store.driver import Driver, Json
from shared.store.reads import QueueReads


def _json(value: Any) -> Json | None:
    """SQL NULL for None: a JSON `null` would be a value the functions do not expect."""
    return None if value is None else Json(value)


def _admission_args(admission: Admission | None) -> dict[str, Any]:
    """mq_user_context's and mq_enqueue's admission parameters (null: no limit)."""
    return {
        "user_queue_limit": admission.user_queue_limit if admission else None,
        "agent_rate_per_minute": admission.agent_rate_per_minute if admission else None,
    }


def _generation(doc: Any) -> int | None:
    return None if doc is None else int(doc)


def _recorded(doc: Any) -> bool:
    return bool(doc and doc.get("recorded"))


class SqlStore(QueueReads):
    """shared.ports.Store over a Driver, plus the helpers demo, tests and operators use."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    def call(self, function: str, /, **args: Any) -> Any:
        """Every method goes through here: tests and the bench override it to count round trips.
        An `error` text is scrubbed of phone numbers first: it is stored (last_error, the decision
        log) and answered to agents (lastError)."""
        if isinstance(args.get("error"), str):
            args["error"] = scrub(args["error"])
        return self._driver.call(function, **args)

    def close(self) -> None:
        self._driver.close()

    def user_context(
        self,
        user_id: uuid.UUID,
        now: datetime,
        exclude: uuid.UUID | None = None,
        idempotency: tuple[str, str] | None = None,
        admission: Admission | None = None,
        due_only: bool = False,
    ) -> models.UserContext | None:
        agent_id, key = idempotency or (admission.agent_id if admission else None, None)
        doc = self.call(
            "mq_user_context",
            user_id=user_id,
            now=now,
            exclude=exclude,
            agent_id=agent_id,
            idempotency_key=key,
            topic_key=admission.topic_key if admission else None,
            **_admission_args(admission),
            due_only=due_only,
        )
        return decode.user_context(doc)

    def enqueue(self, message: models.NewMessage) -> models.EnqueueResult:
        r = message.request
        doc = self.call(
            "mq_enqueue",
            user_id=r.user_id,
            agent_id=r.agent_id,
            message_data=Json(r.message_data),
            final_message=message.final_message,
            scheduled_for=message.scheduled_for,
            priority=r.priority,
            can_delay=r.can_delay,
            requires_fresh_context=r.requires_fresh_context,
            conversation_id=r.conversation_id,
            idempotency_key=r.idempotency_key,
            request_hash=r.request_hash,
            expires_at=r.expires_at,
            reason=message.reason,
            now=message.now,
            topic_key=r.topic_key,
            parts=_json(decode.parts_param(message.parts)),
            **_admission_args(message.admission),
            transactional=r.transactional,
            **decode.segments_args(message.segments),
            blocked_by=list(message.blocked_by),
        )
        return decode.enqueue_result(doc)

    def get_message(self, message_id: uuid.UUID) -> StoredMessage | None:
        doc = self.call("mq_get", message_id=message_id)
        return None if doc is None else decode.message(doc)

    def delivery_context(self, message_id: uuid.UUID, now: datetime) -> models.DeliveryContext | None:
        return decode.delivery_context(self.call("mq_delivery_context", message_id=message_id, now=now))

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
    ) -> models.Claim:
        week_start, week_end = week or (None, None)
        doc = self.call(
            "mq_claim",
            message_id=message_id,
            generation=generation,
            now=now,
            lease_seconds=lease_seconds,
            cooldown_seconds=limits.cooldown_seconds,
            hourly_limit=limits.hourly_limit,
            daily_cap=daily_cap,
            day_start=day_start,
            day_end=day_end,
            weekly_cap=weekly_cap,
            week_start=week_start,
            week_end=week_end,
            account=Json(account.to_json()) if account and account.enabled else None,
        )
        return decode.claim(doc)

    def reschedule(
        self, message_id: uuid.UUID, generation: int, at: datetime, reason: str, now: datetime
    ) -> int | None:
        doc = self.call(
            "mq_reschedule", message_id=message_id, generation=generation, at=at, reason=reason, now=now
        )
        return _generation(doc)

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
        doc = self.call(
            "mq_record_sent",
            message_id=message_id,
            token=token,
            sid=sid,
            body=body,
            now=now,
            local_date=local_date,
            reconciled=reconciled,
        )
        return _recorded(doc)

    def record_part(
        self, message_id: uuid.UUID, token: uuid.UUID, *, position: int, sid: str, now: datetime
    ) -> bool:
        doc = self.call(
            "mq_record_part", message_id=message_id, token=token, position=position, sid=sid, now=now
        )
        return _recorded(doc)

    def cancel(
        self, message_id: uuid.UUID, *, agent_id: str | None, reason: str | None, now: datetime
    ) -> models.CancelResult:
        doc = self.call("mq_cancel", message_id=message_id, agent_id=agent_id, reason=reason, now=now)
        return decode.cancel_result(doc)

    def conversation(self, user_id: uuid.UUID, limit: int) -> list[models.Turn]:
        return decode.turns(self.call("mq_conversation", user_id=user_id, limit=limit))

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
            user_id=user_id,
            message_id=message_id,
            action=action,
            usage=Json(usage),
            output=_json(output),
            error=error,
            now=now,
        )

    def record_part_render(
        self, message_id: uuid.UUID, position: int, text: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        # The text's segments are stored with it, counted here so that no caller can forget them.
        doc = self.call(
            "mq_record_part_render",
            message_id=message_id,
            position=position,
            text=text,
            usage=Json(usage),
            now=now,
            **decode.segments_args(segments.count(text)),
        )
        return bool(doc)

    def record_render(self, message_id: uuid.UUID, text: str, usage: dict[str, Any], now: datetime) -> bool:
        doc = self.call(
            "mq_record_render",
            message_id=message_id,
            text=text,
            usage=Json(usage),
            now=now,
            **decode.segments_args(segments.count(text)),
        )
        return bool(doc)

    def render_failed(
        self, message_id: uuid.UUID, *, error: str, usage: dict[str, Any], max_attempts: int, now: datetime
    ) -> tuple[str, int]:
        doc = self.call(
            "mq_render_failed",
            message_id=message_id,
            error=error,
            usage=Json(usage),
            max_attempts=max_attempts,
            now=now,
        )
        return decode.render_failed(doc)

    def supersede_stale(
        self, message_id: uuid.UUID, *, reason: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        doc = self.call(
            "mq_supersede_stale", message_id=message_id, reason=reason, usage=Json(usage), now=now
        )
        return bool(doc)

    def release(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, now: datetime, max_attempts: int
    ) -> str:
        doc = self.call(
            "mq_release", message_id=message_id, token=token, error=error, now=now, max_attempts=max_attempts
        )
        return decode.release_status(doc)

    def fail(self, message_id: uuid.UUID, *, error: str, reason: str, now: datetime) -> bool:
        return bool(self.call("mq_fail", message_id=message_id, error=error, reason=reason, now=now))

    def expire(self, message_id: uuid.UUID, now: datetime) -> bool:
        return bool(self.call("mq_expire", message_id=message_id, now=now))

    def hold_for_reconcile(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, reconcile_at: datetime, now: datetime
    ) -> bool:
        doc = self.call(
            "mq_hold_for_reconcile",
            message_id=message_id,
            token=token,
            error=error,
            reconcile_at=reconcile_at,
            now=now,
        )
        return bool(doc)

    def take_stale_claims(
        self, now: datetime, *, lease_seconds: int, limit: int, message_id: uuid.UUID | None = None
    ) -> list[models.StaleClaim]:
        doc = self.call(
            "mq_take_stale_claims", now=now, lease_seconds=lease_seconds, limit=limit, message_id=message_id
        )
        return decode.stale_claims(doc)

    def requeue_claim(
        self, message_id: uuid.UUID, token: uuid.UUID, *, reason: str, now: datetime
    ) -> int | None:
        return _generation(
            self.call("mq_requeue_claim", message_id=message_id, token=token, reason=reason, now=now)
        )

    def sweep_overdue(self, now: datetime, *, grace_seconds: int, limit: int) -> list[models.TaskRef]:
        return decode.task_refs(
            self.call("mq_sweep_overdue", now=now, grace_seconds=grace_seconds, limit=limit)
        )

    def sweep_horizon(self, now: datetime, *, horizon_seconds: int, limit: int) -> list[models.TaskRef]:
        doc = self.call("mq_sweep_horizon", now=now, horizon_seconds=horizon_seconds, limit=limit)
        return decode.task_refs(doc)

    def sweep_expire(self, now: datetime, *, limit: int) -> int:
        return int(self.call("mq_sweep_expire", now=now, limit=limit) or 0)

    def record_sweep(
        self,
        trigger: str,
        started_at: datetime,
        finished_at: datetime,
        counts: dict[str, int],
        error: str | None,
    ) -> None:
        self.call(
            "mq_record_sweep",
            trigger=trigger,
            started_at=started_at,
            finished_at=finished_at,
            counts=Json(counts),
            error=error,
        )

    def health(self, now: datetime) -> models.QueueHealth:
        return decode.health(self.call("mq_health", now=now))

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
        # The SQL parameter is p_from: `from` is a Python keyword, hence the dict.
        args = {"from": from_number, "body": body, "sid": sid, "keyword": keyword, "source": source}
        return dict(self.call("mq_inbound", **args, num_media=num_media, now=now))

    def fail_opted_out(self, message_id: uuid.UUID, *, error: str, now: datetime) -> bool:
        return bool(self.call("mq_fail_opted_out", message_id=message_id, error=error, now=now))

    def consent_history(self, user_id: uuid.UUID, limit: int) -> models.ConsentHistory | None:
        return decode.consent_history(self.call("mq_consent_history", user_id=user_id, limit=limit))

    def status_callback(self, sid: str, status: str, error_code: str | None, now: datetime) -> dict[str, Any]:
        return dict(self.call("mq_status_callback", sid=sid, status=status, error_code=error_code, now=now))

    def events_pending(self, limit: int, *, lease_seconds: int, now: datetime) -> list[models.PendingEvent]:
        return decode.pending_events(
            self.call("mq_events_pending", limit=limit, lease_seconds=lease_seconds, now=now)
        )

    def events_published(self, ids: list[int], now: datetime) -> int:
        return int(self.call("mq_events_published", ids=ids, now=now) or 0)

    def events_failed(self, ids: list[int], error: str, now: datetime) -> int:
        return int(self.call("mq_events_failed", ids=ids, error=error, now=now) or 0)

    # Not part of the use cases' port: demo, tests and operators.
    def upsert_user(self, phone_number: str, timezone: str | None, **settings: Any) -> dict[str, Any]:
        """`settings` are mq_upsert_user's optional parameters by name; the omitted keep their default."""
        return dict(self.call("mq_upsert_user", phone_number=phone_number, timezone=timezone, **settings))

    def set_timezone(
        self, user_id: uuid.UUID, timezone: str, *, source: str, now: datetime, only_if_unknown: bool = False
    ) -> bool:
        return bool(
            self.call(
                "mq_set_timezone",
                user_id=user_id,
                timezone=timezone,
                source=source,
                now=now,
                only_if_unknown=only_if_unknown,
            )
        )

    def record_inbound(self, user_id: uuid.UUID, body: str, sid: str | None, now: datetime) -> dict[str, Any]:
        return dict(self.call("mq_record_inbound", user_id=user_id, body=body, sid=sid, now=now))
