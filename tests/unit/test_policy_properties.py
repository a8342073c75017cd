"""Hypothesis properties of the delivery policy, checked against the naive oracle in policy_oracle.

Every instant is a whole second, so "no earlier instant is allowed" can be checked exactly: every
second before the plan when it is close, otherwise every instant where some rule could change its
verdict (and the seconds either side) plus a few hundred random seconds.

The scenarios cover every rule: weekly limits (sends of the last 8 days), preferred windows (days,
hours, both, half-set, empty, wrapping midnight, in DST gaps, inside quiet hours), notifications
turned off, and multi-part sequences with a span of up to 5 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from random import Random
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.domain import PRIORITIES, History, Limits, Reservation, UserSettings
from shared.policy import SEVERITY, Decision, check_now, plan
from tests.unit.policy_oracle import (
    HOUR_S,
    LANE_RANK,
    Oracle,
    Rules,
    boundaries,
    epoch,
    from_epoch,
    offset_changes,
    quiet_at,
)

TIMEZONES = (
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",  # 30-minute DST
    "Pacific/Chatham",  # +12:45 / +13:45, transitions at 02:45 / 03:45
    "Asia/Kathmandu",  # +05:45
    "Europe/London",
    "America/Sao_Paulo",  # no DST since 2019
    "America/Los_Angeles",
    "Europe/Berlin",
    "America/St_Johns",  # -03:30 with DST
    "Asia/Tokyo",
)
LO = epoch(datetime(2024, 1, 1, tzinfo=UTC))
HI = epoch(datetime(2027, 1, 1, tzinfo=UTC))
TRANSITIONS = {tz: offset_changes(ZoneInfo(tz), LO, HI, step=86400) for tz in TIMEZONES}
BRUTE_FORCE_SPAN = 2 * HOUR_S
SAMPLES = 300

# Wall times that fall in or next to DST gaps and folds of the zones above.
DST_WALL_TIMES = [time(h, m) for h, m in ((0, 0), (1, 0), (1, 30), (2, 0), (2, 10), (2, 30), (2, 45), (3, 0))]
DST_WALL_TIMES += [time(3, 15), time(3, 45), time(4, 0)]

wall_times = st.one_of(
    st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45])),
    st.builds(time, st.integers(0, 23), st.integers(0, 59)),
    st.sampled_from(DST_WALL_TIMES),
)


def _transition_wall_times(tz: str) -> list[time]:
    """Wall times at the edges and inside the gaps and folds of this zone's transitions."""
    z = ZoneInfo(tz)
    out: set[time] = set()
    for b in TRANSITIONS[tz]:
        before = (from_epoch(b - 1).astimezone(z) + timedelta(seconds=1)).time()  # gap/fold start
        after = from_epoch(b).astimezone(z).time()
        lo, hi = sorted((before, after), key=lambda t: (t.hour, t.minute))
        mid = (
            datetime.combine(date.min, lo)
            + (datetime.combine(date.min, hi) - datetime.combine(date.min, lo)) / 2
        ).time()
        step = (datetime.combine(date.min, lo) + timedelta(minutes=1)).time()
        out.update(t.replace(fold=0) for t in (lo, hi, mid, step))
    return sorted(out)


ZONE_WALL_TIMES = {tz: _transition_wall_times(tz) for tz in TIMEZONES}


def wall_times_for(tz: str) -> st.SearchStrategy[time]:
    """Any wall time, often one in or at the edge of a DST gap or fold of `tz`."""
    if not ZONE_WALL_TIMES[tz]:
        return wall_times
    return st.one_of(wall_times, wall_times, st.sampled_from(ZONE_WALL_TIMES[tz]))


@dataclass(frozen=True)
class Scenario:
    user: UserSettings
    limits: Limits
    now: datetime
    sends: tuple[datetime, ...]
    reservations: tuple[Reservation, ...]
    last_in: datetime | None
    priority: str
    can_delay: bool
    span: int = 0  # seconds from the first part of the message to the last

    @property
    def delta(self) -> timedelta:
        return timedelta(seconds=self.span)

    @property
    def history(self) -> History:
        return History(sends=self.sends, reservations=self.reservations, last_inbound_at=self.last_in)

    @property
    def rules(self) -> Rules:
        return Rules.of(self.user, self.limits)

    def oracle(self, with_reservations: bool = True) -> Oracle:
        res = self.reservations if with_reservations else ()
        return Oracle(self.rules, self.sends, res, self.last_in, self.priority, self.can_delay, self.span)


@st.composite
def quiet_windows(draw: st.DrawFn, tz: str) -> tuple[time, time]:
    """(start, end): sometimes empty (start == end), often wrapping midnight, often ending in DST."""
    start = draw(wall_times_for(tz))
    mode = draw(st.integers(0, 9))
    if mode == 0:
        return start, start
    if mode <= 3:
        return start, draw(wall_times_for(tz))
    length = timedelta(minutes=draw(st.integers(1, 24 * 60 - 1)))
    return start, (datetime.combine(date.min, start) + length).time()


DAY_SETS = [frozenset(), frozenset({0, 8}), frozenset(range(1, 6)), frozenset({6, 7}), frozenset(range(1, 8))]


@st.composite
def preferred_windows(draw: st.DrawFn, tz: str) -> dict[str, Any]:
    """The user's preferred window: often none, else days and/or hours, sometimes degenerate."""
    if draw(st.integers(0, 4)) == 0:
        return {}
    days = draw(st.none() | st.frozensets(st.integers(1, 7), min_size=1) | st.sampled_from(DAY_SETS))
    start, end = draw(quiet_windows(tz))
    start_or_none, end_or_none = draw(
        st.sampled_from([(start, end)] * 4 + [(None, None), (start, None), (None, end)])
    )
    return {"preferred_days": days, "preferred_start": start_or_none, "preferred_end": end_or_none}


@st.composite
def users(draw: st.DrawFn) -> UserSettings:
    tz = draw(st.sampled_from(TIMEZONES))
    start, end = draw(quiet_windows(tz))
    if draw(st.booleans()):  # the global default, or only one end overridden
        start, end = draw(st.sampled_from([(None, None), (start, None), (None, end)]))
    return UserSettings(
        **draw(preferred_windows(tz)),
        notifications_enabled=draw(st.integers(0, 9)) > 0,
        weekly_limit=draw(st.none() | st.none() | st.integers(1, 12)),
        timezone=tz,
        quiet_hours_start=start,
        quiet_hours_end=end,
        quiet_hours_enabled=draw(st.integers(0, 19)) > 0,
        daily_limit=draw(st.none() | st.integers(1, 12) | st.integers(6, 12)),
        hourly_limit=draw(st.none() | st.integers(1, 4)),
    )


@st.composite
def limits(draw: st.DrawFn, tz: str) -> Limits:
    start, end = draw(quiet_windows(tz))
    return Limits(
        cooldown_seconds=draw(st.sampled_from([0, 1, 30, 30, 45, 300])),
        hourly_limit=draw(st.integers(1, 4)),
        daily_limit=draw(st.integers(1, 12) | st.integers(6, 12)),
        quiet_hours_start=start,
        quiet_hours_end=end,
        quiet_hours_enabled=draw(st.integers(0, 19)) > 0,
        active_window_seconds=draw(st.sampled_from([0, 600, 600, 1800])),
        low_daily_reserve=draw(st.integers(0, 4)),
        weekly_limit=draw(st.none() | st.integers(2, 20)),
    )


@st.composite
def instants(draw: st.DrawFn, tz: str) -> datetime:
    """A whole-second instant in 2024-2026, half the time within 36 h of a DST transition."""
    transitions = TRANSITIONS[tz]
    if transitions and draw(st.booleans()):
        e = draw(st.sampled_from(transitions)) + draw(st.integers(-36 * HOUR_S, 36 * HOUR_S))
    else:
        e = draw(st.integers(LO, HI))
    return from_epoch(e)


def offsets(max_s: int) -> st.SearchStrategy[int]:
    """Seconds, biased to the small spans where cooldown and the hourly limit bite."""
    return st.one_of(st.integers(0, 120), st.integers(0, HOUR_S), st.integers(0, max_s))


# A sequence's span: mostly a single SMS, else up to 5 minutes (often the cooldown's 30 s).
spans = st.one_of(st.just(0), st.just(0), st.integers(1, 300), st.sampled_from([30, 60, 120]))


@st.composite
def scenarios(draw: st.DrawFn, max_sends: int = 10, max_reservations: int = 8) -> Scenario:
    user = draw(users())
    lims = draw(limits(user.timezone))
    now = draw(instants(user.timezone))
    span = draw(spans)
    if draw(st.integers(0, 2)) == 0:  # just before a wall time where a rule changes, on that day
        rules = Rules.of(user, lims)
        edges = [time(0), time(0), rules.quiet_start, rules.quiet_end, rules.pref_start, rules.pref_end]
        z = ZoneInfo(user.timezone)
        wall = draw(st.sampled_from([t for t in edges if t is not None]))
        at = datetime.combine(now.astimezone(z).date(), wall, tzinfo=z)
        now = from_epoch(epoch(at) - draw(st.integers(0, 600) | st.integers(0, span + 1)))
    sends = draw(st.lists(offsets(30 * HOUR_S) | st.integers(0, 8 * 24 * HOUR_S), max_size=max_sends))
    res = draw(
        st.lists(
            st.tuples(st.integers(-600, 0) | offsets(36 * HOUR_S), st.sampled_from(PRIORITIES)),
            max_size=max_reservations,
        )
    )
    last_in = draw(st.none() | st.none() | offsets(3 * HOUR_S))
    # The policy must not care which zone an aware datetime is expressed in.
    shown_in = ZoneInfo(draw(st.sampled_from(["UTC", user.timezone, "America/New_York"])))
    now = now.astimezone(shown_in)
    return Scenario(
        user=user,
        limits=lims,
        now=now,
        sends=tuple(sorted(from_epoch(epoch(now) - s).astimezone(shown_in) for s in sends)),
        reservations=tuple(Reservation(from_epoch(epoch(now) + o).astimezone(shown_in), p) for o, p in res),
        last_in=None if last_in is None else from_epoch(epoch(now) - last_in).astimezone(shown_in),
        # medium and low more often: they are the lanes the preferred window applies to
        priority=draw(st.sampled_from((*PRIORITIES, "medium", "low"))),
        can_delay=draw(st.integers(0, 3)) > 0,
        span=span,
    )


def iso(e: int, tz: ZoneInfo) -> str:
    return from_epoch(e).astimezone(tz).isoformat()


def no_slot(d: Decision, rules: Rules, priority: str, span: int) -> bool:
    """The plan found no slot: only allowed when quiet hours leave no room for the sequence."""
    if d.at is not None:
        return False
    assert d.reason == "no_slot", d
    assert rules.sequence_never_fits(priority, span), d
    event("no slot: the sequence never fits outside quiet hours")
    return True


def assert_reason(d: Decision, oracle: Oracle, now: int) -> None:
    """blocked_by starts with the first rule broken at `now` and holds one still broken a second
    before the planned instant; reason is the weightiest of them, or "ok" when it is `now`."""
    violated = oracle.violations(now)
    assert (d.blocked_by[0] if d.blocked_by else "ok") == (violated[0] if violated else "ok"), violated
    if d.at is None or epoch(d.at) == now:
        assert d.reason == "ok" and not violated and not d.blocked_by
        return
    just_before = oracle.violations(epoch(d.at) - 1)
    assert set(d.blocked_by) & set(just_before), (d.blocked_by, just_before)
    assert d.reason == max(d.blocked_by, key=SEVERITY.__getitem__)


# --- (1) + (2): the plan is allowed, and it is the earliest allowed instant -----------------------


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.randoms(use_true_random=False))
def test_plan_is_the_earliest_allowed_instant(sc: Scenario, rnd: Random) -> None:
    d = plan(sc.user, sc.limits, sc.history, sc.now, sc.priority, sc.can_delay, span=sc.delta)
    if sc.rules.refused(sc.priority):
        assert (d.at, d.reason, d.blocked_by) == (None, "notifications_disabled", ())
        return
    oracle = sc.oracle()
    now = epoch(sc.now)
    event(f"preferred window: {'yes' if oracle.windowed else 'no'}")
    event(f"sequence: {'yes' if sc.span else 'no'}")
    if no_slot(d, sc.rules, sc.priority, sc.span):
        return
    assert d.at.microsecond == 0
    at = epoch(d.at)
    tz = oracle.tz
    assert at >= now
    assert oracle.allowed(at), f"planned {iso(at, tz)} breaks {oracle.violations(at)}"
    assert_reason(d, oracle, now)
    assert d.allowed_now == (at == now)
    event(f"reason: {d.reason}")
    for rule in d.blocked_by:
        event(f"met: {rule}")
    if any(now <= b <= at for b in TRANSITIONS[sc.user.timezone]):
        event("plan crosses a DST transition")
    event(f"planned: {'now' if at == now else 'within 2 h' if at - now <= BRUTE_FORCE_SPAN else 'later'}")

    if at - now <= BRUTE_FORCE_SPAN:
        earlier = set(range(now, at))
    else:
        earlier = boundaries(oracle, now, at) | {now, at - 1}
        earlier |= {rnd.randrange(now, at) for _ in range(SAMPLES)}
    allowed = sorted(e for e in earlier if oracle.allowed(e))
    assert not allowed, f"planned {iso(at, tz)} but {iso(allowed[0], tz)} is allowed"


# --- (3): the delivery-time check agrees with the oracle, reservations ignored --------------------


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_check_now_agrees_with_the_oracle_without_reservations(sc: Scenario) -> None:
    d = check_now(sc.user, sc.limits, sc.history, sc.now, sc.priority, sc.can_delay, span=sc.delta)
    if sc.rules.refused(sc.priority):
        assert (d.at, d.reason, d.allowed_now) == (None, "notifications_disabled", False)
        return
    oracle = sc.oracle(with_reservations=False)
    now = epoch(sc.now)
    assert d.allowed_now == oracle.allowed(now), oracle.violations(now)
    if no_slot(d, sc.rules, sc.priority, sc.span):
        return
    assert_reason(d, oracle, now)
    assert d.at is not None
    assert oracle.allowed(epoch(d.at))


# --- (4): simulated deliveries never break a limit ------------------------------------------------


@dataclass(frozen=True)
class Planned:
    at: int
    priority: str
    can_delay: bool
    last_in: int | None
    span: int = 0


def assert_schedule_keeps_the_rules(rules: Rules, initial: list[int], new: list[Planned]) -> None:
    """Each new message, against all others: cooldown, every hour holding it, its local day and
    week, quiet hours; a low message was at most the day's cap-th when it was planned (planning
    order); and its sequence keeps to one day, out of quiet hours and inside the preferred window."""
    tz = ZoneInfo(rules.tz)

    def day(e: int) -> date:
        return from_epoch(e).astimezone(tz).date()

    def week(e: int) -> tuple[int, int]:
        year, number, _ = day(e).isocalendar()
        return year, number

    everything = initial + [m.at for m in new]
    for k, m in enumerate(new):
        s = m.at
        others = everything[: len(initial) + k] + everything[len(initial) + k + 1 :]
        label = f"message {k} ({m.priority}) at {iso(s, tz)}"
        assert all(abs(s - p) >= rules.cooldown for p in others), f"{label}: cooldown"
        for w in [p for p in everything if s - HOUR_S < p <= s]:
            inside = sum(1 for p in everything if w <= p < w + HOUR_S)
            assert inside <= rules.hourly, f"{label}: {inside} in the hour from {iso(w, tz)}"
        same_day = sum(1 for p in everything if day(p) == day(s))
        assert same_day <= rules.daily, f"{label}: {same_day} on its local day"
        before = sum(1 for p in everything[: len(initial) + k] if day(p) == day(s))
        assert before < rules.day_cap(m.priority, m.can_delay), f"{label}: {before} before it"
        if rules.weekly is not None:
            same_week = sum(1 for p in everything if week(p) == week(s))
            assert same_week <= rules.weekly, f"{label}: {same_week} in its local week"
            before = sum(1 for p in everything[: len(initial) + k] if week(p) == week(s))
            assert before < rules.weekly, f"{label}: {before} in its week before it"
        active = m.last_in is not None and m.last_in <= s < m.last_in + rules.active
        if m.priority != "urgent" and rules.quiet_on:
            wall = from_epoch(s).astimezone(tz).time()
            assert active or not quiet_at(wall, rules.quiet_start, rules.quiet_end), f"{label}: quiet"
        end = s + m.span
        assert day(end) == day(s), f"{label}: its sequence ends on another day"
        if m.priority != "urgent" and rules.quiet_on:
            wall = from_epoch(end).astimezone(tz).time()
            assert active or not quiet_at(wall, rules.quiet_start, rules.quiet_end), f"{label}: ends quiet"
        # The time-of-day rules as the oracle states them (no points: no budget can fire).
        last_in = None if m.last_in is None else from_epoch(m.last_in)
        alone = Oracle(rules, (), (), last_in, m.priority, m.can_delay, m.span)
        assert not alone.violations(s), f"{label}: {alone.violations(s)}"


messages = st.lists(
    st.tuples(
        st.sampled_from(PRIORITIES),
        st.booleans(),  # can_delay
        st.one_of(st.just(0), st.integers(0, 120), st.integers(0, 3 * HOUR_S)),  # created later by
        st.integers(0, 5),  # 0: the user wrote to us just before this message
        spans,
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=120, deadline=None)
@given(scenarios(max_reservations=0), messages)
def test_sending_at_each_planned_instant_never_breaks_a_limit(
    sc: Scenario, msgs: list[tuple[str, bool, int, int, int]]
) -> None:
    sends = list(sc.sends)
    now = sc.now
    last_in = sc.last_in
    new: list[Planned] = []
    for priority, can_delay, later, wrote, span in msgs:
        now = from_epoch(epoch(now) + later)
        if wrote == 0:
            last_in = now
        history = History(sends=tuple(sends), last_inbound_at=last_in)
        d = plan(sc.user, sc.limits, history, now, priority, can_delay, span=timedelta(seconds=span))
        if sc.rules.refused(priority):
            assert (d.at, d.reason) == (None, "notifications_disabled")
            continue
        if no_slot(d, sc.rules, priority, span):
            continue
        assert d.at is not None and d.at >= now
        sends.append(d.at)
        last = None if last_in is None else epoch(last_in)
        new.append(Planned(epoch(d.at), priority, can_delay, last, span))
        now = d.at  # it goes out at the planned instant; the clock moves there
    assert_schedule_keeps_the_rules(sc.rules, [epoch(s) for s in sc.sends], new)


@settings(max_examples=120, deadline=None)
@given(
    scenarios(max_reservations=0),
    st.lists(st.tuples(st.sampled_from(PRIORITIES), spans), min_size=1, max_size=8),
)
def test_a_queue_planned_most_important_first_never_breaks_a_limit(
    sc: Scenario, queued: list[tuple[str, int]]
) -> None:
    """Messages queued at once, each plan a reservation for the next: a lane sees the lanes at least
    as important as itself, so planned in that order the whole queue keeps every rule."""
    queued = sorted(queued, key=lambda q: LANE_RANK[q[0]])
    reservations: list[Reservation] = []
    new: list[Planned] = []
    last_in = None if sc.last_in is None else epoch(sc.last_in)
    for lane, span in queued:
        history = History(sends=sc.sends, reservations=tuple(reservations), last_inbound_at=sc.last_in)
        d = plan(sc.user, sc.limits, history, sc.now, lane, span=timedelta(seconds=span))
        if sc.rules.refused(lane):
            assert (d.at, d.reason) == (None, "notifications_disabled")
            continue
        if no_slot(d, sc.rules, lane, span):
            continue
        assert d.at is not None and d.at >= sc.now
        reservations.append(Reservation(d.at, lane))
        new.append(Planned(epoch(d.at), lane, True, last_in, span))
    assert_schedule_keeps_the_rules(sc.rules, [epoch(s) for s in sc.sends], new)
