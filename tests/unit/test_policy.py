"""Table-driven cases for the delivery policy: each asserts the exact planned instant and reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from itertools import combinations
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared.domain import History, Limits, Reservation, UserSettings
from shared.policy import (
    REASONS,
    SEVERITY,
    check_now,
    in_quiet_hours,
    local_day_bounds,
    local_week_bounds,
    plan,
)

S = timedelta(seconds=1)
MIN = timedelta(minutes=1)
H = timedelta(hours=1)
DEFAULTS = Limits()
NO_QUIET = Limits(quiet_hours_enabled=False)

NY = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def loc(tz: str, *a: int) -> datetime:
    """A local wall time in `tz` as a UTC instant (first occurrence if ambiguous)."""
    return datetime(*a, tzinfo=ZoneInfo(tz)).astimezone(UTC)


def spaced(start: datetime, n: int, gap: timedelta = 40 * MIN) -> tuple[datetime, ...]:
    """n sends from `start`, `gap` apart: 40 min keeps them within cooldown and the hourly limit."""
    return tuple(start + i * gap for i in range(n))


@dataclass(frozen=True)
class Case:
    id: str
    now: datetime
    at: datetime | None
    reason: str
    user: UserSettings = field(default_factory=UserSettings)
    limits: Limits = DEFAULTS
    sends: tuple[datetime, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    last_in: datetime | None = None
    priority: str = "medium"
    can_delay: bool = True
    span: timedelta = timedelta(0)
    blocked_by: tuple[str, ...] | None = None  # checked when given


T0 = utc(2025, 6, 10, 12, 0, 0)  # a Tuesday noon, UTC: no quiet hours for a UTC user
TUE_THU_EVENING: dict[str, Any] = {
    "preferred_days": frozenset({2, 4}),
    "preferred_start": time(18),
    "preferred_end": time(20),
}
LATE_EVENING: dict[str, Any] = {"preferred_start": time(21), "preferred_end": time(23)}

CASES = [
    # --- cooldown -------------------------------------------------------------------------------
    Case("cooldown: send 10 s ago", T0, T0 + 20 * S, "cooldown", sends=(T0 - 10 * S,)),
    Case("cooldown: send exactly 30 s ago is fine", T0, T0, "ok", sends=(T0 - 30 * S,)),
    Case("cooldown: send 29 s ago", T0, T0 + S, "cooldown", sends=(T0 - 29 * S,)),
    Case(
        "cooldown: chained reservations 0 s and +25 s push past both",
        T0,
        T0 + 55 * S,
        "cooldown",
        limits=Limits(hourly_limit=3),
        reservations=(Reservation(T0), Reservation(T0 + 25 * S)),
    ),
    # --- hourly ---------------------------------------------------------------------------------
    Case(
        "hourly: 2 sends in the last hour -> oldest + 1 h",
        T0,
        T0 - 50 * MIN + H,
        "hourly_limit",
        sends=(T0 - 50 * MIN, T0 - 20 * MIN),
    ),
    Case(
        "hourly: oldest exactly 1 h ago has left the window",
        T0,
        T0,
        "ok",
        sends=(T0 - H, T0 - 20 * MIN),
    ),
    Case(
        "hourly: window half-open, oldest 59:59 ago",
        T0,
        T0 + S,
        "hourly_limit",
        sends=(T0 - H + S, T0 - 20 * MIN),
    ),
    Case(
        "hourly: queued reservations ahead count too (window holding now, +20 min, +40 min)",
        T0,
        T0 + 80 * MIN,
        "hourly_limit",
        reservations=(Reservation(T0 + 20 * MIN), Reservation(T0 + 40 * MIN)),
    ),
    Case(
        "hourly: one send behind and one reservation ahead",
        T0,
        T0 + 40 * MIN,
        "hourly_limit",
        sends=(T0 - 20 * MIN,),
        reservations=(Reservation(T0 + 30 * MIN),),
    ),
    # --- daily (local calendar day) -------------------------------------------------------------
    Case(
        "daily: 10 sends today -> next UTC midnight (quiet hours off)",
        T0,
        utc(2025, 6, 11),
        "daily_limit",
        limits=NO_QUIET,
        sends=spaced(utc(2025, 6, 10, 5), 10),
    ),
    Case(
        "daily: 10 sends today -> midnight, then quiet hours -> 08:00",
        T0,
        utc(2025, 6, 11, 8),
        "daily_limit",
        sends=spaced(utc(2025, 6, 10, 5), 10),
    ),
    Case(
        "daily: 9 sends today -> now",
        T0,
        T0,
        "ok",
        sends=spaced(utc(2025, 6, 10, 5), 9),
    ),
    Case(
        # Tokyo is UTC+9: the local day 2025-06-10 is [06-09 15:00Z, 06-10 15:00Z). The sends are
        # spread over two UTC days; a UTC-day count would see only 7 today.
        "daily Tokyo: 10 sends on the local day -> Tokyo midnight = 15:00 UTC",
        utc(2025, 6, 10, 5),  # 14:00 JST
        utc(2025, 6, 10, 15),
        "daily_limit",
        user=UserSettings(timezone="Asia/Tokyo"),
        limits=NO_QUIET,
        sends=spaced(utc(2025, 6, 9, 22), 10),
    ),
    Case(
        "daily Tokyo: ... then quiet hours -> 08:00 JST = 23:00 UTC",
        utc(2025, 6, 10, 5),
        utc(2025, 6, 10, 23),
        "daily_limit",
        user=UserSettings(timezone="Asia/Tokyo"),
        sends=spaced(utc(2025, 6, 9, 22), 10),
    ),
    Case(
        "daily Tokyo: a send before Tokyo midnight belongs to the previous local day",
        utc(2025, 6, 10, 5),
        utc(2025, 6, 10, 5),
        "ok",
        user=UserSettings(timezone="Asia/Tokyo"),
        sends=(utc(2025, 6, 9, 14, 59, 59), *spaced(utc(2025, 6, 9, 22), 9)),
    ),
    Case(
        "daily NY: the 23-hour DST day ends at local midnight 04:00 UTC",
        loc("America/New_York", 2025, 3, 9, 20),
        utc(2025, 3, 10, 4),
        "daily_limit",
        user=UserSettings(timezone="America/New_York"),
        limits=NO_QUIET,
        sends=spaced(loc("America/New_York", 2025, 3, 9, 8), 10),
    ),
    # --- quiet hours across DST (America/New_York) ----------------------------------------------
    Case(
        "quiet NY spring: 23:00 EST the night before -> 08:00 EDT = 12:00 UTC",
        utc(2025, 3, 9, 4),  # 2025-03-08 23:00 EST (UTC-5)
        utc(2025, 3, 9, 12),  # 08:00 EDT (UTC-4), not 13:00 UTC
        "quiet_hours",
        user=UserSettings(timezone="America/New_York"),
    ),
    Case(
        "quiet NY fall: 23:00 EDT the night before -> 08:00 EST = 13:00 UTC",
        utc(2025, 11, 2, 3),  # 2025-11-01 23:00 EDT (UTC-4)
        utc(2025, 11, 2, 13),  # 08:00 EST (UTC-5), not 12:00 UTC
        "quiet_hours",
        user=UserSettings(timezone="America/New_York"),
    ),
    Case(
        "quiet NY spring: now given in the user's zone, not UTC",
        datetime(2025, 3, 8, 23, tzinfo=NY),
        utc(2025, 3, 9, 12),
        "quiet_hours",
        user=UserSettings(timezone="America/New_York"),
    ),
    Case(
        "quiet NY spring: quiet end 02:30 lies in the gap -> the clock passes it at 03:00 EDT",
        utc(2025, 3, 9, 5),  # 00:00 EST
        utc(2025, 3, 9, 7),  # 03:00 EDT, the first instant whose wall clock is >= 02:30
        "quiet_hours",
        user=UserSettings(timezone="America/New_York", quiet_hours_end=time(2, 30)),
    ),
    Case(
        "quiet NY spring: hourly window after the jump is elapsed time, not wall time",
        utc(2025, 3, 9, 6),  # 01:00 EST, quiet until 03:30 EDT = 07:30 UTC
        utc(2025, 3, 9, 7, 50),  # 06:50Z send + 1 h; at 07:30Z both sends are in the last hour
        "quiet_hours",
        user=UserSettings(timezone="America/New_York", quiet_hours_end=time(3, 30)),
        sends=(utc(2025, 3, 9, 6, 50), utc(2025, 3, 9, 6, 55)),
    ),
    Case(
        "quiet NY fall: end 01:30 is ambiguous -> its first occurrence (EDT)",
        utc(2025, 11, 2, 4),  # 00:00 EDT
        utc(2025, 11, 2, 5, 30),  # 01:30 EDT
        "quiet_hours",
        user=UserSettings(timezone="America/New_York", quiet_hours_end=time(1, 30)),
    ),
    Case(
        "quiet NY fall: the repeated 01:00-01:30 (EST) is quiet again by the wall clock",
        utc(2025, 11, 2, 6, 10),  # 01:10 EST, second pass
        utc(2025, 11, 2, 6, 30),  # 01:30 EST
        "quiet_hours",
        user=UserSettings(timezone="America/New_York", quiet_hours_end=time(1, 30)),
    ),
    Case(
        "quiet NY fall: a window from 01:30 is left when the clock falls back to 01:00 EST",
        utc(2025, 11, 2, 5, 45),  # 01:45 EDT, quiet
        utc(2025, 11, 2, 6),  # 01:00 EST: the wall clock reads before 01:30 again
        "quiet_hours",
        user=UserSettings(timezone="America/New_York", quiet_hours_start=time(1, 30)),
    ),
    Case(
        "quiet Chatham fall: 03:00-08:49 is left when 03:45 CHADT falls back to 02:45 CHAST",
        utc(2024, 4, 6, 13, 44, 37),  # 03:29:37 CHADT
        utc(2024, 4, 6, 14),  # 02:45 CHAST
        "quiet_hours",
        user=UserSettings(timezone="Pacific/Chatham", quiet_hours_start=time(3), quiet_hours_end=time(8, 49)),
    ),
    Case(
        "quiet Lord Howe spring: end 02:10 in the 30-minute gap -> 02:30 LHDT",
        loc("Australia/Lord_Howe", 2025, 10, 5, 1),
        utc(2025, 10, 4, 15, 30),
        "quiet_hours",
        user=UserSettings(timezone="Australia/Lord_Howe", quiet_hours_end=time(2, 10)),
    ),
    # --- quiet hours in other zones -------------------------------------------------------------
    Case(
        "quiet Kolkata: 22:30 IST -> 08:00 IST = 02:30 UTC",
        loc("Asia/Kolkata", 2025, 6, 10, 22, 30),
        utc(2025, 6, 11, 2, 30),
        "quiet_hours",
        user=UserSettings(timezone="Asia/Kolkata"),
    ),
    Case(
        "quiet LA: 23:00 PDT -> 08:00 PDT next morning = 15:00 UTC",
        loc("America/Los_Angeles", 2025, 6, 10, 23),
        utc(2025, 6, 11, 15),
        "quiet_hours",
        user=UserSettings(timezone="America/Los_Angeles"),
    ),
    Case(
        "quiet Berlin: 23:00 CEST -> 08:00 CEST next morning = 06:00 UTC",
        loc("Europe/Berlin", 2025, 6, 10, 23),
        utc(2025, 6, 11, 6),
        "quiet_hours",
        user=UserSettings(timezone="Europe/Berlin"),
    ),
    Case(
        "quiet Berlin: 03:00 after midnight -> 08:00 the same local day",
        loc("Europe/Berlin", 2025, 6, 11, 3),
        utc(2025, 6, 11, 6),
        "quiet_hours",
        user=UserSettings(timezone="Europe/Berlin"),
    ),
    Case(
        "quiet Berlin: 08:00 sharp is allowed",
        loc("Europe/Berlin", 2025, 6, 11, 8),
        loc("Europe/Berlin", 2025, 6, 11, 8),
        "ok",
        user=UserSettings(timezone="Europe/Berlin"),
    ),
    Case(
        "quiet Berlin: 22:00 sharp is quiet",
        loc("Europe/Berlin", 2025, 6, 10, 22),
        utc(2025, 6, 11, 6),
        "quiet_hours",
        user=UserSettings(timezone="Europe/Berlin"),
    ),
    Case(
        "quiet Berlin: 21:59:59 is allowed",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 59),
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 59),
        "ok",
        user=UserSettings(timezone="Europe/Berlin"),
    ),
    Case(
        "quiet custom 00:00-06:00 at 00:30 -> 06:00 the same day",
        loc("Europe/Berlin", 2025, 6, 11, 0, 30),
        loc("Europe/Berlin", 2025, 6, 11, 6),
        "quiet_hours",
        user=UserSettings(timezone="Europe/Berlin", quiet_hours_start=time(0), quiet_hours_end=time(6)),
    ),
    Case(
        "quiet custom 00:00-06:00 at 23:00 -> allowed",
        loc("Europe/Berlin", 2025, 6, 10, 23),
        loc("Europe/Berlin", 2025, 6, 10, 23),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", quiet_hours_start=time(0), quiet_hours_end=time(6)),
    ),
    Case(
        "quiet custom 21:30-07:15 at 21:30 -> 07:15 next day",
        utc(2025, 6, 10, 21, 30),
        utc(2025, 6, 11, 7, 15),
        "quiet_hours",
        user=UserSettings(quiet_hours_start=time(21, 30), quiet_hours_end=time(7, 15)),
    ),
    Case(
        "quiet custom 21:30-07:15 at 21:29:59 -> allowed",
        utc(2025, 6, 10, 21, 29, 59),
        utc(2025, 6, 10, 21, 29, 59),
        "ok",
        user=UserSettings(quiet_hours_start=time(21, 30), quiet_hours_end=time(7, 15)),
    ),
    Case(
        "quiet custom 21:30-07:15 at 07:14:59 -> 07:15 the same day",
        utc(2025, 6, 11, 7, 14, 59),
        utc(2025, 6, 11, 7, 15),
        "quiet_hours",
        user=UserSettings(quiet_hours_start=time(21, 30), quiet_hours_end=time(7, 15)),
    ),
    Case(
        "quiet start == end -> no quiet hours",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 10, 23),
        "ok",
        user=UserSettings(quiet_hours_start=time(22), quiet_hours_end=time(22)),
    ),
    Case(
        "quiet_hours_enabled False on the user -> none",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 10, 23),
        "ok",
        user=UserSettings(quiet_hours_enabled=False),
    ),
    Case(
        "quiet_hours_enabled False globally -> none",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 10, 23),
        "ok",
        limits=NO_QUIET,
    ),
    # --- the active exception -------------------------------------------------------------------
    Case(
        "active: inbound 5 min ago at 23:00 -> allowed now",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 10, 23),
        "ok",
        last_in=utc(2025, 6, 10, 22, 55),
    ),
    Case(
        "active: inbound 11 min ago at 23:00 -> quiet until 08:00",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 11, 8),
        "quiet_hours",
        last_in=utc(2025, 6, 10, 22, 49),
    ),
    Case(
        "active: inbound exactly 10 min ago -> no longer active",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 11, 8),
        "quiet_hours",
        last_in=utc(2025, 6, 10, 22, 50),
    ),
    Case(
        "active: inbound 5 min ago, but a send 10 s ago -> cooldown still applies",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 10, 23, 0, 20),
        "cooldown",
        sends=(utc(2025, 6, 10, 22, 59, 50),),
        last_in=utc(2025, 6, 10, 22, 55),
    ),
    Case(
        "active: hourly blocks past the active window -> quiet hours resume -> 08:00",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 11, 8),
        "quiet_hours",
        sends=(utc(2025, 6, 10, 22, 20), utc(2025, 6, 10, 22, 40)),
        last_in=utc(2025, 6, 10, 22, 55),
    ),
    # --- urgent ---------------------------------------------------------------------------------
    Case(
        "urgent at 23:00 -> now",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 10, 23),
        "ok",
        priority="urgent",
    ),
    Case(
        "urgent with a send 10 s ago -> cooldown",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 10, 23, 0, 20),
        "cooldown",
        sends=(utc(2025, 6, 10, 22, 59, 50),),
        priority="urgent",
    ),
    Case(
        "urgent keeps the daily budget, then ignores quiet hours at midnight",
        T0,
        utc(2025, 6, 11),
        "daily_limit",
        sends=spaced(utc(2025, 6, 10, 5), 10),
        priority="urgent",
    ),
    Case(
        "urgent keeps the hourly limit",
        T0,
        T0 + 10 * MIN,
        "hourly_limit",
        sends=(T0 - 50 * MIN, T0 - 20 * MIN),
        priority="urgent",
    ),
    # --- low and its daily reserve --------------------------------------------------------------
    Case(
        "low with 8 of 10 sent today -> next day (08:00 after quiet hours)",
        T0,
        utc(2025, 6, 11, 8),
        "low_priority_reserve",
        sends=spaced(utc(2025, 6, 10, 5), 8),
        priority="low",
    ),
    Case(
        "low with 8 of 10 sent today, quiet hours off -> next midnight",
        T0,
        utc(2025, 6, 11),
        "low_priority_reserve",
        limits=NO_QUIET,
        sends=spaced(utc(2025, 6, 10, 5), 8),
        priority="low",
    ),
    Case(
        "low with 7 of 10 -> now",
        T0,
        T0,
        "ok",
        sends=spaced(utc(2025, 6, 10, 5), 7),
        priority="low",
    ),
    Case(
        "medium with 8 of 10 -> now",
        T0,
        T0,
        "ok",
        sends=spaced(utc(2025, 6, 10, 5), 8),
    ),
    Case(
        "high with 9 of 10 -> now",
        T0,
        T0,
        "ok",
        sends=spaced(utc(2025, 6, 10, 5), 9),
        priority="high",
    ),
    Case(
        "low with 10 of 10 -> daily_limit, not the reserve",
        T0,
        utc(2025, 6, 11, 8),
        "daily_limit",
        sends=spaced(utc(2025, 6, 10, 5), 10),
        priority="low",
    ),
    Case(
        "low can_delay=False ignores the reserve",
        T0,
        T0,
        "ok",
        sends=spaced(utc(2025, 6, 10, 5), 8),
        priority="low",
        can_delay=False,
    ),
    Case(
        "low with a tiny budget keeps one message: daily 2 - reserve 2 -> max(1, 0) = 1",
        T0,
        T0,
        "ok",
        user=UserSettings(daily_limit=2),
        priority="low",
    ),
    Case(
        "low with a tiny budget: the one message is used",
        T0,
        utc(2025, 6, 11, 8),
        "low_priority_reserve",
        user=UserSettings(daily_limit=2),
        sends=(T0 - 2 * H,),
        priority="low",
    ),
    Case(
        "low: queued medium messages count against the reserve",
        T0,
        utc(2025, 6, 11, 8),
        "low_priority_reserve",
        sends=spaced(utc(2025, 6, 10, 5), 6),
        reservations=(Reservation(T0 + 3 * H, "medium"), Reservation(T0 + 4 * H, "high")),
        priority="low",
    ),
    # --- reservations by lane -------------------------------------------------------------------
    Case(
        "high is not held back by queued low and medium messages",
        T0,
        T0,
        "ok",
        reservations=(Reservation(T0, "low"), Reservation(T0 + 10 * S, "medium")),
        priority="high",
    ),
    Case(
        "high is held back by a queued urgent message (cooldown both ways)",
        T0,
        T0 + 40 * S,
        "cooldown",
        reservations=(Reservation(T0 + 10 * S, "urgent"),),
        priority="high",
    ),
    Case(
        "high is held back by a queued high message",
        T0,
        T0 + 30 * S,
        "cooldown",
        reservations=(Reservation(T0, "high"),),
        priority="high",
    ),
    Case(
        "medium is held back by a queued medium message",
        T0,
        T0 + 30 * S,
        "cooldown",
        reservations=(Reservation(T0, "medium"),),
    ),
    Case(
        "low is held back by a queued low message",
        T0,
        T0 + 30 * S,
        "cooldown",
        reservations=(Reservation(T0, "low"),),
        priority="low",
    ),
    Case(
        "urgent ignores a queued high message",
        T0,
        T0,
        "ok",
        reservations=(Reservation(T0, "high"),),
        priority="urgent",
    ),
    # --- can_delay=False ------------------------------------------------------------------------
    Case(
        "can_delay False ignores reservations",
        T0,
        T0,
        "ok",
        reservations=(Reservation(T0, "urgent"), Reservation(T0 + 10 * S, "medium")),
        can_delay=False,
    ),
    Case(
        "can_delay False still counts sends (cooldown)",
        T0,
        T0 + 20 * S,
        "cooldown",
        sends=(T0 - 10 * S,),
        reservations=(Reservation(T0 + 25 * S, "urgent"),),
        can_delay=False,
    ),
    Case(
        "can_delay False still counts sends (daily)",
        T0,
        utc(2025, 6, 11, 8),
        "daily_limit",
        sends=spaced(utc(2025, 6, 10, 5), 10),
        can_delay=False,
    ),
    Case(
        "can_delay False still keeps quiet hours",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 11, 8),
        "quiet_hours",
        can_delay=False,
    ),
    # --- opted out, per-user overrides ----------------------------------------------------------
    Case("opted out -> never", T0, None, "opted_out", user=UserSettings(opted_out=True)),
    Case(
        "opted out wins over everything else",
        utc(2025, 6, 10, 23),
        None,
        "opted_out",
        user=UserSettings(opted_out=True),
        sends=(utc(2025, 6, 10, 22, 59, 59),),
        priority="urgent",
    ),
    Case(
        "override daily_limit 3: 3 sends today -> next day",
        T0,
        utc(2025, 6, 11, 8),
        "daily_limit",
        user=UserSettings(daily_limit=3),
        sends=spaced(utc(2025, 6, 10, 8), 3),
    ),
    Case(
        "override daily_limit 3: 2 sends today -> now",
        T0,
        T0,
        "ok",
        user=UserSettings(daily_limit=3),
        sends=spaced(utc(2025, 6, 10, 8), 2),
    ),
    Case(
        "override daily_limit 3 with low: max(1, 3 - 2) = 1 a day",
        T0,
        utc(2025, 6, 11, 8),
        "low_priority_reserve",
        user=UserSettings(daily_limit=3),
        sends=(utc(2025, 6, 10, 8),),
        priority="low",
    ),
    Case(
        "override hourly_limit 1: a send 40 min ago -> send + 1 h",
        T0,
        T0 + 20 * MIN,
        "hourly_limit",
        user=UserSettings(hourly_limit=1),
        sends=(T0 - 40 * MIN,),
    ),
    Case(
        "override hourly_limit 1: a reservation 40 min ahead -> reservation + 1 h",
        T0,
        T0 + 100 * MIN,
        "hourly_limit",
        user=UserSettings(hourly_limit=1),
        reservations=(Reservation(T0 + 40 * MIN),),
    ),
    Case(
        "global limits: cooldown 0 allows two at the same instant",
        T0,
        T0,
        "ok",
        limits=Limits(cooldown_seconds=0),
        sends=(T0,),
    ),
    # --- reason: the weightiest rule met between `now` and the plan (policy.SEVERITY) ------------
    Case(
        "reason order: quiet hours reported before daily",
        utc(2025, 6, 10, 23),
        utc(2025, 6, 11, 8),
        "quiet_hours",
        sends=spaced(utc(2025, 6, 10, 5), 10),
    ),
    Case(
        "reason order: cooldown pushes into the hourly limit",
        T0,
        T0 + 30 * MIN,
        "hourly_limit",
        sends=(T0 - 30 * MIN, T0 - 10 * S),
        user=UserSettings(hourly_limit=2),
    ),
    # --- notifications disabled: only urgent goes out ------------------------------------------
    Case(
        "notifications off: medium refused",
        T0,
        None,
        "notifications_disabled",
        user=UserSettings(notifications_enabled=False),
    ),
    Case(
        "notifications off: high refused",
        T0,
        None,
        "notifications_disabled",
        user=UserSettings(notifications_enabled=False),
        priority="high",
    ),
    Case(
        "notifications off: low refused, can_delay False too",
        T0,
        None,
        "notifications_disabled",
        user=UserSettings(notifications_enabled=False),
        priority="low",
        can_delay=False,
    ),
    Case(
        "notifications off: urgent still goes out",
        T0,
        T0,
        "ok",
        user=UserSettings(notifications_enabled=False),
        priority="urgent",
    ),
    Case(
        "notifications off: urgent keeps the cooldown",
        T0,
        T0 + 20 * S,
        "cooldown",
        user=UserSettings(notifications_enabled=False),
        sends=(T0 - 10 * S,),
        priority="urgent",
    ),
    Case(
        "notifications off and opted out -> opted_out",
        T0,
        None,
        "opted_out",
        user=UserSettings(notifications_enabled=False, opted_out=True),
        priority="urgent",
    ),
    # --- weekly limit (the user's local ISO week) -----------------------------------------------
    Case(
        "weekly 3: 3 sends this week -> next Monday 00:00, then quiet hours -> 08:00",
        T0,  # Tuesday 2025-06-10
        utc(2025, 6, 16, 8),
        "weekly_limit",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 3),
        blocked_by=("weekly_limit", "quiet_hours"),
    ),
    Case(
        "weekly 3, quiet hours off -> next Monday 00:00",
        T0,
        utc(2025, 6, 16),
        "weekly_limit",
        user=UserSettings(weekly_limit=3),
        limits=NO_QUIET,
        sends=spaced(utc(2025, 6, 9, 10), 3),
        blocked_by=("weekly_limit",),
    ),
    Case(
        "weekly 3 globally: 3 sends this week -> next Monday 08:00",
        T0,
        utc(2025, 6, 16, 8),
        "weekly_limit",
        limits=Limits(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 3),
    ),
    Case(
        "weekly: the user's 5 wins over the global 3",
        T0,
        T0,
        "ok",
        user=UserSettings(weekly_limit=5),
        limits=Limits(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 3),
    ),
    Case(
        "weekly 3: 2 sends this week -> now",
        T0,
        T0,
        "ok",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 2),
    ),
    Case(
        "weekly 3: sends on last Sunday belong to last week",
        T0,
        T0,
        "ok",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 8, 20), 3),
    ),
    Case(
        "weekly 10 and daily 10 both spent: the week is checked first and explains it",
        T0,
        utc(2025, 6, 16, 8),
        "weekly_limit",
        user=UserSettings(weekly_limit=10),
        sends=spaced(utc(2025, 6, 10, 5), 10),
        blocked_by=("weekly_limit", "quiet_hours"),
    ),
    Case(
        "weekly Tokyo: a send at 23:59:59 JST Sunday belongs to the previous week",
        T0,  # 21:00 JST
        T0,
        "ok",
        user=UserSettings(timezone="Asia/Tokyo", weekly_limit=1),
        sends=(utc(2025, 6, 8, 14, 59, 59),),
    ),
    Case(
        "weekly Tokyo: a send at 00:00 JST Monday counts -> next Tokyo Monday 08:00 = 23:00 UTC",
        T0,
        utc(2025, 6, 15, 23),
        "weekly_limit",
        user=UserSettings(timezone="Asia/Tokyo", weekly_limit=1),
        sends=(utc(2025, 6, 8, 15),),
    ),
    Case(
        "weekly NY: the DST week ends at Monday 00:00 EDT = 04:00 UTC",
        loc("America/New_York", 2025, 3, 9, 20),
        utc(2025, 3, 10, 4),
        "weekly_limit",
        user=UserSettings(timezone="America/New_York", weekly_limit=2),
        limits=NO_QUIET,
        sends=(loc("America/New_York", 2025, 3, 3, 0), loc("America/New_York", 2025, 3, 5, 12)),
    ),
    Case(
        "weekly: urgent keeps the weekly budget, then ignores quiet hours at Monday 00:00",
        T0,
        utc(2025, 6, 16),
        "weekly_limit",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 3),
        priority="urgent",
    ),
    Case(
        "weekly: queued reservations of the lane count",
        T0,
        utc(2025, 6, 16, 8),
        "weekly_limit",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 2),
        reservations=(Reservation(T0 + 3 * H, "medium"),),
    ),
    Case(
        "weekly: high is not held back by a queued low message",
        T0,
        T0,
        "ok",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 2),
        reservations=(Reservation(T0 + 3 * H, "low"),),
        priority="high",
    ),
    Case(
        "weekly: can_delay False counts sends only",
        T0,
        T0,
        "ok",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 2),
        reservations=(Reservation(T0 + 3 * H, "urgent"),),
        can_delay=False,
    ),
    Case(
        "weekly 1: a reservation at next Monday 00:00 belongs to next week",
        utc(2025, 6, 15, 12),
        utc(2025, 6, 15, 12),
        "ok",
        user=UserSettings(weekly_limit=1),
        reservations=(Reservation(utc(2025, 6, 16)),),
    ),
    Case(
        "weekly 1: a reservation at Sunday 23:59:59 fills this week -> Monday 08:00",
        utc(2025, 6, 15, 12),
        utc(2025, 6, 16, 8),
        "weekly_limit",
        user=UserSettings(weekly_limit=1),
        reservations=(Reservation(utc(2025, 6, 15, 23, 59, 59)),),
    ),
    Case(
        "weekly: no low reserve on the week",
        T0,
        T0,
        "ok",
        user=UserSettings(weekly_limit=3),
        sends=spaced(utc(2025, 6, 9, 10), 2),
        priority="low",
    ),
    # --- the preferred window (medium and low that can wait) ------------------------------------
    Case(
        "window Tue/Thu 18-20 Berlin: medium asked Monday 10:00 -> Tuesday 18:00",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 10, 18),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        blocked_by=("preferred_window",),
    ),
    Case(
        "window Tue/Thu 18-20 Berlin: low too",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 10, 18),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        priority="low",
    ),
    Case(
        "window: high ignores it",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 9, 10),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        priority="high",
    ),
    Case(
        "window: urgent ignores it",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 9, 10),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        priority="urgent",
    ),
    Case(
        "window: can_delay False ignores it (earliest hard-allowed time)",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 9, 10),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        priority="low",
        can_delay=False,
    ),
    Case(
        "window: Tuesday 19:00 is inside -> now",
        loc("Europe/Berlin", 2025, 6, 10, 19),
        loc("Europe/Berlin", 2025, 6, 10, 19),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
    ),
    Case(
        "window: Tuesday 20:00 has closed -> Thursday 18:00",
        loc("Europe/Berlin", 2025, 6, 10, 20),
        loc("Europe/Berlin", 2025, 6, 12, 18),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
    ),
    Case(
        "window: Thursday 20:30 -> next Tuesday 18:00",
        loc("Europe/Berlin", 2025, 6, 12, 20, 30),
        loc("Europe/Berlin", 2025, 6, 17, 18),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
    ),
    Case(
        "window: hours only, 18-20 every day -> 18:00 today",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 9, 18),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", preferred_start=time(18), preferred_end=time(20)),
    ),
    Case(
        "window: days only (weekend), asked Friday noon -> Saturday 00:00, quiet hours -> 08:00",
        loc("Europe/Berlin", 2025, 6, 13, 12),
        loc("Europe/Berlin", 2025, 6, 14, 8),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", preferred_days=frozenset({6, 7})),
        blocked_by=("preferred_window", "quiet_hours"),
    ),
    Case(
        "window: weekend, asked Sunday 23:00 -> quiet until Monday 08:00 -> Saturday 08:00",
        loc("Europe/Berlin", 2025, 6, 15, 23),
        loc("Europe/Berlin", 2025, 6, 21, 8),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", preferred_days=frozenset({6, 7})),
        blocked_by=("quiet_hours", "preferred_window"),
    ),
    Case(
        "window: start == end is the whole day, Tuesday only -> Tuesday 00:00, quiet -> 08:00",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 10, 8),
        "preferred_window",
        user=UserSettings(
            timezone="Europe/Berlin",
            preferred_days=frozenset({2}),
            preferred_start=time(18),
            preferred_end=time(18),
        ),
    ),
    Case(
        "window: only a start -> no time range, no days -> no window",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 9, 10),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", preferred_start=time(18)),
    ),
    Case(
        "window: empty preferred_days never opens -> treated as no window",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 9, 10),
        "ok",
        user=UserSettings(
            timezone="Europe/Berlin",
            preferred_days=frozenset(),
            preferred_start=time(18),
            preferred_end=time(20),
        ),
    ),
    Case(
        "window: no valid ISO weekday -> no window",
        loc("Europe/Berlin", 2025, 6, 9, 10),
        loc("Europe/Berlin", 2025, 6, 9, 10),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", preferred_days=frozenset({0, 8})),
    ),
    Case(
        "window 21-23 with quiet hours from 22: asked 10:00 -> 21:00 today",
        loc("Europe/Berlin", 2025, 6, 10, 10),
        loc("Europe/Berlin", 2025, 6, 10, 21),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **LATE_EVENING),
    ),
    Case(
        "window 21-23 with quiet hours from 22: asked 22:30 -> quiet -> 08:00 -> 21:00 tomorrow",
        loc("Europe/Berlin", 2025, 6, 10, 22, 30),
        loc("Europe/Berlin", 2025, 6, 11, 21),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **LATE_EVENING),
        blocked_by=("quiet_hours", "preferred_window"),
    ),
    Case(
        "window 21-23, quiet from 22: a 60 s sequence at 21:59:30 ends in quiet -> 21:00 tomorrow",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        loc("Europe/Berlin", 2025, 6, 11, 21),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **LATE_EVENING),
        span=MIN,
        blocked_by=("quiet_hours", "preferred_window"),
    ),
    Case(
        "window wrapping 23-09 under quiet 22-08: asked 10:00 -> 23:00 is quiet -> 08:00",
        loc("Europe/Berlin", 2025, 6, 10, 10),
        loc("Europe/Berlin", 2025, 6, 11, 8),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", preferred_start=time(23), preferred_end=time(9)),
        blocked_by=("preferred_window", "quiet_hours"),
    ),
    Case(
        "window wrapping 23-09 under quiet 22-08: asked 07:00 -> 08:00 (quiet hours only)",
        loc("Europe/Berlin", 2025, 6, 11, 7),
        loc("Europe/Berlin", 2025, 6, 11, 8),
        "quiet_hours",
        user=UserSettings(timezone="Europe/Berlin", preferred_start=time(23), preferred_end=time(9)),
        blocked_by=("quiet_hours",),
    ),
    Case(
        "window wrapping 23-09 without quiet hours: asked 10:00 -> 23:00",
        loc("Europe/Berlin", 2025, 6, 10, 10),
        loc("Europe/Berlin", 2025, 6, 10, 23),
        "preferred_window",
        user=UserSettings(
            timezone="Europe/Berlin",
            preferred_start=time(23),
            preferred_end=time(9),
            quiet_hours_enabled=False,
        ),
    ),
    Case(
        "window wrapping 23-09, Wednesdays only: Wednesday 00:00-09:00 is in, Thursday's is not",
        loc("Europe/Berlin", 2025, 6, 12, 1),  # Thursday 01:00
        loc("Europe/Berlin", 2025, 6, 18, 0),  # next Wednesday 00:00
        "preferred_window",
        user=UserSettings(
            timezone="Europe/Berlin",
            preferred_days=frozenset({3}),
            preferred_start=time(23),
            preferred_end=time(9),
            quiet_hours_enabled=False,
        ),
    ),
    Case(
        "window 22:30-23:30 lies wholly in quiet hours -> ignored rather than never sending",
        loc("Europe/Berlin", 2025, 6, 10, 10),
        loc("Europe/Berlin", 2025, 6, 10, 10),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", preferred_start=time(22, 30), preferred_end=time(23, 30)),
    ),
    Case(
        "window 22:30-23:30 with the user's quiet hours off -> 22:30",
        loc("Europe/Berlin", 2025, 6, 10, 10),
        loc("Europe/Berlin", 2025, 6, 10, 22, 30),
        "preferred_window",
        user=UserSettings(
            timezone="Europe/Berlin",
            preferred_start=time(22, 30),
            preferred_end=time(23, 30),
            quiet_hours_enabled=False,
        ),
    ),
    Case(
        "window 21:59-22:30 leaves one free minute before quiet hours: enough for a single SMS",
        loc("Europe/Berlin", 2025, 6, 10, 10),
        loc("Europe/Berlin", 2025, 6, 10, 21, 59),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", preferred_start=time(21, 59), preferred_end=time(22, 30)),
    ),
    Case(
        "window 21:59-22:30: a 60 s sequence cannot fit in the free minute -> window ignored",
        loc("Europe/Berlin", 2025, 6, 10, 10),
        loc("Europe/Berlin", 2025, 6, 10, 10),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", preferred_start=time(21, 59), preferred_end=time(22, 30)),
        span=MIN,
    ),
    Case(
        "window Tue/Wed: a spent daily budget on Tuesday explains the wait to Wednesday 08:00",
        T0,
        utc(2025, 6, 11, 8),
        "daily_limit",
        user=UserSettings(preferred_days=frozenset({2, 3})),
        sends=spaced(utc(2025, 6, 10, 5), 10),
        blocked_by=("daily_limit", "quiet_hours"),
    ),
    Case(
        "window: the active-user exception does not open it",
        T0,
        utc(2025, 6, 10, 18),
        "preferred_window",
        user=UserSettings(preferred_start=time(18), preferred_end=time(20)),
        last_in=T0 - 5 * MIN,
    ),
    Case(
        "window NY spring: Sunday 02:00-04:00 opens when the clock jumps to 03:00 EDT = 07:00 UTC",
        loc("America/New_York", 2025, 3, 8, 12),
        utc(2025, 3, 9, 7),
        "preferred_window",
        user=UserSettings(
            timezone="America/New_York",
            preferred_days=frozenset({7}),
            preferred_start=time(2),
            preferred_end=time(4),
        ),
        limits=NO_QUIET,
    ),
    Case(
        "window NY fall: 01:10-01:30 missed at 01:45 EDT reopens at 01:10 EST = 06:10 UTC",
        utc(2025, 11, 2, 5, 45),
        utc(2025, 11, 2, 6, 10),
        "preferred_window",
        user=UserSettings(
            timezone="America/New_York", preferred_start=time(1, 10), preferred_end=time(1, 30)
        ),
        limits=NO_QUIET,
    ),
    # --- sequences: [t, t + span] on one local day, its end outside quiet hours ------------------
    Case(
        "span: a 60 s sequence at 21:59:30 Berlin would end in quiet hours -> 08:00",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        loc("Europe/Berlin", 2025, 6, 11, 8),
        "quiet_hours",
        user=UserSettings(timezone="Europe/Berlin"),
        span=MIN,
        blocked_by=("quiet_hours",),
    ),
    Case(
        "span: a 30 s sequence at 21:59:30 ends at 22:00:00, which is quiet -> 08:00",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        loc("Europe/Berlin", 2025, 6, 11, 8),
        "quiet_hours",
        user=UserSettings(timezone="Europe/Berlin"),
        span=30 * S,
    ),
    Case(
        "span: a 29 s sequence at 21:59:30 ends at 21:59:59 -> now",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        "ok",
        user=UserSettings(timezone="Europe/Berlin"),
        span=29 * S,
    ),
    Case(
        "span: the user active at the start -> quiet hours do not apply to the end either",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        "ok",
        user=UserSettings(timezone="Europe/Berlin"),
        last_in=loc("Europe/Berlin", 2025, 6, 10, 21, 55),
        span=MIN,
    ),
    Case(
        "span: active at the start (until 21:59:45) is what counts, not at the end",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        "ok",
        user=UserSettings(timezone="Europe/Berlin"),
        last_in=loc("Europe/Berlin", 2025, 6, 10, 21, 49, 45),
        span=MIN,
    ),
    Case(
        "span: a quiet period shorter than the span -> the first start whose end is clear of it",
        utc(2025, 6, 10, 21, 58, 30),  # ends 22:00:30, in quiet 22:00-22:01
        utc(2025, 6, 10, 21, 59),  # ends 22:01:00; only the end is checked, not the parts between
        "quiet_hours",
        user=UserSettings(quiet_hours_start=time(22), quiet_hours_end=time(22, 1)),
        span=2 * MIN,
    ),
    Case(
        "span: urgent ignores quiet hours at the end too",
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        loc("Europe/Berlin", 2025, 6, 10, 21, 59, 30),
        "ok",
        user=UserSettings(timezone="Europe/Berlin"),
        priority="urgent",
        span=MIN,
    ),
    Case(
        "span: quiet hours off, a sequence across local midnight moves to 00:00",
        utc(2025, 6, 10, 23, 59, 30),
        utc(2025, 6, 11),
        "sequence_span",
        limits=NO_QUIET,
        span=MIN,
        blocked_by=("sequence_span",),
    ),
    Case(
        "span: ending at 00:00:00 is already the next day",
        utc(2025, 6, 10, 23, 59),
        utc(2025, 6, 11),
        "sequence_span",
        limits=NO_QUIET,
        span=MIN,
    ),
    Case(
        "span: ending at 23:59:59 -> now",
        utc(2025, 6, 10, 23, 58, 59),
        utc(2025, 6, 10, 23, 58, 59),
        "ok",
        limits=NO_QUIET,
        span=MIN,
    ),
    Case(
        "span: urgent is never split across days either",
        utc(2025, 6, 10, 23, 59, 30),
        utc(2025, 6, 11),
        "sequence_span",
        priority="urgent",
        span=MIN,
    ),
    Case(
        "span Tokyo: the day ends at Tokyo midnight = 15:00 UTC",
        utc(2025, 6, 10, 14, 59, 30),
        utc(2025, 6, 10, 15),
        "sequence_span",
        user=UserSettings(timezone="Asia/Tokyo"),
        limits=NO_QUIET,
        span=MIN,
    ),
    Case(
        "span: within a day nothing changes",
        T0,
        T0,
        "ok",
        span=5 * MIN,
    ),
    Case(
        "span: cooldown is still counted from the start",
        T0,
        T0 + 20 * S,
        "cooldown",
        sends=(T0 - 10 * S,),
        span=5 * MIN,
    ),
    Case(
        "span: a sequence at 19:59:30 Tuesday would end after the window -> Thursday 18:00",
        loc("Europe/Berlin", 2025, 6, 10, 19, 59, 30),
        loc("Europe/Berlin", 2025, 6, 12, 18),
        "preferred_window",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        span=MIN,
        blocked_by=("preferred_window",),
    ),
    Case(
        "span: a sequence at 19:58:59 Tuesday ends at 19:59:59 -> now",
        loc("Europe/Berlin", 2025, 6, 10, 19, 58, 59),
        loc("Europe/Berlin", 2025, 6, 10, 19, 58, 59),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        span=MIN,
    ),
    Case(
        "span: high ignores the window at the end as well",
        loc("Europe/Berlin", 2025, 6, 10, 19, 59, 30),
        loc("Europe/Berlin", 2025, 6, 10, 19, 59, 30),
        "ok",
        user=UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING),
        span=MIN,
        priority="high",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan_table(case: Case) -> None:
    history = History(sends=case.sends, reservations=case.reservations, last_inbound_at=case.last_in)
    d = plan(case.user, case.limits, history, case.now, case.priority, case.can_delay, span=case.span)
    assert (d.at, d.reason) == (case.at, case.reason)
    if case.blocked_by is not None:
        assert d.blocked_by == case.blocked_by
    assert d.reason in ("ok", "opted_out", "notifications_disabled") or d.reason in d.blocked_by
    assert d.now == case.now
    assert d.allowed_now == (case.at == case.now)
    if d.at is not None:
        assert d.at >= case.now
        assert d.at.utcoffset() is not None


def test_reason_ok_has_no_blockers_and_blocked_names_all_rules_on_the_way() -> None:
    d = plan(UserSettings(), DEFAULTS, History(), T0)
    assert (d.reason, d.blocked_by, d.explanation) == ("ok", (), "allowed now")
    sends = (utc(2025, 6, 10, 22, 20), utc(2025, 6, 10, 22, 40))
    d = plan(
        UserSettings(),
        DEFAULTS,
        History(sends=sends, last_inbound_at=utc(2025, 6, 10, 22, 55)),
        utc(2025, 6, 10, 23),
    )
    assert d.blocked_by == ("hourly_limit", "quiet_hours")


# --- five medium messages queued at once ----------------------------------------------------------


def queue(n: int, now: datetime, priority: str = "medium", **kw: object) -> list[datetime]:
    """Plan n messages one after another, each plan becoming a reservation for the next."""
    user = UserSettings(**kw)  # type: ignore[arg-type]
    reservations: list[Reservation] = []
    for _ in range(n):
        d = plan(user, DEFAULTS, History(reservations=tuple(reservations)), now, priority)
        assert d.at is not None
        reservations.append(Reservation(d.at, priority))
    return [r.at for r in reservations]


def assert_spread(ats: list[datetime], cooldown: timedelta, hourly: int) -> None:
    for a, b in combinations(ats, 2):
        assert abs(a - b) >= cooldown, (a, b)
    for w in ats:  # the fullest half-open hour starts at one of the points
        assert sum(1 for a in ats if w <= a < w + H) <= hourly, w


def test_five_medium_messages_are_spread() -> None:
    ats = queue(5, T0)
    assert ats == [T0, T0 + 30 * S, T0 + H, T0 + H + 30 * S, T0 + 2 * H]
    assert_spread(ats, timedelta(seconds=30), 2)


def test_five_medium_messages_queued_at_07_00_local_are_spread_from_08_00() -> None:
    now = loc("Europe/Berlin", 2025, 6, 10, 7)
    ats = queue(5, now, timezone="Europe/Berlin")
    eight = loc("Europe/Berlin", 2025, 6, 10, 8)
    assert ats == [eight, eight + 30 * S, eight + H, eight + H + 30 * S, eight + 2 * H]
    assert_spread(ats, timedelta(seconds=30), 2)


def test_queue_beyond_the_daily_limit_moves_to_the_next_local_morning() -> None:
    ats = queue(12, loc("Asia/Kolkata", 2025, 6, 10, 8), timezone="Asia/Kolkata")
    days = [a.astimezone(ZoneInfo("Asia/Kolkata")).date() for a in ats]
    assert days.count(days[0]) == 10
    assert ats[10] == loc("Asia/Kolkata", 2025, 6, 11, 8)
    assert_spread(ats, timedelta(seconds=30), 2)


def test_queued_low_messages_stop_at_the_reserve() -> None:
    ats = queue(9, utc(2025, 6, 10, 8), "low")
    days = [a.date() for a in ats]
    assert days.count(days[0]) == 8
    assert ats[8] == utc(2025, 6, 11, 8)


# --- check_now ------------------------------------------------------------------------------------


def test_check_now_ignores_reservations() -> None:
    history = History(reservations=(Reservation(T0, "urgent"),))
    assert plan(UserSettings(), DEFAULTS, history, T0).reason == "cooldown"
    d = check_now(UserSettings(), DEFAULTS, history, T0)
    assert (d.at, d.reason, d.allowed_now) == (T0, "ok", True)


def test_check_now_keeps_sends_quiet_hours_and_the_low_reserve() -> None:
    d = check_now(UserSettings(), DEFAULTS, History(sends=(T0 - 10 * S,)), T0)
    assert (d.at, d.reason, d.allowed_now) == (T0 + 20 * S, "cooldown", False)
    d = check_now(UserSettings(), DEFAULTS, History(), utc(2025, 6, 10, 23))
    assert (d.at, d.reason) == (utc(2025, 6, 11, 8), "quiet_hours")
    sends = spaced(utc(2025, 6, 10, 5), 8)
    d = check_now(UserSettings(), DEFAULTS, History(sends=sends), T0, "low")
    assert (d.reason, d.allowed_now) == ("low_priority_reserve", False)
    d = check_now(UserSettings(opted_out=True), DEFAULTS, History(), T0)
    assert (d.at, d.reason, d.allowed_now) == (None, "opted_out", False)


# --- inputs ---------------------------------------------------------------------------------------


def test_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan(UserSettings(), DEFAULTS, History(), datetime(2025, 6, 10, 12))
    with pytest.raises(ValueError, match="timezone-aware"):
        check_now(UserSettings(), DEFAULTS, History(), datetime(2025, 6, 10, 12))


def test_now_in_any_zone_plans_the_same_instant() -> None:
    sends = (utc(2025, 3, 9, 6, 50), utc(2025, 3, 9, 6, 55))
    user = UserSettings(timezone="America/New_York", quiet_hours_end=time(3, 30))
    for tz in (UTC, NY, TOKYO):
        now = utc(2025, 3, 9, 6).astimezone(tz)
        for sends_tz in (UTC, NY):
            history = History(sends=tuple(s.astimezone(sends_tz) for s in sends))
            d = plan(user, DEFAULTS, history, now)
            assert (d.at, d.reason) == (utc(2025, 3, 9, 7, 50), "quiet_hours")


def test_user_settings_limits_merges_none_to_defaults() -> None:
    defaults = Limits(cooldown_seconds=45, low_daily_reserve=3)
    assert UserSettings().limits(defaults) == defaults
    merged = UserSettings(daily_limit=3, hourly_limit=1).limits(defaults)
    assert merged == Limits(cooldown_seconds=45, low_daily_reserve=3, daily_limit=3, hourly_limit=1)
    merged = UserSettings(quiet_hours_start=time(0)).limits(defaults)
    assert (merged.quiet_hours_start, merged.quiet_hours_end) == (time(0), time(8))
    merged = UserSettings(quiet_hours_end=time(7, 15)).limits(defaults)
    assert (merged.quiet_hours_start, merged.quiet_hours_end) == (time(22), time(7, 15))
    assert UserSettings(quiet_hours_enabled=False).limits(defaults).quiet_hours_enabled is False
    assert UserSettings().limits(NO_QUIET).quiet_hours_enabled is False


def test_limits_cap() -> None:
    assert Limits().cap("low", True) == 8
    assert Limits().cap("low", False) == 10
    assert Limits().cap("medium", True) == 10
    assert Limits(daily_limit=2).cap("low", True) == 1
    assert Limits(daily_limit=1, low_daily_reserve=0).cap("low", True) == 1


@pytest.mark.parametrize(
    ("local", "start", "end", "quiet"),
    [
        (time(22), time(22), time(8), True),
        (time(7, 59, 59), time(22), time(8), True),
        (time(8), time(22), time(8), False),
        (time(21, 59, 59), time(22), time(8), False),
        (time(0), time(0), time(6), True),
        (time(6), time(0), time(6), False),
        (time(23), time(0), time(6), False),
        (time(12), time(12), time(12), False),
        (time(0), time(12), time(12), False),
    ],
)
def test_in_quiet_hours(local: time, start: time, end: time, quiet: bool) -> None:
    assert in_quiet_hours(local, start, end) is quiet


@pytest.mark.parametrize(
    ("tz", "at", "day", "start", "end"),
    [
        ("Asia/Tokyo", utc(2025, 6, 10, 5), (2025, 6, 10), utc(2025, 6, 9, 15), utc(2025, 6, 10, 15)),
        ("Asia/Tokyo", utc(2025, 6, 10, 15), (2025, 6, 11), utc(2025, 6, 10, 15), utc(2025, 6, 11, 15)),
        ("America/New_York", utc(2025, 3, 9, 12), (2025, 3, 9), utc(2025, 3, 9, 5), utc(2025, 3, 10, 4)),
        ("America/New_York", utc(2025, 11, 2, 12), (2025, 11, 2), utc(2025, 11, 2, 4), utc(2025, 11, 3, 5)),
        (
            "Asia/Kolkata",
            utc(2025, 6, 10, 20),
            (2025, 6, 11),
            utc(2025, 6, 10, 18, 30),
            utc(2025, 6, 11, 18, 30),
        ),
    ],
)
def test_local_day_bounds(
    tz: str, at: datetime, day: tuple[int, int, int], start: datetime, end: datetime
) -> None:
    d, s, e = local_day_bounds(tz, at)
    assert (d.timetuple()[:3], s, e) == (day, start, end)


@pytest.mark.parametrize(
    ("tz", "at", "start", "end"),
    [
        # Tuesday noon UTC: Monday 2025-06-09 00:00 to Monday 2025-06-16 00:00
        ("UTC", T0, utc(2025, 6, 9), utc(2025, 6, 16)),
        ("UTC", utc(2025, 6, 15, 23, 59, 59), utc(2025, 6, 9), utc(2025, 6, 16)),
        ("UTC", utc(2025, 6, 16), utc(2025, 6, 16), utc(2025, 6, 23)),
        # the week holding 2025-03-09 (spring forward, a Sunday) is 167 hours long
        ("America/New_York", utc(2025, 3, 9, 12), utc(2025, 3, 3, 5), utc(2025, 3, 10, 4)),
        ("America/New_York", utc(2025, 3, 10, 3, 59, 59), utc(2025, 3, 3, 5), utc(2025, 3, 10, 4)),
        ("America/New_York", utc(2025, 3, 10, 4), utc(2025, 3, 10, 4), utc(2025, 3, 17, 4)),
        # the week holding 2025-11-02 (fall back) is 169 hours long
        ("America/New_York", utc(2025, 11, 2, 12), utc(2025, 10, 27, 4), utc(2025, 11, 3, 5)),
        # Kolkata is UTC+05:30: Sunday 23:30 IST is still last week, Monday 00:30 IST is this one
        ("Asia/Kolkata", utc(2025, 6, 15, 18), utc(2025, 6, 8, 18, 30), utc(2025, 6, 15, 18, 30)),
        ("Asia/Kolkata", utc(2025, 6, 15, 19), utc(2025, 6, 15, 18, 30), utc(2025, 6, 22, 18, 30)),
        # a year's first ISO week may begin in December
        ("Asia/Tokyo", utc(2025, 1, 1, 3), utc(2024, 12, 29, 15), utc(2025, 1, 5, 15)),
    ],
)
def test_local_week_bounds(tz: str, at: datetime, start: datetime, end: datetime) -> None:
    assert local_week_bounds(tz, at) == (start, end)
    assert local_week_bounds(tz, at.astimezone(TOKYO)) == (start, end)
    assert start.astimezone(ZoneInfo(tz)).isoweekday() == 1


def test_user_settings_limits_merges_the_weekly_limit() -> None:
    assert UserSettings().limits(Limits()).weekly_limit is None
    assert UserSettings().limits(Limits(weekly_limit=20)).weekly_limit == 20
    assert UserSettings(weekly_limit=5).limits(Limits()).weekly_limit == 5
    assert UserSettings(weekly_limit=5).limits(Limits(weekly_limit=20)).weekly_limit == 5
    defaults = Limits(cooldown_seconds=45)
    assert (
        UserSettings(notifications_enabled=False, preferred_days=frozenset({1})).limits(defaults) == defaults
    )


def test_every_rule_has_an_explanation_and_the_severity_order_is_the_documented_one() -> None:
    assert set(SEVERITY) <= set(REASONS)
    assert sorted(SEVERITY, key=SEVERITY.__getitem__) == [
        "sequence_span",
        "cooldown",
        "hourly_limit",
        "quiet_hours",
        "calling_hours",
        "state_calling_hours",
        "preferred_window",
        "low_priority_reserve",
        "state_topic_limit",
        "daily_limit",
        "weekly_limit",
    ]
    assert "notifications_disabled" in REASONS and "notifications_disabled" not in SEVERITY


def test_negative_span_is_rejected() -> None:
    with pytest.raises(ValueError, match="span"):
        plan(UserSettings(), DEFAULTS, History(), T0, span=-S)


def test_check_now_keeps_notifications_the_window_the_week_and_the_span() -> None:
    user = UserSettings(timezone="Europe/Berlin", **TUE_THU_EVENING)
    d = check_now(user, DEFAULTS, History(), loc("Europe/Berlin", 2025, 6, 9, 10))
    assert (d.at, d.reason) == (loc("Europe/Berlin", 2025, 6, 10, 18), "preferred_window")
    d = check_now(user, DEFAULTS, History(), loc("Europe/Berlin", 2025, 6, 9, 10), "high")
    assert d.allowed_now
    d = check_now(user, DEFAULTS, History(), loc("Europe/Berlin", 2025, 6, 10, 19, 59, 30), span=MIN)
    assert (d.at, d.reason) == (loc("Europe/Berlin", 2025, 6, 12, 18), "preferred_window")
    d = check_now(UserSettings(notifications_enabled=False), DEFAULTS, History(), T0)
    assert (d.at, d.reason, d.allowed_now) == (None, "notifications_disabled", False)
    assert check_now(UserSettings(notifications_enabled=False), DEFAULTS, History(), T0, "urgent").allowed_now
    weekly = UserSettings(weekly_limit=2)
    history = History(sends=spaced(utc(2025, 6, 9, 10), 1), reservations=(Reservation(T0 + H),))
    assert plan(weekly, DEFAULTS, history, T0).reason == "weekly_limit"
    assert check_now(weekly, DEFAULTS, history, T0).allowed_now  # reservations do not count when due


def test_five_medium_messages_queued_for_a_window_are_spread_inside_it() -> None:
    ats = queue(5, loc("Europe/Berlin", 2025, 6, 9, 10), timezone="Europe/Berlin", **TUE_THU_EVENING)
    six = loc("Europe/Berlin", 2025, 6, 10, 18)
    assert ats == [six, six + 30 * S, six + H, six + H + 30 * S, loc("Europe/Berlin", 2025, 6, 12, 18)]
    assert_spread(ats, timedelta(seconds=30), 2)
