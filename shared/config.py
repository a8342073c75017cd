"""One Settings object, read from the environment once per instance."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time

from shared.domain import AccountCaps, Limits


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _time(env: Mapping[str, str], name: str, default: time) -> time:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return time.fromisoformat(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be HH:MM, got {raw!r}") from exc


def _str(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    return raw or None


@dataclass(frozen=True)
class Settings:
    # database: DATABASE_URL wins; otherwise SUPABASE_URL + SUPABASE_SERVICE_KEY
    database_url: str | None = None
    supabase_url: str | None = None
    supabase_service_key: str | None = None
    db_pool_max: int = 4
    # Cloud Tasks
    google_cloud_project: str = "local-project"
    tasks_location: str = "us-central1"
    tasks_queue: str = "message-delivery"
    deliver_url: str | None = None
    tasks_service_account: str | None = None
    cloud_tasks_emulator_host: str | None = None
    # Twilio
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_phone_number: str | None = None
    twilio_messaging_service_sid: str | None = None
    twilio_api_base_url: str | None = None
    twilio_timeout_seconds: int = 10
    status_callback_url: str | None = None
    twilio_webhook_base_url: str | None = None
    twilio_signature_bypass_local: bool = False
    # Pub/Sub
    events_topic: str | None = None
    inbound_topic: str | None = None
    # Anthropic: without a key, the deterministic template renderer writes structured messages
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    anthropic_model: str = "claude-sonnet-4-5"
    anthropic_timeout_seconds: int = 10
    render_max_length: int = 320
    # the whole sending account (Twilio plan and carrier limits); 0 or unset: no cap
    account_caps: AccountCaps = field(default_factory=AccountCaps)
    # policy defaults
    limits: Limits = field(default_factory=Limits)
    max_attempts: int = 5
    lease_seconds: int = 120
    max_content_length: int = 1600
    reconcile_after_seconds: int = 30
    sweep_grace_seconds: int = 120
    sweep_batch_size: int = 200
    sweep_time_budget_seconds: int = 50
    sweep_task_concurrency: int = 16
    health_stale_seconds: int = 300
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        limits = Limits(
            cooldown_seconds=_int(e, "COOLDOWN_SECONDS", 30),
            hourly_limit=_int(e, "HOURLY_LIMIT", 2, minimum=1),
            daily_limit=_int(e, "DAILY_LIMIT", 10, minimum=1),
            quiet_hours_start=_time(e, "QUIET_HOURS_START", time(22, 0)),
            quiet_hours_end=_time(e, "QUIET_HOURS_END", time(8, 0)),
            active_window_seconds=_int(e, "ACTIVE_WINDOW_MINUTES", 10) * 60,
            low_daily_reserve=_int(e, "LOW_PRIORITY_DAILY_RESERVE", 2),
            weekly_limit=_int(e, "WEEKLY_LIMIT", 0) or None,
        )
        return cls(
            database_url=_str(e, "DATABASE_URL"),
            supabase_url=_str(e, "SUPABASE_URL"),
            supabase_service_key=_str(e, "SUPABASE_SERVICE_KEY"),
            db_pool_max=_int(e, "DB_POOL_MAX", 4, minimum=1),
            google_cloud_project=_str(e, "GOOGLE_CLOUD_PROJECT") or "local-project",
            tasks_location=_str(e, "TASKS_LOCATION") or "us-central1",
            tasks_queue=_str(e, "TASKS_QUEUE") or "message-delivery",
            deliver_url=_str(e, "DELIVER_URL"),
            tasks_service_account=_str(e, "TASKS_SERVICE_ACCOUNT"),
            cloud_tasks_emulator_host=_str(e, "CLOUD_TASKS_EMULATOR_HOST"),
            twilio_account_sid=_str(e, "TWILIO_ACCOUNT_SID"),
            twilio_auth_token=_str(e, "TWILIO_AUTH_TOKEN"),
            twilio_phone_number=_str(e, "TWILIO_PHONE_NUMBER"),
            twilio_messaging_service_sid=_str(e, "TWILIO_MESSAGING_SERVICE_SID"),
            twilio_api_base_url=_str(e, "TWILIO_API_BASE_URL"),
            twilio_timeout_seconds=_int(e, "TWILIO_TIMEOUT_SECONDS", 10, minimum=1),
            status_callback_url=_str(e, "STATUS_CALLBACK_URL"),
            twilio_webhook_base_url=_str(e, "TWILIO_WEBHOOK_BASE_URL"),
            twilio_signature_bypass_local=(_str(e, "TWILIO_SIGNATURE_BYPASS") or "") == "local-only",
            events_topic=_str(e, "EVENTS_TOPIC"),
            inbound_topic=_str(e, "INBOUND_TOPIC"),
            anthropic_api_key=_str(e, "ANTHROPIC_API_KEY"),
            anthropic_base_url=_str(e, "ANTHROPIC_BASE_URL"),
            anthropic_model=_str(e, "ANTHROPIC_MODEL") or "claude-sonnet-4-5",
            anthropic_timeout_seconds=_int(e, "ANTHROPIC_TIMEOUT_SECONDS", 10, minimum=1),
            render_max_length=_int(e, "RENDER_MAX_LENGTH", 320, minimum=20),
            account_caps=AccountCaps(
                per_second=_int(e, "ACCOUNT_RATE_PER_SECOND", 0) or None,
                hourly=_int(e, "ACCOUNT_HOURLY_LIMIT", 0) or None,
                daily=_int(e, "ACCOUNT_DAILY_LIMIT", 0) or None,
            ),
            limits=limits,
            max_attempts=_int(e, "MAX_ATTEMPTS", 5, minimum=1),
            lease_seconds=_int(e, "CLAIM_LEASE_SECONDS", 120, minimum=10),
            max_content_length=_int(e, "MAX_CONTENT_LENGTH", 1600, minimum=1),
            reconcile_after_seconds=_int(e, "RECONCILE_AFTER_SECONDS", 30, minimum=1),
            sweep_grace_seconds=_int(e, "SWEEP_GRACE_SECONDS", 120, minimum=0),
            sweep_batch_size=_int(e, "SWEEP_BATCH_SIZE", 200, minimum=1),
            sweep_time_budget_seconds=_int(e, "SWEEP_TIME_BUDGET_SECONDS", 50, minimum=1),
            sweep_task_concurrency=_int(e, "SWEEP_TASK_CONCURRENCY", 16, minimum=1),
            health_stale_seconds=_int(e, "HEALTH_STALE_SECONDS", 300, minimum=1),
            log_level=(_str(e, "LOG_LEVEL") or "INFO").upper(),
        )

    @property
    def tasks_queue_path(self) -> str:
        return (
            f"projects/{self.google_cloud_project}/locations/{self.tasks_location}/queues/{self.tasks_queue}"
        )
