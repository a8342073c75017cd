"""The user's preferred window: the days of the week and the local hours they like to be messaged."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta

from shared.domain import Limits, UserSettings
from shared.policy.local_time import DAY

WEEKDAYS = frozenset(range(1, 8))  # ISO: 1 = Monday ... 7 = Sunday
_WHOLE_DAY = (0.0, 86_400.0)

Hours = tuple[time, time]  # a local time range [start, end), start != end, wrapping midnight if start > end
Stretch = tuple[float, float]  # [a, b) in seconds of one local day


def _seconds(t: time) -> float:
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def _daily_ranges(start: time, end: time) -> list[Stretch]:
    """[start, end) wrapping midnight, as ranges of seconds of one local day (start != end)."""
    a, b = _seconds(start), _seconds(end)
    return [(a, b)] if a < b else [(0.0, b), (a, 86_400.0)]


def _hours(user: UserSettings) -> Hours | None:
    """The user's preferred time range; None (the whole of each allowed day) when they set none,
    only one end, or start == end."""
    start, end = user.preferred_start, user.preferred_end
    if start is None or end is None or start == end:
        return None
    return start, end


def _free(hours: Hours | None, lim: Limits, quiet: bool) -> list[Stretch]:
    """The stretches of a local day inside `hours` and, if `quiet`, outside quiet hours. A stretch
    never crosses midnight: a sequence never does (see planner._Planner.violation)."""
    free = [_WHOLE_DAY] if hours is None else _daily_ranges(*hours)
    if quiet and lim.quiet_hours_start != lim.quiet_hours_end:
        for q0, q1 in _daily_ranges(lim.quiet_hours_start, lim.quiet_hours_end):
            free = [
                piece for a, b in free for piece in ((a, min(b, q0)), (max(a, q1), b)) if piece[0] < piece[1]
            ]
    return free


def _openings(hours: Hours | None) -> tuple[time, ...]:
    """The wall-clock times at which a window with these hours opens on an allowed day."""
    if hours is None:
        return (time(0),)
    start, end = hours
    if start < end or end == time(0):
        return (start,)
    return (time(0), start)


@dataclass(frozen=True)
class Window:
    """A preferred window that can hold a message: the days (None: all) and the local time range
    (None: the whole day), with the wall-clock times at which it opens on an allowed day."""

    days: frozenset[int] | None
    start: time | None
    end: time | None
    openings: tuple[time, ...]

    @classmethod
    def of(cls, user: UserSettings, lim: Limits, quiet: bool, span: timedelta) -> Window | None:
        """The user's window for a message spanning `span`, or None if they prefer no days or hours,
        or if the preference cannot hold the message."""
        days = user.preferred_days
        if days is not None:
            days = days & WEEKDAYS
            if not days:
                return None  # it would never open: a preference that forbids everything is none
            if days == WEEKDAYS:
                days = None
        hours = _hours(user)
        if days is None and hours is None:
            return None
        # The window is a preference and quiet hours a rule: if no stretch of the window outside
        # quiet hours is long enough for the message (a window of 22:30-23:30 under quiet hours from
        # 22:00), honouring it would mean never sending, so it is ignored.
        needed = span.total_seconds()
        if not any(b - a > needed for a, b in _free(hours, lim, quiet)):
            return None
        start, end = hours or (None, None)
        return cls(days, start, end, _openings(hours))

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
