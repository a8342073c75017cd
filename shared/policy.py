"""The delivery policy: when may a message to this user go out, and if not now, why not.

Pure: no I/O, no clock. `now` is always an argument, so the same code runs on a virtual clock in
tests and soak runs. The database enforces what this module plans (the claim re-counts under the
user's row lock); this module is what decides *when*.

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

`plan` answers the earliest allowed instant at or after `now` and a reason code. It works by
repeatedly jumping to a lower bound: each violated rule names the earliest instant at which it
could stop being violated, and no instant skipped over can satisfy that rule, so the fixed point is
the earliest instant satisfying all of them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.domain import RANK, History, Limits, UserSettings

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
    PREFERRED_WINDOW: 5,
    LOW_PRIORITY_RESERVE: 6,
    DAILY_LIMIT: 7,
    WEEKLY_LIMIT: 8,
}

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEKDAYS = frozenset(range(1, 8))  # ISO: 1 = Monday ... 7 = Sunday
_NO_SPAN = timedelta(0)
_SECOND = timedelta(seconds=1)
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


@lru_cache(maxsize=4096)
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


@lru_cache(maxsize=4096)
def _day_bounds(d: date, tz: tzinfo) -> tuple[datetime, datetime]:
    """The instants that begin local day `d` and the day after it."""
    return _local_instant(d, time(0), tz), _local_instant(d + DAY, time(0), tz)


@lru_cache(maxsize=1024)
def _week_bounds(monday: date, tz: tzinfo) -> tuple[datetime, datetime]:
    """The instants that begin the local ISO week starting on `monday` and the week after it."""
    return _local_instant(monday, time(0), tz), _local_instant(monday + 7 * DAY, time(0), tz)


def _seconds(t: time) -> float:
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def _daily_ranges(start: time, end: time) -> list[tuple[float, float]]:
    """[start, end) wrapping midnight, as ranges of seconds of one local day (start != end)."""
    a, b = _seconds(start), _seconds(end)
    return [(a, b)] if a < b else [(0.0, b), (a, 86_400.0)]


@dataclass(frozen=True)
class _Window:
    """A preferred window that can hold a message: the days (None: all) and the local time range
    (None: the whole day), with the wall-clock times at which it opens on an allowed day."""

    days: frozenset[int] | None
    start: time | None
    end: time | None
    openings: tuple[time, ...]

    @classmethod
    def of(cls, user: UserSettings, lim: Limits, quiet: bool, span: timedelta) -> _Window | None:
        days = user.preferred_days
        if days is not None:
            days = days & WEEKDAYS
            if not days:
                return None  # it would never open: a preference that forbids everything is none
            if days == WEEKDAYS:
                days = None
        start, end = user.preferred_start, user.preferred_end
        if start is None or end is None or start == end:
            start = end = None  # no time range: the whole of each allowed day
        if days is None and start is None:
            return None
        # The window is a preference and quiet hours a rule: if no stretch of the window outside
        # quiet hours is long enough for the message (a window of 22:30-23:30 under quiet hours from
        # 22:00), honouring it would mean never sending, so it is ignored. A stretch never crosses
        # midnight: a sequence never does (see _Planner.violation).
        free = [(0.0, 86_400.0)] if start is None or end is None else _daily_ranges(start, end)
        if quiet and lim.quiet_hours_start != lim.quiet_hours_end:
            for q0, q1 in _daily_ranges(lim.quiet_hours_start, lim.quiet_hours_end):
                free = [
                    piece
                    for a, b in free
                    for piece in ((a, min(b, q0)), (max(a, q1), b))
                    if piece[0] < piece[1]
                ]
        if not any(b - a > span.total_seconds() for a, b in free):
            return None
        if start is None or end is None:
            openings: tuple[time, ...] = (time(0),)
        elif start < end or end == time(0):
            openings = (start,)
        else:
            openings = (time(0), start)
        return cls(days, start, end, openings)

    def holds(self, local: datetime) -> bool:
        """Whether a local wall-clock instant lies in the window."""
        if self.days is not None and local.isoweekday() not in self.days:
            return False
        if self.start is None or self.end is None:
            return True
        wall = local.time()
        if self.start < self.end:
            return self.start <= wall < self.end
        return wall >= self.start or wall < self.end

    def next_opening(self, wall: datetime) -> datetime:
        """The first naive wall-clock time after `wall` at which the window opens."""
        d = wall.date()
        for k in range(8):  # the days are not empty, so some allowed day begins within a week
            day = d + k * DAY
            if self.days is not None and day.isoweekday() not in self.days:
                continue
            for opening in self.openings:
                at = datetime.combine(day, opening)
                if at > wall:
                    return at
        raise AssertionError("a window with days opens within 8 days")


class _Planner:
    __slots__ = (
        "active_until",
        "can_delay",
        "cap",
        "full_cap",
        "last_in",
        "lim",
        "points",
        "priority",
        "quiet",
        "span",
        "tz",
        "window",
    )

    def __init__(
        self,
        user: UserSettings,
        defaults: Limits,
        history: History,
        priority: str,
        can_delay: bool,
        span: timedelta,
    ) -> None:
        self.lim = lim = user.limits(defaults)
        self.tz = zone(user.timezone)
        self.priority = priority
        self.can_delay = can_delay
        self.span = span
        # Everything in UTC: on datetimes sharing a ZoneInfo, `t - HOUR` and `<` are wall-clock.
        last_in = history.last_inbound_at
        self.last_in = last_in = last_in and last_in.astimezone(UTC)
        self.active_until = last_in and last_in + lim.active_window
        # Times read from the database are UTC already; converting them anyway was a tenth of a
        # decision.
        pts = [p if p.tzinfo is UTC else p.astimezone(UTC) for p in history.sends]
        if can_delay and history.reservations:
            rank = RANK[priority]
            for r in history.reservations:
                if RANK.get(r.priority, 2) <= rank:
                    at = r.at
                    pts.append(at if at.tzinfo is UTC else at.astimezone(UTC))
        pts.sort()
        self.points = pts
        self.cap = lim.cap(priority, can_delay)
        self.full_cap = lim.daily_limit
        self.quiet = priority != "urgent" and lim.quiet_hours_enabled
        # The window is "optimal timing": only for the lanes that may wait for it, and only when
        # the message may be delayed at all (canDelay false means the earliest hard-allowed time).
        self.window = (
            _Window.of(user, lim, self.quiet, span) if can_delay and priority in ("medium", "low") else None
        )

    def violation(self, t: datetime) -> tuple[str, datetime] | None:
        """The first rule `t` breaks and the earliest instant that rule could allow, or None."""
        local = t.astimezone(self.tz)
        quiet = self.quiet and not self._active(t)
        if quiet:
            bound = self._quiet(t, local)
            if bound is not None:
                return QUIET_HOURS, bound
        window = self.window
        if window is not None and not window.holds(local):
            return PREFERRED_WINDOW, self._opening(t, local)
        local_day = local.date()
        span = self.span
        if span:
            # The sequence ends at t + span: on t's local day, outside quiet hours, in the window.
            # Each bound is the earliest t' at which the end could get clear of what it hit.
            end = t + span
            local_end = end.astimezone(self.tz)
            if local_end.date() != local_day:
                next_day = _day_bounds(local_day, self.tz)[1]
                return SEQUENCE_SPAN, next_day if next_day > t else t + _SECOND
            if quiet:
                bound = self._quiet(end, local_end)
                if bound is not None:
                    return QUIET_HOURS, bound - span
            if window is not None and not window.holds(local_end):
                return PREFERRED_WINDOW, self._opening(end, local_end) - span
        bound_w = self._weekly(t, local_day)
        if bound_w is not None:
            return WEEKLY_LIMIT, bound_w
        bound_d = self._daily(t, local_day)
        if bound_d is not None:
            return bound_d
        bound = self._cooldown(t)
        if bound is not None:
            return COOLDOWN, bound
        bound = self._hourly(t)
        if bound is not None:
            return HOURLY_LIMIT, bound
        return None

    def _active(self, t: datetime) -> bool:
        last_in, until = self.last_in, self.active_until
        return last_in is not None and until is not None and last_in <= t < until

    def _quiet(self, t: datetime, local: datetime) -> datetime | None:
        """If `t` (`local` in the user's zone) is in quiet hours (by the wall clock alone), the
        first instant they could end."""
        lim = self.lim
        start, end = lim.quiet_hours_start, lim.quiet_hours_end
        if not in_quiet_hours(local.time(), start, end):
            return None
        d = local.date()
        if start > end and local.time() >= start:
            d += DAY
        bound = _local_instant(d, end, self.tz)
        if bound <= t:
            return t + _SECOND
        # A fall-back before `end` can set the wall clock back to before `start`: stop there.
        return _offset_change(t, bound, self.tz) or bound

    def _opening(self, t: datetime, local: datetime) -> datetime:
        """The first instant after `t` (outside the window) at which the window could open.

        The wall clock runs on with t's UTC offset until the offset next changes: the window's next
        opening on that clock is exact if it comes first, otherwise the change is the bound (after
        a fall-back the clock reads earlier times again, some of which may be in the window).
        """
        assert self.window is not None
        offset = local.utcoffset() or timedelta(0)
        at = (self.window.next_opening(local.replace(tzinfo=None)) - offset).replace(tzinfo=UTC)
        a = t
        while a < at:  # _offset_change looks at most a day ahead
            b = min(at, a + DAY)
            change = _offset_change(a, b, self.tz)
            if change is not None:
                return change
            a = b
        return at

    def _weekly(self, t: datetime, local_day: date) -> datetime | None:
        cap = self.lim.weekly_limit
        if cap is None:
            return None
        start, end = _week_bounds(local_day - local_day.weekday() * DAY, self.tz)
        pts = self.points
        if bisect_left(pts, end) - bisect_left(pts, start) < cap:
            return None
        return end if end > t else t + _SECOND

    def _daily(self, t: datetime, local_day: date) -> tuple[str, datetime] | None:
        start, end = _day_bounds(local_day, self.tz)
        pts = self.points
        n = bisect_left(pts, end) - bisect_left(pts, start)
        if n < self.cap:
            return None
        reason = DAILY_LIMIT if n >= self.full_cap else LOW_PRIORITY_RESERVE
        return reason, end if end > t else t + _SECOND

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
    *,
    span: timedelta = _NO_SPAN,
) -> Decision:
    """The earliest instant at or after `now` when this message may go out, and why not sooner.

    `span`: the message is a sequence whose last part goes out `span` after the first.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if span < _NO_SPAN:
        raise ValueError("span must not be negative")
    if user.opted_out:
        return Decision(None, OPTED_OUT, now)
    if user.undeliverable:
        return Decision(None, UNDELIVERABLE, now)
    if not user.notifications_enabled and priority != "urgent":
        return Decision(None, NOTIFICATIONS_DISABLED, now)
    planner = _Planner(user, defaults, history, priority, can_delay, span)
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
        t = bound if bound > t else t + _SECOND
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
    *,
    span: timedelta = _NO_SPAN,
) -> Decision:
    """The delivery-time check: hard limits against sends already made, at `now`.

    Reservations of other queued messages do not hold back a message that is due; they were
    spread at planning time. If not allowed now, the answer carries the next allowed instant.
    The preferred window and the sequence span are checked here too (the window applies to the
    same lanes as in `plan`).
    """
    due = History(sends=history.sends, reservations=(), last_inbound_at=history.last_inbound_at)
    return plan(user, defaults, due, now, priority, can_delay, span=span)


def local_day_bounds(timezone_name: str, at: datetime) -> tuple[date, datetime, datetime]:
    """The user's local date at `at` and the instants that begin and end it."""
    tz = zone(timezone_name)
    d = at.astimezone(tz).date()
    return (d, *_day_bounds(d, tz))


def local_week_bounds(timezone_name: str, at: datetime) -> tuple[datetime, datetime]:
    """The instants that begin and end the user's local ISO week holding `at`: Monday 00:00 to the
    next Monday 00:00 in the user's timezone (in UTC; a week with a DST change is 167 or 169 h)."""
    tz = zone(timezone_name)
    d = at.astimezone(tz).date()
    return _week_bounds(d - d.weekday() * DAY, tz)
