"""The Store over Supabase's REST API (PostgREST) with supabase-py (SUPABASE_URL + SUPABASE_SERVICE_KEY).

Every method is ONE `client.rpc("mq_...", {named params}).execute()`: a POST to /rest/v1/rpc/mq_...
that PostgREST runs as one transaction, calling the same SQL function the psycopg store calls. The
JSON keys are the SQL function's parameter names (p_user_id, p_now, ...); instants travel as ISO 8601
strings with their offset, UUIDs as strings, jsonb as JSON. PostgREST answers a function returning a
scalar jsonb with that JSON value itself (an object, `null`, `true`, a string, a number), which
supabase-py hands back as `.data`; it is decoded with shared.store.decode exactly like the psycopg
store's result.

Errors are translated here, so nothing above sees httpx or postgrest types: the service cannot be
reached, timed out, or answered 5xx → StoreUnavailable (retry later); PostgREST refused the call
(4xx: unknown function or argument, invalid input, constraint violation) → StoreError.
"""

from __future__ import annotations

import logging
import uuid
from datetime import date, datetime, time
from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import Client, ClientOptions, create_client

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

DEFAULT_TIMEOUT_SECONDS = 10.0

# PostgREST's own error codes that mean the database is unreachable or busy (HTTP 503/504).
_UNAVAILABLE_PGRST_CODES = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003"})
# SQLSTATE classes PostgREST answers with a 5xx (its documented status table): connection,
# transaction state and rollback (serialization failures, deadlocks), resources, operator
# intervention (statement timeout, shutdown), system and internal errors.
_SERVER_SQLSTATE_CLASSES = frozenset(
    {"08", "09", "25", "2D", "38", "39", "3B", "40", "53", "54", "55", "57", "58", "F0", "HV", "XX"}
)


def _raise_on_server_error(response: httpx.Response) -> None:
    """httpx response hook: a 5xx from the API gateway or PostgREST is an outage, whatever its body."""
    if response.status_code >= 500:
        response.read()
        raise httpx.HTTPStatusError(
            f"server error {response.status_code}", request=response.request, response=response
        )


def _is_unavailable(error: APIError) -> bool:
    """For an APIError that did not pass through the hook (a client built elsewhere)."""
    code = str(error.code or "")
    if len(code) == 3 and code.isdigit():  # not a PostgREST JSON body: supabase-py puts the HTTP status
        return int(code) >= 500
    if code in _UNAVAILABLE_PGRST_CODES:
        return True
    if code.startswith("PGRST") or len(code) != 5 or code in ("25006", "P0001"):  # 4xx in PostgREST
        return False
    return code[:2] in _SERVER_SQLSTATE_CLASSES or code.startswith("P0")


def _instant(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware datetime")
    return value.isoformat()


def _opt_instant(value: datetime | None) -> str | None:
    return None if value is None else _instant(value)


def _opt_uuid(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def _json_value(value: Any) -> Any:
    """A setting for mq_upsert_user as JSON (times as HH:MM:SS, uuids as strings)."""
    if isinstance(value, datetime):
        return _instant(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class SupabaseStore:
    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    def connect(
        cls, url: str, service_key: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> SupabaseStore:
        """One client per instance: a keep-alive HTTP connection pool with a bounded timeout."""
        http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            follow_redirects=True,
            http2=True,
            event_hooks={"response": [_raise_on_server_error]},
        )
        options = ClientOptions(
            httpx_client=http,
            postgrest_client_retry=False,
            auto_refresh_token=False,
            persist_session=False,
        )
        return cls(create_client(url, service_key, options))

    def _rpc(self, function: str, params: dict[str, Any]) -> Any:
        """One POST /rest/v1/rpc/<function>; returns the function's JSON result."""
        try:
            response = self._client.rpc(function, params).execute()
        except httpx.HTTPStatusError as exc:
            log.warning("%s: PostgREST answered %s", function, exc.response.status_code)
            raise StoreUnavailable() from exc
        except httpx.TransportError as exc:  # connect/read errors and timeouts
            log.warning("%s: %s", function, type(exc).__name__)
            raise StoreUnavailable() from exc
        except APIError as exc:
            if _is_unavailable(exc):
                raise StoreUnavailable() from exc
            raise StoreError(f"database error in {function}: {exc.code}") from exc
        return response.data

    def user_context(
        self,
        user_id: uuid.UUID,
        now: datetime,
        exclude: uuid.UUID | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> UserContext | None:
        agent_id, key = idempotency or (None, None)
        params = {
            "p_user_id": str(user_id),
            "p_now": _instant(now),
            "p_exclude": _opt_uuid(exclude),
            "p_agent_id": agent_id,
            "p_idempotency_key": key,
        }
        return decode.user_context(self._rpc("mq_user_context", params))

    def enqueue(self, message: NewMessage) -> EnqueueResult:
        r = message.request
        doc = self._rpc(
            "mq_enqueue",
            {
                "p_user_id": str(r.user_id),
                "p_agent_id": r.agent_id,
                "p_message_data": r.message_data,
                "p_final_message": message.final_message,
                "p_scheduled_for": _instant(message.scheduled_for),
                "p_priority": r.priority,
                "p_can_delay": r.can_delay,
                "p_requires_fresh_context": r.requires_fresh_context,
                "p_conversation_id": _opt_uuid(r.conversation_id),
                "p_idempotency_key": r.idempotency_key,
                "p_request_hash": r.request_hash,
                "p_expires_at": _opt_instant(r.expires_at),
                "p_reason": message.reason,
                "p_now": _instant(message.now),
                "p_topic_key": r.topic_key,
                "p_parts": decode.parts_param(message.parts),
            },
        )
        return decode.enqueue_result(doc)

    def get_message(self, message_id: uuid.UUID) -> StoredMessage | None:
        doc = self._rpc("mq_get", {"p_message_id": str(message_id)})
        return None if doc is None else decode.message(doc)

    def delivery_context(self, message_id: uuid.UUID, now: datetime) -> DeliveryContext | None:
        doc = self._rpc("mq_delivery_context", {"p_message_id": str(message_id), "p_now": _instant(now)})
        return decode.delivery_context(doc)

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
        doc = self._rpc(
            "mq_claim",
            {
                "p_message_id": str(message_id),
                "p_generation": generation,
                "p_now": _instant(now),
                "p_lease_seconds": lease_seconds,
                "p_cooldown_seconds": limits.cooldown_seconds,
                "p_hourly_limit": limits.hourly_limit,
                "p_daily_cap": daily_cap,
                "p_day_start": _instant(day_start),
                "p_day_end": _instant(day_end),
                "p_weekly_cap": weekly_cap,
                "p_week_start": _instant(week[0]) if week else None,
                "p_week_end": _instant(week[1]) if week else None,
                "p_account": account.to_json() if account and account.enabled else None,
            },
        )
        return decode.claim(doc)

    def reschedule(
        self, message_id: uuid.UUID, generation: int, at: datetime, reason: str, now: datetime
    ) -> int | None:
        doc = self._rpc(
            "mq_reschedule",
            {
                "p_message_id": str(message_id),
                "p_generation": generation,
                "p_at": _instant(at),
                "p_reason": reason,
                "p_now": _instant(now),
            },
        )
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
        doc = self._rpc(
            "mq_record_sent",
            {
                "p_message_id": str(message_id),
                "p_token": str(token),
                "p_sid": sid,
                "p_body": body,
                "p_now": _instant(now),
                "p_local_date": local_date,
                "p_reconciled": reconciled,
            },
        )
        return bool(doc and doc.get("recorded"))

    def record_part(
        self, message_id: uuid.UUID, token: uuid.UUID, *, position: int, sid: str, now: datetime
    ) -> bool:
        doc = self._rpc(
            "mq_record_part",
            {
                "p_message_id": str(message_id),
                "p_token": str(token),
                "p_position": position,
                "p_sid": sid,
                "p_now": _instant(now),
            },
        )
        return bool(doc and doc.get("recorded"))

    def cancel(
        self, message_id: uuid.UUID, *, agent_id: str | None, reason: str | None, now: datetime
    ) -> CancelResult:
        doc = self._rpc(
            "mq_cancel",
            {
                "p_message_id": str(message_id),
                "p_agent_id": agent_id,
                "p_reason": reason,
                "p_now": _instant(now),
            },
        )
        return decode.cancel_result(doc)

    def conversation(self, user_id: uuid.UUID, limit: int) -> list[Turn]:
        return decode.turns(self._rpc("mq_conversation", {"p_user_id": str(user_id), "p_limit": limit}))

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
        self._rpc(
            "mq_log_model_call",
            {
                "p_user_id": str(user_id),
                "p_message_id": str(message_id),
                "p_action": action,
                "p_usage": usage,
                "p_output": output,
                "p_error": error,
                "p_now": _instant(now),
            },
        )

    def record_part_render(
        self, message_id: uuid.UUID, position: int, text: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        doc = self._rpc(
            "mq_record_part_render",
            {
                "p_message_id": str(message_id),
                "p_position": position,
                "p_text": text,
                "p_usage": usage,
                "p_now": _instant(now),
            },
        )
        return bool(doc)

    def record_render(self, message_id: uuid.UUID, text: str, usage: dict[str, Any], now: datetime) -> bool:
        doc = self._rpc(
            "mq_record_render",
            {"p_message_id": str(message_id), "p_text": text, "p_usage": usage, "p_now": _instant(now)},
        )
        return bool(doc)

    def render_failed(
        self, message_id: uuid.UUID, *, error: str, usage: dict[str, Any], max_attempts: int, now: datetime
    ) -> tuple[str, int]:
        doc = self._rpc(
            "mq_render_failed",
            {
                "p_message_id": str(message_id),
                "p_error": error,
                "p_usage": usage,
                "p_max_attempts": max_attempts,
                "p_now": _instant(now),
            },
        )
        return decode.render_failed(doc)

    def supersede_stale(
        self, message_id: uuid.UUID, *, reason: str, usage: dict[str, Any], now: datetime
    ) -> bool:
        doc = self._rpc(
            "mq_supersede_stale",
            {"p_message_id": str(message_id), "p_reason": reason, "p_usage": usage, "p_now": _instant(now)},
        )
        return bool(doc)

    def release(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, now: datetime, max_attempts: int
    ) -> str:
        doc = self._rpc(
            "mq_release",
            {
                "p_message_id": str(message_id),
                "p_token": str(token),
                "p_error": error,
                "p_now": _instant(now),
                "p_max_attempts": max_attempts,
            },
        )
        return decode.release_status(doc)

    def fail(self, message_id: uuid.UUID, *, error: str, reason: str, now: datetime) -> bool:
        doc = self._rpc(
            "mq_fail",
            {"p_message_id": str(message_id), "p_error": error, "p_reason": reason, "p_now": _instant(now)},
        )
        return bool(doc)

    def expire(self, message_id: uuid.UUID, now: datetime) -> bool:
        return bool(self._rpc("mq_expire", {"p_message_id": str(message_id), "p_now": _instant(now)}))

    # Not part of the use cases' port: demo, tests and operators.
    def hold_for_reconcile(
        self, message_id: uuid.UUID, token: uuid.UUID, *, error: str, reconcile_at: datetime, now: datetime
    ) -> bool:
        doc = self._rpc(
            "mq_hold_for_reconcile",
            {
                "p_message_id": str(message_id),
                "p_token": str(token),
                "p_error": error,
                "p_reconcile_at": _instant(reconcile_at),
                "p_now": _instant(now),
            },
        )
        return bool(doc)

    def take_stale_claims(
        self, now: datetime, *, lease_seconds: int, limit: int, message_id: uuid.UUID | None = None
    ) -> list[StaleClaim]:
        doc = self._rpc(
            "mq_take_stale_claims",
            {
                "p_now": _instant(now),
                "p_lease_seconds": lease_seconds,
                "p_limit": limit,
                "p_message_id": _opt_uuid(message_id),
            },
        )
        return decode.stale_claims(doc)

    def requeue_claim(
        self, message_id: uuid.UUID, token: uuid.UUID, *, reason: str, now: datetime
    ) -> int | None:
        doc = self._rpc(
            "mq_requeue_claim",
            {
                "p_message_id": str(message_id),
                "p_token": str(token),
                "p_reason": reason,
                "p_now": _instant(now),
            },
        )
        return None if doc is None else int(doc)

    def sweep_overdue(self, now: datetime, *, grace_seconds: int, limit: int) -> list[TaskRef]:
        doc = self._rpc(
            "mq_sweep_overdue", {"p_now": _instant(now), "p_grace_seconds": grace_seconds, "p_limit": limit}
        )
        return decode.task_refs(doc)

    def sweep_horizon(self, now: datetime, *, horizon_seconds: int, limit: int) -> list[TaskRef]:
        doc = self._rpc(
            "mq_sweep_horizon",
            {"p_now": _instant(now), "p_horizon_seconds": horizon_seconds, "p_limit": limit},
        )
        return decode.task_refs(doc)

    def sweep_expire(self, now: datetime, *, limit: int) -> int:
        return int(self._rpc("mq_sweep_expire", {"p_now": _instant(now), "p_limit": limit}) or 0)

    def record_sweep(
        self,
        trigger: str,
        started_at: datetime,
        finished_at: datetime,
        counts: dict[str, int],
        error: str | None,
    ) -> None:
        self._rpc(
            "mq_record_sweep",
            {
                "p_trigger": trigger,
                "p_started_at": _instant(started_at),
                "p_finished_at": _instant(finished_at),
                "p_counts": counts,
                "p_error": error,
            },
        )

    def health(self, now: datetime) -> QueueHealth:
        return decode.health(self._rpc("mq_health", {"p_now": _instant(now)}))

    def inbound(
        self, from_number: str, body: str, sid: str, *, keyword: str | None, num_media: int, now: datetime
    ) -> dict[str, Any]:
        doc = self._rpc(
            "mq_inbound",
            {
                "p_from": from_number,
                "p_body": body,
                "p_sid": sid,
                "p_keyword": keyword,
                "p_num_media": num_media,
                "p_now": _instant(now),
            },
        )
        return dict(doc)

    def status_callback(self, sid: str, status: str, error_code: str | None, now: datetime) -> dict[str, Any]:
        doc = self._rpc(
            "mq_status_callback",
            {"p_sid": sid, "p_status": status, "p_error_code": error_code, "p_now": _instant(now)},
        )
        return dict(doc)

    def events_pending(self, limit: int, *, lease_seconds: int, now: datetime) -> list[PendingEvent]:
        doc = self._rpc(
            "mq_events_pending", {"p_limit": limit, "p_lease_seconds": lease_seconds, "p_now": _instant(now)}
        )
        return decode.pending_events(doc)

    def events_published(self, ids: list[int], now: datetime) -> int:
        return int(self._rpc("mq_events_published", {"p_ids": ids, "p_now": _instant(now)}) or 0)

    def events_failed(self, ids: list[int], error: str, now: datetime) -> int:
        return int(
            self._rpc("mq_events_failed", {"p_ids": ids, "p_error": error, "p_now": _instant(now)}) or 0
        )

    def upsert_user(self, phone_number: str, timezone: str, **settings: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"p_phone_number": phone_number, "p_timezone": timezone}
        params.update({"p_" + name: _json_value(value) for name, value in settings.items()})
        return dict(self._rpc("mq_upsert_user", params))

    def record_inbound(self, user_id: uuid.UUID, body: str, sid: str | None, now: datetime) -> dict[str, Any]:
        doc = self._rpc(
            "mq_record_inbound",
            {"p_user_id": str(user_id), "p_body": body, "p_sid": sid, "p_now": _instant(now)},
        )
        return dict(doc)

    def close(self) -> None:
        """Close the HTTP connections (the client's own session)."""
        self._client.postgrest.aclose()
