"""Policy decisions per second: shared.policy.plan and check_now on a realistic mix of users."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bench.run import Figure
from shared import domain, policy
from shared.domain import History, Limits, Reservation, UserSettings
from shared.policy import Decision

TIMEZONES = (
    "UTC",
    "America/New_York",
    "America/Chicago",
    "America/Los_Angeles",
    "Europe/London",
    "Europe/Berlin",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Australia/Sydney",
)
NOW = datetime(2025, 6, 2, 15, 0, tzinfo=UTC)
CASES = 2_000
SECONDS = 2.0
ABOUT = (
    f"`shared.policy.plan` and `check_now` on {CASES:,} cases: users in several timezones, 0-10 sends "
    "in the last day, a few reservations, mixed lanes; each for "
    f"{SECONDS:.0f} s after a warm-up."
)

Case = tuple[UserSettings, History, datetime, str, bool]
Decide = Callable[[UserSettings, Limits, History, datetime, str, bool], Decision]


def cases(n: int = CASES, seed: int = 7) -> list[Case]:
    """Users in several timezones, 0-10 sends in the last day, a few reservations, mixed lanes."""
    rnd = random.Random(seed)
    out: list[Case] = []
    for i in range(n):
        now = NOW + timedelta(minutes=rnd.randrange(0, 24 * 60))
        user = UserSettings(
            timezone=rnd.choice(TIMEZONES),
            daily_limit=rnd.choice((None, None, None, 5, 20)),
            quiet_hours_enabled=rnd.random() > 0.1,
        )
        sends = sorted(now - timedelta(seconds=rnd.randrange(30, 86_400)) for _ in range(rnd.randint(0, 10)))
        reservations = [
            Reservation(now + timedelta(minutes=rnd.randrange(0, 600)), rnd.choice(domain.PRIORITIES))
            for _ in range(rnd.choice((0, 0, 0, 1, 2, 3)))
        ]
        inbound = now - timedelta(minutes=rnd.randrange(0, 120)) if rnd.random() < 0.2 else None
        history = History(sends=sends, reservations=reservations, last_inbound_at=inbound)
        priority = rnd.choice(("urgent", "high", "medium", "medium", "low", "low"))
        out.append((user, history, now, priority, rnd.random() > 0.1 or i == 0))
    return out


def _rate(call: Decide, mix: list[Case], limits: Limits) -> float:
    for user, history, now, priority, can_delay in mix[:200]:  # warm the zone and lru caches
        call(user, limits, history, now, priority, can_delay)
    done = 0
    started = time.perf_counter()
    deadline = started + SECONDS
    while time.perf_counter() < deadline:
        for user, history, now, priority, can_delay in mix:
            call(user, limits, history, now, priority, can_delay)
        done += len(mix)
    return done / (time.perf_counter() - started)


def run() -> list[Figure]:
    mix = cases()
    limits = Limits()
    return [
        Figure("policy.plan decisions/s", _rate(policy.plan, mix, limits), "/s", 50_000),
        Figure("policy.check_now decisions/s", _rate(policy.check_now, mix, limits), "/s", 50_000),
    ]
