"""The delivery policy: when may a message to this user go out, and if not now, why not.

Pure: no I/O, no clock. `now` is always an argument, so the same code runs on a virtual clock in
tests and soak runs. The database enforces what this package plans (the claim re-counts under the
user's row lock); this package is what decides *when*.

The rules, with their defaults (each configurable globally, some per user):

- opted out, undeliverable: never;
- notifications disabled by the user: never, except `urgent`. Urgent messages are transactional
  (a login code, a booking that changed an hour from now): the user turned off notifications, not
  the service, so they still go out, under cooldown and budgets like any urgent message;
- cooldown: two messages to one user are at least 30 s apart;
- hourly limit 2: no 60-minute window holds more than 2 messages;
- daily limit 10 on the user's *local* calendar day;
- weekly limit (none by default) on the user's local ISO week, Monday 00:00 to Monday 00:00;
- quiet hours 22:00-08:00 in the user's IANA timezone (wrapping midnight; start == end means none),
  not applied while the user is active (wrote to us in the last 10 minutes);
- the user's preferred window (none by default): ISO days of the week and/or a local time range
  [start, end) (wrapping midnight; start == end is the whole day; only one end set is no range).
  Only `medium` and `low` with `can_delay` wait for it (urgent and high, and `can_delay=False`,
  ignore it). It is a preference, so a window that can never hold the message (no valid day, or
  no stretch of it outside quiet hours longer than the message's span) is ignored rather than
  never sending;
- lanes: `urgent` ignores quiet hours but keeps cooldown and budgets; `high` and `medium` take the
  next allowed slot; `low` also leaves the last `low_daily_reserve` messages of the day to the others;
- a multi-part sequence occupies [t, t + span] (`span`: the sum of its parts' delays): its end
  must lie on the same local day as t in every lane (a sequence is never split across days), and
  outside quiet hours (non-urgent lanes; the user counts as active if they are at t) and inside
  the preferred window where those apply to t. Only the two ends are checked, which is the same
  as checking every part while quiet periods and windows are longer than the span; a sequence
  longer than the time quiet hours leave free in a day finds no slot (`no_slot`) unless the user
  is active;
- planning counts the user's queued reservations of the same or a more important lane, so several
  messages queued at once are spread out rather than all planned for the same instant;
- `can_delay=False` plans against the hard limits only (sends already made), never for spacing or
  the preferred window.

`plan` answers the earliest allowed instant at or after `now` and a reason code; `check_now` is the
same against the sends already made, at delivery time.

The modules: `decision` (reason codes, their explanations and weights, Decision), `local_time`
(zones, local instants, day and week bounds), `window` (the preferred window), `planner` (the rules
as lower bounds, and their fixed point). Import the names from `shared.policy`.
"""

from __future__ import annotations

from shared.policy.decision import (
    CALLING_HOURS,
    COOLDOWN,
    DAILY_LIMIT,
    HOURLY_LIMIT,
    IN_FLIGHT,
    LOW_PRIORITY_RESERVE,
    NO_SLOT,
    NOTIFICATIONS_DISABLED,
    OK,
    OPTED_OUT,
    PREFERRED_WINDOW,
    QUIET_HOURS,
    REASONS,
    SEQUENCE_SPAN,
    SEVERITY,
    STATE_CALLING_HOURS,
    STATE_TOPIC_LIMIT,
    UNDELIVERABLE,
    WEEKLY_LIMIT,
    Decision,
)
from shared.policy.local_time import (
    DAY,
    HOUR,
    UnknownTimezone,
    in_quiet_hours,
    is_timezone,
    local_day_bounds,
    local_week_bounds,
    zone,
)
from shared.policy.planner import check_now, plan
from shared.policy.window import WEEKDAYS

__all__ = [
    "CALLING_HOURS",
    "COOLDOWN",
    "DAILY_LIMIT",
    "DAY",
    "HOUR",
    "HOURLY_LIMIT",
    "IN_FLIGHT",
    "LOW_PRIORITY_RESERVE",
    "NOTIFICATIONS_DISABLED",
    "NO_SLOT",
    "OK",
    "OPTED_OUT",
    "PREFERRED_WINDOW",
    "QUIET_HOURS",
    "REASONS",
    "SEQUENCE_SPAN",
    "SEVERITY",
    "STATE_CALLING_HOURS",
    "STATE_TOPIC_LIMIT",
    "UNDELIVERABLE",
    "WEEKDAYS",
    "WEEKLY_LIMIT",
    "Decision",
    "UnknownTimezone",
    "check_now",
    "in_quiet_hours",
    "is_timezone",
    "local_day_bounds",
    "local_week_bounds",
    "plan",
    "zone",
]
