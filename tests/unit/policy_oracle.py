"""A naive, independent statement of the delivery rules, for checking `shared.policy` against.

It answers one question only: may a message go out at instant `t`, and if not, which rules forbid
it. It never searches for a next slot and shares no code with the policy (only the public
`Limits`/`UserSettings`/`Reservation` data classes are read as plain inputs). Everything is
counted the slow, obvious way: points are whole epoch seconds, the local day of a point is
`astimezone(tz).date()`, an hour window is tried at every start that could matter.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from shared.policy import Limits, Reservation, UserSettings

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

    @classmethod
    def of(cls, user: UserSettings, d: Limits) -> Rules:
        return cls(
            tz=user.timezone,
            cooldown=d.cooldown_seconds,
            hourly=d.hourly_limit if user.hourly_limit is None else user.hourly_limit,
            daily=d.daily_limit if user.daily_limit is None else user.daily_limit,
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
    ) -> None:
        self.rules = rules
        self.tz = ZoneInfo(rules.tz)
        self.priority = priority
        self.can_delay = can_delay
        points = [epoch(s) for s in sends]
        if can_delay:  # the lane's own and more important queued messages count; others do not
            points += [epoch(r.at) for r in reservations if LANE_RANK[r.priority] <= LANE_RANK[priority]]
        self.points = sorted(points)
        self.per_day = Counter(from_epoch(p).astimezone(self.tz).date() for p in self.points)
        self.last_in = None if last_inbound is None else epoch(last_inbound)
        self.cap = rules.day_cap(priority, can_delay)

    def local_date(self, e: int) -> date:
        return from_epoch(e).astimezone(self.tz).date()

    def active(self, e: int) -> bool:
        return self.last_in is not None and self.last_in <= e < self.last_in + self.rules.active

    def quiet(self, e: int) -> bool:
        r = self.rules
        if self.priority == "urgent" or not r.quiet_on:
            return False
        wall = from_epoch(e).astimezone(self.tz).time()
        return quiet_at(wall, r.quiet_start, r.quiet_end) and not self.active(e)

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
    d, last = oracle.local_date(lo) - timedelta(days=1), oracle.local_date(hi) + timedelta(days=1)
    while d <= last:
        for wall in (time(0), r.quiet_start, r.quiet_end):
            for fold in (0, 1):
                cands.add(epoch(datetime.combine(d, wall, tzinfo=tz).replace(fold=fold)))
        d += timedelta(days=1)
    out = set()
    for c in cands:
        for x in (c - 1, c, c + 1):
            if lo <= x < hi:
                out.add(x)
    return out


def local_day_counts(points: Sequence[datetime], tz: str) -> Counter[date]:
    z = ZoneInfo(tz)
    return Counter(p.astimezone(z).date() for p in points)
