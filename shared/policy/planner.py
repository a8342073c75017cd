"""The planner: the earliest instant at or after `now` that every rule allows (`plan`, `check_now`).

It works by repeatedly jumping to a lower bound: each violated rule names the earliest instant at
which it could stop being violated, and no instant skipped over can satisfy that rule, so the fixed
point is the earliest instant satisfying all of them. This is the hot path of every schedule and
delivery (bench/policy.py measures it).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from shared.domain import RANK, History, Limits, UserSettings
from shared.policy.decision import (
    COOLDOWN,
    DAILY_LIMIT,
    HOURLY_LIMIT,
    LOW_PRIORITY_RESERVE,
    NO_SLOT,
    NOTIFICATIONS_DISABLED,
    OK,
    OPTED_OUT,
    PREFERRED_WINDOW,
    QUIET_HOURS,
    SEQUENCE_SPAN,
    SEVERITY,
    STATE_TOPIC_LIMIT,
    UNDELIVERABLE,
    WEEKLY_LIMIT,
    Decision,
)
from shared.policy.local_time import (
    DAY,
    HOUR,
    SECOND,
    day_bounds,
    in_quiet_hours,
    local_instant,
    offset_change,
    week_bounds,
    zone,
)
from shared.policy.window import Window

_NO_SPAN = timedelta(0)
_MAX_STEPS = 100_000
_HORIZON = timedelta(days=400)

Violation = tuple[str, datetime]  # the rule broken and the earliest instant it could allow


class _Planner:
    """One decision's rules, read once from the user, their limits and history; `violation(t)` says
    what `t` breaks."""

    __slots__ = (
        "active_until",
        "calling_hours",
        "can_delay",
        "cap",
        "full_cap",
        "last_in",
        "lim",
        "points",
        "priority",
        "quiet",
        "quiet_zones",
        "span",
        "topic_cap",
        "topic_points",
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
        urgent_skips_quiet: bool = True,
    ) -> None:
        self.lim = lim = user.limits(defaults)
        self._place(user, history, can_delay)
        self.priority = priority
        self.can_delay = can_delay
        self.span = span
        # Everything in UTC: on datetimes sharing a ZoneInfo, `t - HOUR` and `<` are wall-clock.
        last_in = history.last_inbound_at
        self.last_in = last_in = last_in and last_in.astimezone(UTC)
        self.active_until = last_in and last_in + lim.active_window
        self.points = _points(history, priority, can_delay)
        self.cap = lim.cap(priority, can_delay)
        self.full_cap = lim.daily_limit
        self.quiet = not (priority == "urgent" and urgent_skips_quiet) and lim.quiet_hours_enabled
        # The window is "optimal timing": only for the lanes that may wait for it, and only when
        # the message may be delayed at all (canDelay false means the earliest hard-allowed time).
        self.window = (
            Window.of(user, lim, self.quiet, span) if can_delay and priority in ("medium", "low") else None
        )

    def _place(self, user: UserSettings, history: History, can_delay: bool) -> None:
        """Where the user is and the law there (shared.compliance): the user's day (budgets, window)
        is in their first zone; quiet and calling hours hold in every zone they may be in; a state's
        per-topic limit counts the topic's sends (and, if the message may wait, its queued ones)."""
        zones = [zone(z) for z in user.zones] or [zone(user.timezone)]
        self.tz = zones[0]
        self.quiet_zones = zones
        self.calling_hours = [(h, [zone(z) for z in h.zones] or zones) for h in user.calling_hours]
        self.topic_cap = user.topic_limit
        queued = history.topic_reservations if can_delay else ()
        self.topic_points = sorted(p.astimezone(UTC) for p in (*history.topic_sends, *queued))

    def violation(self, t: datetime) -> Violation | None:
        """The first rule `t` breaks and the earliest instant that rule could allow, or None."""
        local = t.astimezone(self.tz)
        quiet = self.quiet and not self._active(t)
        hit = self._time_of_day(t, local, quiet)
        if hit is not None:
            return hit
        local_day = local.date()
        if self.span:
            hit = self._sequence_end(t, local_day, quiet)
            if hit is not None:
                return hit
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
        if self.topic_cap is not None:
            bound = _rolling(self.topic_points, t, DAY, self.topic_cap)
            if bound is not None:
                return STATE_TOPIC_LIMIT, bound
        return None

    def _time_of_day(self, t: datetime, local: datetime, quiet: bool) -> Violation | None:
        """The legal calling hours (always), quiet hours (if `quiet`: they apply and the user is not
        active), then the window, at `t` (`local` in the user's zone)."""
        for hours, zones in self.calling_hours:
            for tz in zones:
                bound = _outside(t, t.astimezone(tz), hours.start, hours.end, tz)
                if bound is not None:
                    return hours.reason, bound
        if quiet:
            for tz in self.quiet_zones:
                bound = self._quiet(t, local if tz is self.tz else t.astimezone(tz), tz)
                if bound is not None:
                    return QUIET_HOURS, bound
        window = self.window
        if window is not None and not window.holds(local):
            return PREFERRED_WINDOW, self._opening(t, local)
        return None

    def _sequence_end(self, t: datetime, local_day: date, quiet: bool) -> Violation | None:
        """The sequence ends at t + span: on t's local day, outside quiet hours, in the window.

        Each bound is the earliest t' at which the end could get clear of what it hit.
        """
        span = self.span
        end = t + span
        local_end = end.astimezone(self.tz)
        if local_end.date() != local_day:
            next_day = day_bounds(local_day, self.tz)[1]
            return SEQUENCE_SPAN, next_day if next_day > t else t + SECOND
        hit = self._time_of_day(end, local_end, quiet)
        return None if hit is None else (hit[0], hit[1] - span)

    def _active(self, t: datetime) -> bool:
        last_in, until = self.last_in, self.active_until
        return last_in is not None and until is not None and last_in <= t < until

    def _quiet(self, t: datetime, local: datetime, tz: ZoneInfo) -> datetime | None:
        """If `t` (`local` in zone `tz`) is in quiet hours (by the wall clock alone), the first
        instant they could end."""
        lim = self.lim
        return _closed_until(t, local, lim.quiet_hours_start, lim.quiet_hours_end, tz)

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
        while a < at:  # offset_change looks at most a day ahead
            b = min(at, a + DAY)
            change = offset_change(a, b, self.tz)
            if change is not None:
                return change
            a = b
        return at

    def _weekly(self, t: datetime, local_day: date) -> datetime | None:
        cap = self.lim.weekly_limit
        if cap is None:
            return None
        start, end = week_bounds(local_day - local_day.weekday() * DAY, self.tz)
        pts = self.points
        if bisect_left(pts, end) - bisect_left(pts, start) < cap:
            return None
        return end if end > t else t + SECOND

    def _daily(self, t: datetime, local_day: date) -> Violation | None:
        start, end = day_bounds(local_day, self.tz)
        pts = self.points
        n = bisect_left(pts, end) - bisect_left(pts, start)
        if n < self.cap:
            return None
        reason = DAILY_LIMIT if n >= self.full_cap else LOW_PRIORITY_RESERVE
        return reason, end if end > t else t + SECOND

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
        return _rolling(self.points, t, HOUR, self.lim.hourly_limit)


def _rolling(pts: list[datetime], t: datetime, window: timedelta, n: int) -> datetime | None:
    """If some rolling `window` holding `t` would hold `n` of the sorted `pts` besides it, the
    earliest instant that could be clear of them."""
    lo = bisect_right(pts, t - window)
    hi = bisect_left(pts, t + window)
    if hi - lo < n:
        return None
    best: datetime | None = None
    # A window holding t and points q[i..j] exists iff max(t, q[j]) - min(t, q[i]) < window.
    for i in range(lo, hi):
        first = pts[i]
        j = i + n - 1
        if j >= hi:
            break
        if max(pts[j], t) - min(first, t) < window:
            bound = first + window
            if best is None or bound > best:
                best = bound
    return best


def _closed_until(t: datetime, local: datetime, start: time, end: time, tz: ZoneInfo) -> datetime | None:
    """If `local` (`t` in `tz`) is in the closed stretch [start, end) of the wall clock (wrapping
    midnight when start > end), the first instant it could end."""
    if not in_quiet_hours(local.time(), start, end):
        return None
    d = local.date()
    if start > end and local.time() >= start:
        d += DAY
    bound = local_instant(d, end, tz)
    if bound <= t:
        return t + SECOND
    # A fall-back before `end` can set the wall clock back to before `start`: stop there.
    return offset_change(t, bound, tz) or bound


def _outside(t: datetime, local: datetime, start: time, end: time, tz: ZoneInfo) -> datetime | None:
    """If `local` is outside the open hours [start, end), the first instant they could open."""
    return _closed_until(t, local, end, start, tz)


def _points(history: History, priority: str, can_delay: bool) -> list[datetime]:
    """The instants that count against the budgets, in UTC and sorted: the sends made and, when the
    message may wait, the queued reservations of its own lane or a more important one."""
    # Times read from the database are UTC already: used as they are, not converted again.
    pts = [p if p.tzinfo is UTC else p.astimezone(UTC) for p in history.sends]
    if can_delay and history.reservations:
        rank = RANK[priority]
        for r in history.reservations:
            if RANK.get(r.priority, 2) <= rank:
                at = r.at
                pts.append(at if at.tzinfo is UTC else at.astimezone(UTC))
    pts.sort()
    return pts


def plan(
    user: UserSettings,
    defaults: Limits,
    history: History,
    now: datetime,
    priority: str = "medium",
    can_delay: bool = True,
    *,
    span: timedelta = _NO_SPAN,
    urgent_skips_quiet: bool = True,
) -> Decision:
    """The earliest instant at or after `now` when this message may go out, and why not sooner.

    `span`: the message is a sequence whose last part goes out `span` after the first.
    `urgent_skips_quiet`: an urgent message may go out in quiet hours (its agent is allowed to);
    nothing goes out outside the user's calling hours (UserSettings.calling_hours).
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
    planner = _Planner(user, defaults, history, priority, can_delay, span, urgent_skips_quiet)
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
        t = bound if bound > t else t + SECOND
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
    urgent_skips_quiet: bool = True,
) -> Decision:
    """The delivery-time check: hard limits against sends already made, at `now`.

    Reservations of other queued messages do not hold back a message that is due; they were
    spread at planning time. If not allowed now, the answer carries the next allowed instant.
    The preferred window and the sequence span are checked here too (the window applies to the
    same lanes as in `plan`).
    """
    due = History(
        sends=history.sends,
        reservations=(),
        last_inbound_at=history.last_inbound_at,
        topic_sends=history.topic_sends,
    )
    return plan(
        user, defaults, due, now, priority, can_delay, span=span, urgent_skips_quiet=urgent_skips_quiet
    )
