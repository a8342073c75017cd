"""The policy's answer: the reason codes, what each means and weighs, and Decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

OK = "ok"
OPTED_OUT = "opted_out"
UNDELIVERABLE = "undeliverable"
NOTIFICATIONS_DISABLED = "notifications_disabled"
COOLDOWN = "cooldown"
HOURLY_LIMIT = "hourly_limit"
DAILY_LIMIT = "daily_limit"
WEEKLY_LIMIT = "weekly_limit"
LOW_PRIORITY_RESERVE = "low_priority_reserve"
QUIET_HOURS = "quiet_hours"
PREFERRED_WINDOW = "preferred_window"
SEQUENCE_SPAN = "sequence_span"
IN_FLIGHT = "in_flight"
CALLING_HOURS = "calling_hours"
STATE_CALLING_HOURS = "state_calling_hours"
STATE_TOPIC_LIMIT = "state_topic_limit"
NO_SLOT = "no_slot"

REASONS: dict[str, str] = {
    OK: "allowed now",
    OPTED_OUT: "the user opted out of messages",
    UNDELIVERABLE: "the user's number cannot receive SMS (Twilio reported it)",
    NOTIFICATIONS_DISABLED: "the user turned notifications off (only urgent messages go out)",
    COOLDOWN: "another message to this user is within the cooldown",
    HOURLY_LIMIT: "the user's hourly limit is reached",
    DAILY_LIMIT: "the user's daily limit for their local day is reached",
    WEEKLY_LIMIT: "the user's weekly limit for their local week is reached",
    LOW_PRIORITY_RESERVE: "low priority leaves the last messages of the day to other lanes",
    QUIET_HOURS: "quiet hours in the user's timezone",
    PREFERRED_WINDOW: "outside the days and hours the user prefers to be messaged",
    SEQUENCE_SPAN: "the message's parts would run into the user's next local day",
    IN_FLIGHT: "another message to this user is being sent right now",
    CALLING_HOURS: "outside the legal calling hours of the user's place (US: 8 am to 9 pm local time)",
    STATE_CALLING_HOURS: "outside the stricter calling hours of the user's state (8 am to 8 pm local time)",
    STATE_TOPIC_LIMIT: "the user's state allows at most 3 messages on one topic in 24 hours",
    NO_SLOT: "no allowed time within the planning horizon",
}

# Which rule explains a deferral best when several were met on the way (see Decision): the one
# without which the message would have gone out much sooner. Budgets outweigh times of day (a
# spent budget is why the message waits; the clock only says until when), the longer budget the
# shorter (a spent week explains a wait of days). Among times of day the preferred window outweighs
# quiet hours: it is the user's own choice and usually the later of the two, so a message asked for
# at 23:00 and planned for Tuesday 18:00 is "preferred_window"; an agent told "quiet_hours" would
# expect 08:00. A sequence kept off the next day moves by at most its span, a few minutes, so it is
# the lightest; it is the reason only when nothing else was met.
SEVERITY: dict[str, int] = {
    SEQUENCE_SPAN: 1,
    COOLDOWN: 2,
    HOURLY_LIMIT: 3,
    QUIET_HOURS: 4,
    # The law outweighs the user's quiet hours (it is the reason no agent can work around), and a
    # state's stricter hours the federal ones; the user's own window still outweighs them.
    CALLING_HOURS: 5,
    STATE_CALLING_HOURS: 6,
    PREFERRED_WINDOW: 7,
    LOW_PRIORITY_RESERVE: 8,
    STATE_TOPIC_LIMIT: 9,
    DAILY_LIMIT: 10,
    WEEKLY_LIMIT: 11,
}


@dataclass(frozen=True)
class Decision:
    """The earliest allowed instant (None: never) and why it is not earlier.

    `blocked_by` lists every rule met on the way from `now` to `at`, in order, so its first entry
    is what forbids `now` itself. `reason` is the weightiest of them (SEVERITY), the one an agent
    should be told: a spent daily budget that lands the message at 08:00 tomorrow is a
    `daily_limit`, not `quiet_hours`; a cooldown that runs into the hourly limit is `hourly_limit`.
    """

    at: datetime | None
    reason: str
    now: datetime
    blocked_by: tuple[str, ...] = field(default=())

    @property
    def allowed_now(self) -> bool:
        return self.at is not None and self.at <= self.now

    @property
    def explanation(self) -> str:
        return REASONS.get(self.reason, self.reason)
