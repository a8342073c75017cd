"""The user's clock: IANA zones, the instant a local wall time begins, local days and ISO weeks.

Every instant this module returns is in UTC: arithmetic and comparisons on datetimes sharing a
ZoneInfo are wall-clock, not elapsed time.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)


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


def in_quiet_hours(local: time, start: time, end: time) -> bool:
    """Whether a local wall-clock time lies in the quiet window [start, end)."""
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


@lru_cache(maxsize=4096)
def local_instant(d: date, t: time, tz: tzinfo) -> datetime:
    """The first instant (in UTC) at which the local wall clock reads `d t` or later.

    An ambiguous fall-back time maps to its first occurrence, which is what "ends at 08:00" should
    mean; a wall time in a spring-forward gap maps to the instant the gap begins (the clock jumps
    past it there).
    """
    wall = datetime.combine(d, t)
    late = wall.replace(tzinfo=tz).astimezone(UTC)  # fold=0: offset before any transition
    if late.astimezone(tz).replace(tzinfo=None) == wall:
        return late
    # In a gap: fold=1 reads it with the offset after the gap, landing before the gap; the gap
    # begins somewhere in (early, late]. Find the first whole second whose wall clock is >= wall.
    early = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    while late - early > SECOND:
        mid = early + timedelta(seconds=(late - early).total_seconds() // 2)
        if mid.astimezone(tz).replace(tzinfo=None) >= wall:
            late = mid
        else:
            early = mid
    return late


def offset_change(a: datetime, b: datetime, tz: tzinfo) -> datetime | None:
    """The first instant in (a, b] with another UTC offset than at `a`, if any (b - a < 1 day, so
    there is at most one transition in between)."""
    off = a.astimezone(tz).utcoffset()
    if b.astimezone(tz).utcoffset() == off:
        return None
    while b - a > SECOND:
        mid = a + timedelta(seconds=(b - a).total_seconds() // 2)
        if mid.astimezone(tz).utcoffset() == off:
            a = mid
        else:
            b = mid
    return b


@lru_cache(maxsize=4096)
def day_bounds(d: date, tz: tzinfo) -> tuple[datetime, datetime]:
    """The instants that begin local day `d` and the day after it."""
    return local_instant(d, time(0), tz), local_instant(d + DAY, time(0), tz)


@lru_cache(maxsize=1024)
def week_bounds(monday: date, tz: tzinfo) -> tuple[datetime, datetime]:
    """The instants that begin the local ISO week starting on `monday` and the week after it."""
    return local_instant(monday, time(0), tz), local_instant(monday + 7 * DAY, time(0), tz)


def local_day_bounds(timezone_name: str, at: datetime) -> tuple[date, datetime, datetime]:
    """The user's local date at `at` and the instants that begin and end it."""
    tz = zone(timezone_name)
    d = at.astimezone(tz).date()
    return (d, *day_bounds(d, tz))


def local_week_bounds(timezone_name: str, at: datetime) -> tuple[datetime, datetime]:
    """The instants that begin and end the user's local ISO week holding `at`: Monday 00:00 to the
    next Monday 00:00 in the user's timezone (in UTC; a week with a DST change is 167 or 169 h)."""
    tz = zone(timezone_name)
    d = at.astimezone(tz).date()
    return week_bounds(d - d.weekday() * DAY, tz)
