"""A naive, independent statement of the delivery rules, for checking `shared.policy` against.

It answers one question only: may a message go out at instant `t`, and if not, which rules forbid
it. It never searches for a next slot and shares no code with the policy (only the public
`Limits`/`UserSettings`/`Reservation` data classes are read as plain inputs). Everything is
counted the slow, obvious way: points are whole epoch seconds, the local day of a point is
`astimezone(tz).date()`, its week is that date's ISO (year, week), an hour window is tried at every
start that could matter, and whether a preferred window can hold a message at all is decided by
walking the pieces of a day between the wall times that matter.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

from shared.domain import Limits, Reservation, UserSettings

LANE_RANK = {"urgent": 0, "high": 1, "medium": 2, "low": 3}
HOUR_S = 3600


def epoch(t: datetime) -> int:
    """Whole epoch seconds of an aware instant (the tests only use whole seconds)."""
    assert t.tzinfo is not None
    return int(t.timestamp())


def from_epoch(s: int) -> datetime:
    return datetime.fromtimestamp(s, UTC)


def seconds_of_day(t: time) -> int:
    return t.hour * 3600 + t.minute * 60 + t.second


def quiet_at(local_wall: time, start: time, end: time) -> bool:
    """Is a wall-clock time inside [start, end), wrapping midnight; start == end is no window."""
    s, a, b = seconds_of_day(local_wall), seconds_of_day(start), seconds_of_day(end)
    if a == b:
        return False
    if a < b:
        return a <= s < b
    return s >= a or s < b  # wraps midnight


@dataclass(frozen=True)
class Rules:
    """The effective rules for one user, merged by hand (None in the user's settings = default)."""

    tz: str
    cooldown: int
    hourly: int
    daily: int
    quiet_start: time
    quiet_end: time
    quiet_on: bool
    active: int
    low_reserve: int
    weekly: int | None  # None: no weekly cap
    notifications: bool
    pref_days: frozenset[int] | None  # ISO weekdays as given (None: every day)
    pref_start: time | None
    pref_end: time | None

    @classmethod
    def of(cls, user: UserSettings, d: Limits) -> Rules:
        return cls(
            tz=user.timezone,
            cooldown=d.cooldown_seconds,
            hourly=d.hourly_limit if user.hourly_limit is None else user.hourly_limit,
            daily=d.daily_limit if user.daily_limit is None else user.daily_limit,
            weekly=d.weekly_limit if user.weekly_limit is None else user.weekly_limit,
            notifications=user.notifications_enabled,
            pref_days=user.preferred_days,
            pref_start=user.preferred_start,
            pref_end=user.preferred_end,
            quiet_start=d.quiet_hours_start if user.quiet_hours_start is None else user.quiet_hours_start,
            quiet_end=d.quiet_hours_end if user.quiet_hours_end is None else user.quiet_hours_end,
            quiet_on=user.quiet_hours_enabled and d.quiet_hours_enabled,
            active=d.active_window_seconds,
            low_reserve=d.low_daily_reserve,
        )

    def day_cap(self, priority: str, can_delay: bool) -> int:
        if priority == "low" and can_delay:
            return max(1, self.daily - self.low_reserve)
        return self.daily

    def refused(self, priority: str) -> bool:
        """Notifications off: every lane but urgent is refused outright."""
        return not self.notifications and priority != "urgent"

    def window_days(self) -> set[int] | None:
        if self.pref_days is None:
            return None
        return {d for d in self.pref_days if 1 <= d <= 7}

    def window_hours(self) -> tuple[time, time] | None:
        """The preferred time range, or None for the whole day (unset, half set, or start == end)."""
        if self.pref_start is None or self.pref_end is None or self.pref_start == self.pref_end:
            return None
        return self.pref_start, self.pref_end

    def in_window_hours(self, wall: time) -> bool:
        hours = self.window_hours()
        if hours is None:
            return True
        s, a, b = seconds_of_day(wall), seconds_of_day(hours[0]), seconds_of_day(hours[1])
        return a <= s < b if a < b else (s >= a or s < b)

    def window_usable(self, priority: str, can_delay: bool, span: int) -> bool:
        """Does this message wait for the preferred window? Only medium and low that can be
        delayed; and only if the window exists and some stretch of one local day, in the window
        and (for these lanes) outside quiet hours, is longer than the span."""
        if priority not in ("medium", "low") or not can_delay:
            return False
        days = self.window_days()
        if days is None and self.window_hours() is None:
            return False  # nothing preferred
        if days is not None and not days:
            return False  # never opens
        return self.free_stretch(in_window=True) > span

    def free_stretch(self, in_window: bool) -> int:
        """The longest run of seconds of one local day outside quiet hours (and, if asked, inside
        the preferred hours), walking the pieces of the day between the wall times that matter."""
        cuts = {0, 24 * HOUR_S}
        for t in (self.pref_start, self.pref_end, self.quiet_start, self.quiet_end):
            if t is not None:
                cuts.add(seconds_of_day(t))
        edges = sorted(cuts)
        run = longest = 0
        for a, b in pairwise(edges):  # every second of [a, b) is alike
            wall = time(a // 3600, a % 3600 // 60, a % 60)
            quiet = self.quiet_on and quiet_at(wall, self.quiet_start, self.quiet_end)
            free = not quiet and (self.in_window_hours(wall) or not in_window)
            run = run + (b - a) if free else 0
            longest = max(longest, run)
        return longest

    def sequence_never_fits(self, priority: str, span: int) -> bool:
        """Quiet hours leave no stretch of a day long enough for the sequence (the policy finds no
        slot then, unless the user happens to be active)."""
        return priority != "urgent" and self.free_stretch(in_window=False) <= span


class Oracle:
    """May a message of `priority` go out at `t`, given the sends, reservations and last inbound?"""

    def __init__(
        self,
        rules: Rules,
        sends: Iterable[datetime],
        reservations: Iterable[Reservation],
        last_inbound: datetime | None,
        priority: str,
        can_delay: bool,
        span: int = 0,
    ) -> None:
        self.rules = rules
        self.tz = ZoneInfo(rules.tz)
        self.priority = priority
        self.can_delay = can_delay
        self.span = span
        self.windowed = rules.window_usable(priority, can_delay, span)
        points = [epoch(s) for s in sends]
        if can_delay:  # the lane's own and more important queued messages count; others do not
            points += [epoch(r.at) for r in reservations if LANE_RANK[r.priority] <= LANE_RANK[priority]]
        self.points = sorted(points)
        self.per_day = Counter(from_epoch(p).astimezone(self.tz).date() for p in self.points)
        self.per_week = Counter(self.local_date(p).isocalendar()[:2] for p in self.points)
        self.last_in = None if last_inbound is None else epoch(last_inbound)
        self.cap = rules.day_cap(priority, can_delay)

    def local_date(self, e: int) -> date:
        return from_epoch(e).astimezone(self.tz).date()

    def active(self, e: int) -> bool:
        return self.last_in is not None and self.last_in <= e < self.last_in + self.rules.active

    def quiet(self, e: int, active_at: int | None = None) -> bool:
        """Is `e` in quiet hours for this lane, the user not active at `active_at` (default: e)?"""
        r = self.rules
        if self.priority == "urgent" or not r.quiet_on:
            return False
        wall = from_epoch(e).astimezone(self.tz).time()
        active = self.active(e if active_at is None else active_at)
        return quiet_at(wall, r.quiet_start, r.quiet_end) and not active

    def in_window(self, e: int) -> bool:
        """Is `e` inside the preferred window (True when this message does not wait for one)?"""
        if not self.windowed:
            return True
        local = from_epoch(e).astimezone(self.tz)
        days = self.rules.window_days()
        return (days is None or local.isoweekday() in days) and self.rules.in_window_hours(local.time())

    def week_rule(self, e: int) -> bool:
        weekly = self.rules.weekly
        return weekly is not None and self.per_week[self.local_date(e).isocalendar()[:2]] >= weekly

    def day_rule(self, e: int) -> str | None:
        n = self.per_day[self.local_date(e)]
        if n >= self.rules.daily:
            return "daily_limit"
        if n >= self.cap:
            return "low_priority_reserve"
        return None

    def near(self, e: int, radius: int) -> list[int]:
        """Points p with e - radius <= p <= e + radius (bisect is only a shortcut here)."""
        return self.points[bisect_left(self.points, e - radius) : bisect_right(self.points, e + radius)]

    def cooldown(self, e: int) -> bool:
        cd = self.rules.cooldown
        return any(abs(e - p) < cd for p in self.near(e, cd))

    def hourly(self, e: int) -> bool:
        """Would some half-open hour [w, w + 1 h) holding e hold more than `hourly` messages?"""
        pts = self.near(e, HOUR_S)
        # The fullest window holding e can be slid right until it starts at its first element,
        # which is either e or a point in (e - 1 h, e].
        starts = [e] + [p for p in pts if e - HOUR_S < p <= e]
        for w in starts:
            inside = sum(1 for p in pts if w <= p < w + HOUR_S)
            if inside + 1 > self.rules.hourly:
                return True
        return False

    def violations(self, t: datetime | int) -> list[str]:
        """The rules `t` breaks, in the order the policy reports them."""
        e = t if isinstance(t, int) else epoch(t)
        out = []
        if self.quiet(e):
            out.append("quiet_hours")
        if not self.in_window(e):
            out.append("preferred_window")
        if self.span:  # the sequence's last part, at `end`
            end = e + self.span
            if self.local_date(end) != self.local_date(e):
                out.append("sequence_span")
            if self.quiet(end, active_at=e):
                out.append("quiet_hours")
            if not self.in_window(end):
                out.append("preferred_window")
        if self.week_rule(e):
            out.append("weekly_limit")
        day = self.day_rule(e)
        if day:
            out.append(day)
        if self.cooldown(e):
            out.append("cooldown")
        if self.hourly(e):
            out.append("hourly_limit")
        return out

    def allowed(self, t: datetime | int) -> bool:
        return not self.violations(t)


def offset_changes(tz: ZoneInfo, lo: int, hi: int, step: int = 1800) -> list[int]:
    """Every instant in [lo, hi] where the UTC offset of `tz` changes (found by scanning)."""
    found = []
    prev = from_epoch(lo).astimezone(tz).utcoffset()
    e = lo
    while e < hi:
        nxt = min(e + step, hi)
        off = from_epoch(nxt).astimezone(tz).utcoffset()
        if off != prev:
            a, b = e, nxt  # offset(a) == prev != offset(b)
            while b - a > 1:
                m = (a + b) // 2
                if from_epoch(m).astimezone(tz).utcoffset() == prev:
                    a = m
                else:
                    b = m
            found.append(b)
            prev = off
        e = nxt
    return found


def boundaries(oracle: Oracle, lo: int, hi: int) -> set[int]:
    """Instants in [lo, hi) where some rule's verdict can change, and the second before each."""
    r = oracle.rules
    cands: set[int] = set()
    for p in oracle.points:
        cands.update((p - r.cooldown + 1, p + r.cooldown, p - HOUR_S + 1, p + HOUR_S))
    if oracle.last_in is not None:
        cands.update((oracle.last_in, oracle.last_in + r.active))
    tz = oracle.tz
    changes = offset_changes(tz, lo - 2 * 86400, hi + 2 * 86400)
    cands.update(changes)
    walls = {time(0), r.quiet_start, r.quiet_end} | {t for t in (r.pref_start, r.pref_end) if t is not None}
    d, last = oracle.local_date(lo) - timedelta(days=1), oracle.local_date(hi) + timedelta(days=1)
    while d <= last:
        for wall in walls:
            for fold in (0, 1):
                cands.add(epoch(datetime.combine(d, wall, tzinfo=tz).replace(fold=fold)))
        d += timedelta(days=1)
    if oracle.span:  # the rules on the sequence's end change when the end crosses one of these
        cands |= {c - oracle.span for c in cands}
    out = set()
    for c in cands:
        for x in (c - 1, c, c + 1):
            if lo <= x < hi:
                out.add(x)
    return out


def local_day_counts(points: Sequence[datetime], tz: str) -> Counter[date]:
    z = ZoneInfo(tz)
    return Counter(p.astimezone(z).date() for p in points)
