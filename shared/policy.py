"""The delivery policy: when may a message to this user go out, and if not now, why not.

Pure: no I/O, no clock. `now` is always an argument, so the same code runs on a virtual clock in
tests and soak runs. The database enforces what this module plans (the claim re-counts under the
user's row lock); this module is what decides *when*.

The rules, with their defaults (each configurable globally, some per user):

- cooldown: two messages to one user are at least 30 s apart;
- hourly limit 2: no 60-minute window holds more than 2 messages;
- daily limit 10 on the user's *local* calendar day;
- quiet hours 22:00-08:00 in the user's IANA timezone (wrapping midnight; start == end means none),
  not applied while the user is active (wrote to us in the last 10 minutes);
- lanes: `urgent` ignores quiet hours but keeps cooldown and budgets; `high` and `medium` take the
  next allowed slot; `low` also leaves the last `low_daily_reserve` messages of the day to the others;
- planning counts the user's queued reservations of the same or a more important lane, so several
  messages queued at once are spread out rather than all planned for the same instant;
- `can_delay=False` plans against the hard limits only (sends already made), never for spacing.

`plan` answers the earliest allowed instant at or after `now` and a reason code. It works by
repeatedly jumping to a lower bound: each violated rule names the earliest instant at which it
could stop being violated, and no instant skipped over can satisfy that rule, so the fixed point is
the earliest instant satisfying all of them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PRIORITIES: tuple[str, ...] = ("urgent", "high", "medium", "low")
RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}

OK = "ok"
OPTED_OUT = "opted_out"
UNDELIVERABLE = "undeliverable"
COOLDOWN = "cooldown"
HOURLY_LIMIT = "hourly_limit"
DAILY_LIMIT = "daily_limit"
LOW_PRIORITY_RESERVE = "low_priority_reserve"
QUIET_HOURS = "quiet_hours"
IN_FLIGHT = "in_flight"
NO_SLOT = "no_slot"

REASONS: dict[str, str] = {
    OK: "allowed now",
    OPTED_OUT: "the user opted out of messages",
    UNDELIVERABLE: "the user's number cannot receive SMS (Twilio reported it)",
    COOLDOWN: "another message to this user is within the cooldown",
    HOURLY_LIMIT: "the user's hourly limit is reached",
    DAILY_LIMIT: "the user's daily limit for their local day is reached",
    LOW_PRIORITY_RESERVE: "low priority leaves the last messages of the day to other lanes",
    QUIET_HOURS: "quiet hours in the user's timezone",
    IN_FLIGHT: "another message to this user is being sent right now",
    NO_SLOT: "no allowed time within the planning horizon",
}

# Which rule explains a deferral best when several were met on the way (see Decision).
SEVERITY: dict[str, int] = {
    COOLDOWN: 1,
    HOURLY_LIMIT: 2,
    QUIET_HOURS: 3,
    LOW_PRIORITY_RESERVE: 4,
    DAILY_LIMIT: 5,
}

HOUR = timedelta(hours=1)
_MAX_STEPS = 100_000
_HORIZON = timedelta(days=400)


class UnknownTimezone(ValueError):
    """The timezone is not a known IANA timezone name."""


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; raises UnknownTimezone for anything zoneinfo does not know."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise UnknownTimezone(f"unknown timezone {name!r}") from exc


def is_timezone(name: str) -> bool:
    try:
        zone(name)
    except UnknownTimezone:
        return False
    return True


@dataclass(frozen=True)
class Limits:
    """The limits in force for one user: global defaults merged with the user's overrides."""

    cooldown_seconds: int = 30
    hourly_limit: int = 2
    daily_limit: int = 10
    quiet_hours_start: time = time(22, 0)
    quiet_hours_end: time = time(8, 0)
    quiet_hours_enabled: bool = True
    active_window_seconds: int = 600
    low_daily_reserve: int = 2

    @property
    def cooldown(self) -> timedelta:
        return timedelta(seconds=self.cooldown_seconds)

    @property
    def active_window(self) -> timedelta:
        return timedelta(seconds=self.active_window_seconds)

    def cap(self, priority: str, can_delay: bool) -> int:
        """How many messages of this lane may go out on one local day."""
        if priority == "low" and can_delay:
            return max(1, self.daily_limit - self.low_daily_reserve)
        return self.daily_limit


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

    def limits(self, defaults: Limits) -> Limits:
        return replace(
            defaults,
            quiet_hours_start=self.quiet_hours_start or defaults.quiet_hours_start,
            quiet_hours_end=self.quiet_hours_end or defaults.quiet_hours_end,
            quiet_hours_enabled=self.quiet_hours_enabled and defaults.quiet_hours_enabled,
            daily_limit=self.daily_limit or defaults.daily_limit,
            hourly_limit=self.hourly_limit or defaults.hourly_limit,
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


def in_quiet_hours(local: time, start: time, end: time) -> bool:
    """Whether a local wall-clock time lies in the quiet window [start, end)."""
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


def _local_instant(d: date, t: time, tz: tzinfo) -> datetime:
    """The first instant (in UTC) at which the local wall clock reads `d t` or later.

    An ambiguous fall-back time maps to its first occurrence, which is what "ends at 08:00" should
    mean; a wall time in a spring-forward gap maps to the instant the gap begins (the clock jumps
    past it there). Always UTC: arithmetic and comparisons on datetimes sharing a ZoneInfo are
    wall-clock, not elapsed time.
    """
    wall = datetime.combine(d, t)
    late = wall.replace(tzinfo=tz).astimezone(UTC)  # fold=0: offset before any transition
    if late.astimezone(tz).replace(tzinfo=None) == wall:
        return late
    # In a gap: fold=1 reads it with the offset after the gap, landing before the gap; the gap
    # begins somewhere in (early, late]. Find the first whole second whose wall clock is >= wall.
    early = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    while late - early > timedelta(seconds=1):
        mid = early + timedelta(seconds=(late - early).total_seconds() // 2)
        if mid.astimezone(tz).replace(tzinfo=None) >= wall:
            late = mid
        else:
            early = mid
    return late


def _offset_change(a: datetime, b: datetime, tz: tzinfo) -> datetime | None:
    """The first instant in (a, b] with another UTC offset than at `a`, if any (b - a < 1 day, so
    there is at most one transition in between)."""
    off = a.astimezone(tz).utcoffset()
    if b.astimezone(tz).utcoffset() == off:
        return None
    while b - a > timedelta(seconds=1):
        mid = a + timedelta(seconds=(b - a).total_seconds() // 2)
        if mid.astimezone(tz).utcoffset() == off:
            a = mid
        else:
            b = mid
    return b


class _Planner:
    __slots__ = ("can_delay", "cap", "full_cap", "history", "lim", "points", "priority", "tz")

    def __init__(
        self, user: UserSettings, defaults: Limits, history: History, priority: str, can_delay: bool
    ) -> None:
        self.lim = user.limits(defaults)
        self.tz = zone(user.timezone)
        self.priority = priority
        self.can_delay = can_delay
        # Everything in UTC: on datetimes sharing a ZoneInfo, `t - HOUR` and `<` are wall-clock.
        last_in = history.last_inbound_at
        self.history = replace(history, last_inbound_at=last_in and last_in.astimezone(UTC))
        pts = [p.astimezone(UTC) for p in history.sends]
        if can_delay:
            rank = RANK[priority]
            pts.extend(r.at.astimezone(UTC) for r in history.reservations if RANK.get(r.priority, 2) <= rank)
        pts.sort()
        self.points = pts
        self.cap = self.lim.cap(priority, can_delay)
        self.full_cap = self.lim.daily_limit

    def violation(self, t: datetime) -> tuple[str, datetime] | None:
        """The first rule `t` breaks and the earliest instant that rule could allow, or None."""
        lim = self.lim
        if self.priority != "urgent" and lim.quiet_hours_enabled:
            bound = self._quiet(t)
            if bound is not None:
                return QUIET_HOURS, bound
        bound_d = self._daily(t)
        if bound_d is not None:
            return bound_d
        bound = self._cooldown(t)
        if bound is not None:
            return COOLDOWN, bound
        bound = self._hourly(t)
        if bound is not None:
            return HOURLY_LIMIT, bound
        return None

    def _quiet(self, t: datetime) -> datetime | None:
        lim = self.lim
        start, end = lim.quiet_hours_start, lim.quiet_hours_end
        local = t.astimezone(self.tz)
        if not in_quiet_hours(local.time().replace(tzinfo=None), start, end):
            return None
        last_in = self.history.last_inbound_at
        if last_in is not None and last_in <= t < last_in + lim.active_window:
            return None
        d = local.date()
        if start > end and local.time() >= start:
            d += timedelta(days=1)
        bound = _local_instant(d, end, self.tz)
        if bound <= t:
            return t + timedelta(seconds=1)
        # A fall-back before `end` can set the wall clock back to before `start`: stop there.
        return _offset_change(t, bound, self.tz) or bound

    def _daily(self, t: datetime) -> tuple[str, datetime] | None:
        local_day = t.astimezone(self.tz).date()
        start = _local_instant(local_day, time(0), self.tz)
        end = _local_instant(local_day + timedelta(days=1), time(0), self.tz)
        pts = self.points
        n = bisect_left(pts, end) - bisect_left(pts, start)
        if n < self.cap:
            return None
        reason = DAILY_LIMIT if n >= self.full_cap else LOW_PRIORITY_RESERVE
        return reason, end if end > t else t + timedelta(seconds=1)

    def _cooldown(self, t: datetime) -> datetime | None:
        cd = self.lim.cooldown
        if not cd:
            return None
        pts = self.points
        cur = t
        moved = False
        # Walk to the end of the connected run of cooldown intervals around t.
        while True:
            i = bisect_right(pts, cur - cd)
            j = bisect_left(pts, cur + cd)
            if i >= j:
                break
            cur = pts[j - 1] + cd
            moved = True
        return cur if moved else None

    def _hourly(self, t: datetime) -> datetime | None:
        n = self.lim.hourly_limit
        pts = self.points
        lo = bisect_right(pts, t - HOUR)
        hi = bisect_left(pts, t + HOUR)
        if hi - lo < n:
            return None
        best: datetime | None = None
        # A window holding t and points q[i..j] exists iff max(t, q[j]) - min(t, q[i]) < 1 h.
        for i in range(lo, hi):
            first = pts[i]
            j = i + n - 1
            if j >= hi:
                break
            span_lo = min(first, t)
            span_hi = max(pts[j], t)
            if span_hi - span_lo < HOUR:
                bound = first + HOUR
                if best is None or bound > best:
                    best = bound
        return best


def plan(
    user: UserSettings,
    defaults: Limits,
    history: History,
    now: datetime,
    priority: str = "medium",
    can_delay: bool = True,
) -> Decision:
    """The earliest instant at or after `now` when this message may go out, and why not sooner."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if user.opted_out:
        return Decision(None, OPTED_OUT, now)
    if user.undeliverable:
        return Decision(None, UNDELIVERABLE, now)
    planner = _Planner(user, defaults, history, priority, can_delay)
    t = now.astimezone(UTC)
    reasons: list[str] = []
    limit = now + _HORIZON
    for _ in range(_MAX_STEPS):
        v = planner.violation(t)
        if v is None:
            met = tuple(dict.fromkeys(reasons))
            return Decision(t, max(met, key=SEVERITY.__getitem__) if met else OK, now, met)
        reason, bound = v
        reasons.append(reason)
        t = bound if bound > t else t + timedelta(seconds=1)
        if t > limit:
            break
    return Decision(None, NO_SLOT, now, tuple(dict.fromkeys(reasons)))


def check_now(
    user: UserSettings,
    defaults: Limits,
    history: History,
    now: datetime,
    priority: str = "medium",
    can_delay: bool = True,
) -> Decision:
    """The delivery-time check: hard limits against sends already made, at `now`.

    Reservations of other queued messages do not hold back a message that is due; they were
    spread at planning time. If not allowed now, the answer carries the next allowed instant.
    """
    due = History(sends=history.sends, reservations=(), last_inbound_at=history.last_inbound_at)
    return plan(user, defaults, due, now, priority, can_delay)


def local_day_bounds(timezone_name: str, at: datetime) -> tuple[date, datetime, datetime]:
    """The user's local date at `at` and the instants that begin and end it."""
    tz = zone(timezone_name)
    d = at.astimezone(tz).date()
    return d, _local_instant(d, time(0), tz), _local_instant(d + timedelta(days=1), time(0), tz)
