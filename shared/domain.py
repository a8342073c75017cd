"""The domain's types: what a user, their limits, their history and a stored message are.

Imported by the policy, the models, the use cases and the adapters alike; it imports nothing of
the product's, so imports flow one way (domain <- policy <- use cases <- adapters)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from functools import cached_property, lru_cache
from typing import Any

PRIORITIES: tuple[str, ...] = ("urgent", "high", "medium", "low")
RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}


QUEUED = "queued"
SENDING = "sending"
SENT = "sent"
FAILED = "failed"
SUPERSEDED = "superseded"
CANCELLED = "cancelled"
EXPIRED = "expired"
STATUSES = (QUEUED, SENDING, SENT, FAILED, SUPERSEDED, CANCELLED, EXPIRED)
FINAL_STATUSES = frozenset({SENT, FAILED, SUPERSEDED, CANCELLED, EXPIRED})


DEFAULT_PART_DELAY_SECONDS = 1
MIN_PARTS, MAX_PARTS = 2, 5  # a sequence's parts
MAX_PART_DELAY_SECONDS = 10  # the longest pause before a part
# What a delivery does besides Twilio's calls and the pauses (the claim, the records), at most.
DELIVERY_MARGIN_SECONDS = 20


def longest_delivery_seconds(twilio_timeout_seconds: int) -> int:
    """The longest a delivery can take from its claim to its record: the longest sequence, each of
    its parts a Twilio call that may take its connect and its read timeout, and the longest pauses
    between them. (Renders happen before the claim.) The claim's lease and deliver_message's
    timeout are at least this (shared/config.py checks the lease; a test the deployed timeout)."""
    calls = MAX_PARTS * 2 * twilio_timeout_seconds
    return calls + (MAX_PARTS - 1) * MAX_PART_DELAY_SECONDS + DELIVERY_MARGIN_SECONDS


@dataclass(frozen=True)
class Limits:
    """The limits in force for one user: global defaults merged with the user's overrides."""

    cooldown_seconds: int = 30
    hourly_limit: int = 2
    daily_limit: int = 10
    weekly_limit: int | None = None  # None: no weekly cap
    quiet_hours_start: time = time(22, 0)
    quiet_hours_end: time = time(8, 0)
    quiet_hours_enabled: bool = True
    active_window_seconds: int = 600
    low_daily_reserve: int = 2

    # cached_property writes the instance's __dict__ directly, so it works on a frozen dataclass;
    # a planner reads these on every decision.
    @cached_property
    def cooldown(self) -> timedelta:
        return timedelta(seconds=self.cooldown_seconds)

    @cached_property
    def active_window(self) -> timedelta:
        return timedelta(seconds=self.active_window_seconds)

    def cap(self, priority: str, can_delay: bool) -> int:
        """How many messages of this lane may go out on one local day."""
        if priority == "low" and can_delay:
            return max(1, self.daily_limit - self.low_daily_reserve)
        return self.daily_limit


@dataclass(frozen=True)
class CallingHours:
    """A legal floor: messages only in [start, end) local time in every one of `zones` (the reason
    names the rule when it holds a message back)."""

    start: time
    end: time
    reason: str
    zones: tuple[str, ...]


@dataclass(frozen=True)
class UserSettings:
    """A user's own settings; None means the global default."""

    timezone: str = "UTC"
    quiet_hours_start: time | None = None
    quiet_hours_end: time | None = None
    quiet_hours_enabled: bool = True
    daily_limit: int | None = None
    hourly_limit: int | None = None
    opted_out: bool = False
    undeliverable: bool = False
    notifications_enabled: bool = True  # False: only urgent messages go out
    # The preferred window, in the user's timezone: ISO weekdays (1 = Monday ... 7 = Sunday; None:
    # every day) and a local time range [start, end) (both None: any time; start > end wraps
    # midnight; start == end: the whole day; only one of them set: no time range).
    preferred_days: frozenset[int] | None = None
    preferred_start: time | None = None
    preferred_end: time | None = None
    weekly_limit: int | None = None
    timezone_source: str = "user"  # user | phone_number | default (see shared.compliance)
    # Where the user is and the law there (shared.compliance.recipient fills these in): the zones
    # quiet hours must hold in (empty: `timezone` alone), the calling hours that bound every
    # message, and at most `topic_limit` messages on one topic per rolling 24 h.
    zones: tuple[str, ...] = ()
    calling_hours: tuple[CallingHours, ...] = ()
    topic_limit: int | None = None

    def located(
        self, *, zones: tuple[str, ...], calling_hours: tuple[CallingHours, ...], topic_limit: int | None
    ) -> UserSettings:
        return replace(self, zones=zones, calling_hours=calling_hours, topic_limit=topic_limit)

    def limits(self, defaults: Limits) -> Limits:
        # Cached: every decision merges them, and the overrides take few distinct values (most
        # users have none), so the merged Limits repeat (bench/results.md History, "After afb0027").
        if (
            self.quiet_hours_enabled
            and self.quiet_hours_start is None
            and self.quiet_hours_end is None
            and self.daily_limit is None
            and self.hourly_limit is None
            and self.weekly_limit is None
        ):
            return defaults
        return _merged_limits(
            defaults,
            self.quiet_hours_start,
            self.quiet_hours_end,
            self.quiet_hours_enabled,
            self.daily_limit,
            self.hourly_limit,
            self.weekly_limit,
        )


@lru_cache(maxsize=1024)
def _merged_limits(
    defaults: Limits,
    quiet_hours_start: time | None,
    quiet_hours_end: time | None,
    quiet_hours_enabled: bool,
    daily_limit: int | None,
    hourly_limit: int | None,
    weekly_limit: int | None,
) -> Limits:
    return replace(
        defaults,
        quiet_hours_start=quiet_hours_start or defaults.quiet_hours_start,
        quiet_hours_end=quiet_hours_end or defaults.quiet_hours_end,
        quiet_hours_enabled=quiet_hours_enabled and defaults.quiet_hours_enabled,
        daily_limit=daily_limit or defaults.daily_limit,
        hourly_limit=hourly_limit or defaults.hourly_limit,
        weekly_limit=defaults.weekly_limit if weekly_limit is None else weekly_limit,
    )


@dataclass(frozen=True)
class Reservation:
    """Another queued message of the user, planned for `at`."""

    at: datetime
    priority: str = "medium"


@dataclass(frozen=True)
class History:
    """What the policy needs to know of the user's past and queued messages."""

    sends: Sequence[datetime] = ()  # slot times of messages sent or being sent (claims count)
    reservations: Sequence[Reservation] = ()
    last_inbound_at: datetime | None = None
    # The message's topic (its topicKey): slot times of the user's messages on it sent in the last
    # 24 h, and the scheduled times of those queued (for a state's per-topic limit).
    topic_sends: Sequence[datetime] = ()
    topic_reservations: Sequence[datetime] = ()


@dataclass(frozen=True)
class AccountCaps:
    """Caps for the whole sending account (Twilio plan, carrier daily limits); None: no cap."""

    per_second: int | None = None
    hourly: int | None = None
    daily: int | None = None
    unit: str = "messages"  # or "segments": each cap counts SMS segments (ACCOUNT_CAPS_UNIT)

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.per_second, self.hourly, self.daily))

    def to_json(self) -> dict[str, int | str]:
        pairs = (("per_second", self.per_second), ("hourly", self.hourly), ("daily", self.daily))
        caps: dict[str, int | str] = {k: v for k, v in pairs if v is not None}
        # Only when it differs from the default, so the claim's argument stays as it was.
        return caps | ({"unit": self.unit} if self.unit != "messages" else {})


@dataclass(frozen=True)
class Segments:
    """How an SMS text travels (shared/segments.py counts it): its encoding, GSM-7 or UCS-2, and
    the number of SMS segments it is sent (and billed) as. For a sequence, the parts' total."""

    encoding: str
    count: int


def needs_render(message_data: Mapping[str, Any]) -> bool:
    """True when messageData carries no finished `content` string, so a Renderer must write the text."""
    return not isinstance(message_data.get("content"), str)


@dataclass(frozen=True)
class Part:
    """One SMS of a sequence: sent `delay_seconds` after the previous part (the first: at once)."""

    position: int
    content: str  # "" for a structured part not rendered yet
    delay_seconds: int = DEFAULT_PART_DELAY_SECONDS
    status: str = "pending"
    twilio_message_sid: str | None = None
    sent_at: datetime | None = None
    data: dict[str, Any] | None = None  # a structured part's fields, for the Renderer
    segments: Segments | None = None  # of `content` as stored; None until it has a text

    @property
    def sent(self) -> bool:
        return self.status == "sent"

    @property
    def needs_render(self) -> bool:
        return self.data is not None and not self.content


def sequence_span(parts: tuple[Part, ...]) -> int:
    """Seconds from the first part to the last: the time a sequence occupies once it starts."""
    return sum(p.delay_seconds for p in parts[1:])


@dataclass(frozen=True)
class TimelineEntry:
    """One decision about a message, as agent_actions_log recorded it (GET's timeline)."""

    at: datetime
    action: str
    output: Mapping[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    """One message_queue row, as the use cases need it."""

    id: uuid.UUID
    user_id: uuid.UUID
    agent_id: str
    status: str
    priority: str
    content: str
    scheduled_for: datetime
    can_delay: bool = True
    generation: int = 0
    attempts: int = 0
    reason: str | None = None
    last_error: str | None = None
    expires_at: datetime | None = None
    sent_at: datetime | None = None
    twilio_message_sid: str | None = None
    conversation_id: uuid.UUID | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    request_hash: str | None = None
    claim_token: uuid.UUID | None = None
    slot_at: datetime | None = None
    lease_expires_at: datetime | None = None
    topic_key: str | None = None
    parts: tuple[Part, ...] = ()
    superseded_by: uuid.UUID | None = None
    message_data: dict[str, Any] = field(default_factory=dict)
    requires_fresh_context: bool = False
    render_attempts: int = 0
    transactional: bool = False
    # What Twilio's status callbacks said of the delivery (GET only): delivered, undelivered, failed...
    delivery_status: str | None = None
    delivered_at: datetime | None = None
    delivery_error_code: str | None = None
    # GET only; history about the message, not its state: left out of comparisons.
    timeline: tuple[TimelineEntry, ...] = field(default=(), compare=False)
    # Of the text to send (a sequence: the parts' total); None while a structured text is unrendered.
    segments: Segments | None = None
    # What the schedule answer said, kept so that a replay answers the same: the plan's blockedBy,
    # and the messages this one superseded on its topic.
    blocked_by: tuple[str, ...] = ()
    superseded_ids: tuple[uuid.UUID, ...] = ()

    @property
    def structured(self) -> bool:
        """messageData without a finished `content`: a Renderer writes the text."""
        return not self.parts and needs_render(self.message_data)

    @property
    def is_sequence(self) -> bool:
        return bool(self.parts)


@dataclass(frozen=True)
class Policy:
    """The tuning the use cases run with. These defaults are the deployed ones: shared.config reads
    each from its environment variable and falls back to the value here."""

    limits: Limits = field(default_factory=Limits)
    max_attempts: int = 5
    lease_seconds: int = 240  # past the longest delivery and deliver_message's timeout (180 s)
    max_content_length: int = 1600
    reconcile_after_seconds: int = 30
    sweep_grace_seconds: int = 120
    sweep_batch: int = 200
    sweep_time_budget_seconds: float = 50.0
    task_horizon_seconds: int = 30 * 86400 - 300
    health_stale_seconds: int = 300
    render_max_length: int = 320
    conversation_turns: int = 20
    account_caps: AccountCaps = field(default_factory=AccountCaps)
    # Cloud Tasks calls in flight while the sweep re-tasks a batch (each is a network round trip).
    sweep_task_concurrency: int = 16
    # Admission: messages one user may have queued at once, and messages one agent may store in any
    # 60 s (0: no limit). Past either, a schedule request is refused with 429 and stores nothing.
    user_queue_limit: int = 50
    agent_rate_per_minute: int = 600
    # The law of the recipient's place (shared.compliance): `us` for US numbers, or `none`.
    compliance_profile: str = "us"
    # Agents whose urgent messages may go out in quiet hours, and whose transactional ones outside
    # the legal calling hours ("*": every agent). Nobody's, unless configured (URGENT_AGENTS).
    urgent_agents: frozenset[str] = frozenset()

    def privileged(self, agent_id: str) -> bool:
        """Whether this agent's urgent messages skip quiet hours (and its transactional ones the
        calling hours)."""
        return "*" in self.urgent_agents or agent_id in self.urgent_agents

    # SMS segments (shared/segments.py): the most a literal content may be (0: no limit; past it a
    # 400 naming the field), and Twilio-style Smart Encoding of look-alikes before counting.
    max_segments_per_message: int = 10
    smart_encoding: bool = False

    def admission(self, agent_id: str, topic_key: str | None) -> Admission:
        return Admission(
            agent_id=agent_id,
            topic_key=topic_key,
            user_queue_limit=self.user_queue_limit or None,
            agent_rate_per_minute=self.agent_rate_per_minute or None,
        )


@dataclass(frozen=True)
class Admission:
    """The limits one schedule request is admitted under (None: no limit); the store checks them
    before planning and again, atomically, when it stores the message."""

    agent_id: str
    topic_key: str | None = None
    user_queue_limit: int | None = None
    agent_rate_per_minute: int | None = None
