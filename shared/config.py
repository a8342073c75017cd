"""One Settings object, read from the environment once per instance.

Every default is written once: the policy's in shared.domain (Limits, Policy), the adapters' on
the fields below; from_env falls back to those when a variable is unset or empty."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from functools import cached_property
from typing import Any

from shared import identity
from shared.domain import AccountCaps, Limits, Policy, longest_delivery_seconds

_LIMITS = Limits()
_POLICY = Policy()


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


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (true or false), got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _refuse_unsafe(values: Mapping[str, Any], *, on_cloud_run: bool) -> None:
    """Settings that would break a promise, refused at start rather than met in production."""
    if values["twilio_signature_bypass_local"] and on_cloud_run:
        # K_SERVICE is set by Cloud Run: a deployed function never skips Twilio's signature,
        # whatever a copied .env says.
        raise ValueError("TWILIO_SIGNATURE_BYPASS=local-only is refused on Cloud Run (K_SERVICE is set)")
    longest = longest_delivery_seconds(values["twilio_timeout_seconds"])
    if values["lease_seconds"] < longest:
        # A live sender whose lease lapses races the sweep's reconciler for the same message.
        raise ValueError(
            f"CLAIM_LEASE_SECONDS must be at least {longest} (the longest delivery with"
            f" TWILIO_TIMEOUT_SECONDS={values['twilio_timeout_seconds']}), got {values['lease_seconds']}"
        )


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    """0 or unset: none (no cap)."""
    return _int(env, name, 0) or None


# Integer settings: (field, variable, minimum). Their defaults are the fields' own.
_INTS = (
    ("db_pool_max", "DB_POOL_MAX", 1),
    ("twilio_timeout_seconds", "TWILIO_TIMEOUT_SECONDS", 1),
    ("anthropic_timeout_seconds", "ANTHROPIC_TIMEOUT_SECONDS", 1),
    ("render_max_length", "RENDER_MAX_LENGTH", 20),
    ("max_attempts", "MAX_ATTEMPTS", 1),
    ("lease_seconds", "CLAIM_LEASE_SECONDS", 10),
    ("max_content_length", "MAX_CONTENT_LENGTH", 1),
    ("reconcile_after_seconds", "RECONCILE_AFTER_SECONDS", 1),
    ("sweep_grace_seconds", "SWEEP_GRACE_SECONDS", 0),
    ("sweep_batch_size", "SWEEP_BATCH_SIZE", 1),
    ("sweep_time_budget_seconds", "SWEEP_TIME_BUDGET_SECONDS", 1),
    ("sweep_task_concurrency", "SWEEP_TASK_CONCURRENCY", 1),
    ("health_stale_seconds", "HEALTH_STALE_SECONDS", 1),
    ("user_queue_limit", "USER_QUEUE_LIMIT", 0),
    ("agent_rate_per_minute", "AGENT_RATE_PER_MINUTE", 0),
    ("max_segments_per_message", "MAX_SEGMENTS_PER_MESSAGE", 0),
)
# Flags: (field, variable); 1/true/yes/on or 0/false/no/off, unset or empty is the field's default.
_FLAGS = (("smart_encoding", "SMART_ENCODING"),)
# Optional strings: (field, variable); unset or empty is None.
_STRS = (
    ("database_url", "DATABASE_URL"),
    ("supabase_url", "SUPABASE_URL"),
    ("supabase_service_key", "SUPABASE_SERVICE_KEY"),
    ("deliver_url", "DELIVER_URL"),
    ("tasks_service_account", "TASKS_SERVICE_ACCOUNT"),
    ("cloud_tasks_emulator_host", "CLOUD_TASKS_EMULATOR_HOST"),
    ("twilio_account_sid", "TWILIO_ACCOUNT_SID"),
    ("twilio_auth_token", "TWILIO_AUTH_TOKEN"),
    ("twilio_phone_number", "TWILIO_PHONE_NUMBER"),
    ("twilio_messaging_service_sid", "TWILIO_MESSAGING_SERVICE_SID"),
    ("twilio_api_base_url", "TWILIO_API_BASE_URL"),
    ("status_callback_url", "STATUS_CALLBACK_URL"),
    ("twilio_webhook_base_url", "TWILIO_WEBHOOK_BASE_URL"),
    ("events_topic", "EVENTS_TOPIC"),
    ("inbound_topic", "INBOUND_TOPIC"),
    ("anthropic_api_key", "ANTHROPIC_API_KEY"),
    ("anthropic_base_url", "ANTHROPIC_BASE_URL"),
    ("stop_reply", "STOP_REPLY"),
    ("start_reply", "START_REPLY"),
    ("help_reply", "HELP_REPLY"),
)
# Strings with a default: (field, variable).
_NAMES = (
    ("google_cloud_project", "GOOGLE_CLOUD_PROJECT"),
    ("tasks_location", "TASKS_LOCATION"),
    ("tasks_queue", "TASKS_QUEUE"),
    ("anthropic_model", "ANTHROPIC_MODEL"),
    ("log_level", "LOG_LEVEL"),
)


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
    # TwiML replies to the STOP/START/HELP keywords (a phrase opt-out is STOP); unset: none, as when
    # Twilio's own opt-out handling (Advanced Opt-Out) answers them
    stop_reply: str | None = None
    start_reply: str | None = None
    help_reply: str | None = None
    # Pub/Sub
    events_topic: str | None = None
    inbound_topic: str | None = None
    # Anthropic: without a key, the deterministic template renderer writes structured messages
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    anthropic_model: str = "claude-sonnet-4-5"
    anthropic_timeout_seconds: int = 10
    # the policy: defaults from shared.domain
    render_max_length: int = _POLICY.render_max_length
    account_caps: AccountCaps = field(default_factory=AccountCaps)
    limits: Limits = field(default_factory=Limits)
    max_attempts: int = _POLICY.max_attempts
    lease_seconds: int = _POLICY.lease_seconds
    max_content_length: int = _POLICY.max_content_length
    reconcile_after_seconds: int = _POLICY.reconcile_after_seconds
    sweep_grace_seconds: int = _POLICY.sweep_grace_seconds
    sweep_batch_size: int = _POLICY.sweep_batch
    sweep_time_budget_seconds: int = int(_POLICY.sweep_time_budget_seconds)
    sweep_task_concurrency: int = _POLICY.sweep_task_concurrency
    health_stale_seconds: int = _POLICY.health_stale_seconds
    user_queue_limit: int = _POLICY.user_queue_limit
    agent_rate_per_minute: int = _POLICY.agent_rate_per_minute
    max_segments_per_message: int = _POLICY.max_segments_per_message
    smart_encoding: bool = _POLICY.smart_encoding
    log_level: str = "INFO"
    # Who may act as which agent (shared/identity.py): CALLER_IDENTITY and AGENT_IDENTITIES
    compliance_profile: str = _POLICY.compliance_profile
    urgent_agents: frozenset[str] = _POLICY.urgent_agents
    caller_identity: str = "none"
    agent_identities: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        values: dict[str, Any] = {name: _str(e, var) for name, var in _STRS}
        values |= {name: _str(e, var) or getattr(cls, name) for name, var in _NAMES}
        values |= {name: _int(e, var, getattr(cls, name), minimum) for name, var, minimum in _INTS}
        values |= {name: _flag(e, var, getattr(cls, name)) for name, var in _FLAGS}
        values["log_level"] = str(values["log_level"]).upper()
        values["twilio_signature_bypass_local"] = (_str(e, "TWILIO_SIGNATURE_BYPASS") or "") == "local-only"
        values["account_caps"] = AccountCaps(
            per_second=_optional_int(e, "ACCOUNT_RATE_PER_SECOND"),
            hourly=_optional_int(e, "ACCOUNT_HOURLY_LIMIT"),
            daily=_optional_int(e, "ACCOUNT_DAILY_LIMIT"),
            unit=_choice(e, "ACCOUNT_CAPS_UNIT", AccountCaps.unit, ("messages", "segments")),
        )
        values["limits"] = _limits(e)
        values["caller_identity"] = _choice(e, "CALLER_IDENTITY", cls.caller_identity, identity.MODES)
        values["agent_identities"] = identity.parse_identities(_str(e, "AGENT_IDENTITIES"))
        values["compliance_profile"] = _choice(
            e, "COMPLIANCE_PROFILE", cls.compliance_profile, ("us", "none")
        )
        values["urgent_agents"] = frozenset(
            a.strip() for a in (_str(e, "URGENT_AGENTS") or "").split(",")
        ) - {""}
        _refuse_unsafe(values, on_cloud_run=bool(_str(e, "K_SERVICE")))
        return cls(**values)

    def keyword_reply(self, keyword: str | None) -> str | None:
        """The reply to an inbound keyword (stop, start or help), if one is configured."""
        replies = {"stop": self.stop_reply, "start": self.start_reply, "help": self.help_reply}
        return replies.get(keyword or "")

    @property
    def tasks_queue_path(self) -> str:
        return (
            f"projects/{self.google_cloud_project}/locations/{self.tasks_location}/queues/{self.tasks_queue}"
        )

    @cached_property
    def policy(self) -> Policy:
        """The slice of the settings the use cases run with."""
        return Policy(
            limits=self.limits,
            max_attempts=self.max_attempts,
            lease_seconds=self.lease_seconds,
            max_content_length=self.max_content_length,
            reconcile_after_seconds=self.reconcile_after_seconds,
            sweep_grace_seconds=self.sweep_grace_seconds,
            sweep_batch=self.sweep_batch_size,
            sweep_time_budget_seconds=float(self.sweep_time_budget_seconds),
            health_stale_seconds=self.health_stale_seconds,
            render_max_length=self.render_max_length,
            account_caps=self.account_caps,
            sweep_task_concurrency=self.sweep_task_concurrency,
            user_queue_limit=self.user_queue_limit,
            agent_rate_per_minute=self.agent_rate_per_minute,
            compliance_profile=self.compliance_profile,
            urgent_agents=self.urgent_agents,
            max_segments_per_message=self.max_segments_per_message,
            smart_encoding=self.smart_encoding,
        )


def _limits(e: Mapping[str, str]) -> Limits:
    d = _LIMITS
    return Limits(
        cooldown_seconds=_int(e, "COOLDOWN_SECONDS", d.cooldown_seconds),
        hourly_limit=_int(e, "HOURLY_LIMIT", d.hourly_limit, minimum=1),
        daily_limit=_int(e, "DAILY_LIMIT", d.daily_limit, minimum=1),
        quiet_hours_start=_time(e, "QUIET_HOURS_START", d.quiet_hours_start),
        quiet_hours_end=_time(e, "QUIET_HOURS_END", d.quiet_hours_end),
        active_window_seconds=_int(e, "ACTIVE_WINDOW_MINUTES", d.active_window_seconds // 60) * 60,
        low_daily_reserve=_int(e, "LOW_PRIORITY_DAILY_RESERVE", d.low_daily_reserve),
        weekly_limit=_optional_int(e, "WEEKLY_LIMIT"),  # unset: none, as Limits has it
    )
