"""The rules the use cases apply around the planner, each a pure function (`now` comes in):
which reasons mean never, when a task woke too early, when a delivery yields to a more important
message, what a refused claim means, how long a failed render waits, how far a re-plan moves, the
user's local date, and when the sweep counts as stale."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from shared.domain import RANK, Limits, Reservation
from shared.policy.decision import IN_FLIGHT, NOTIFICATIONS_DISABLED, OPTED_OUT, REASONS, UNDELIVERABLE
from shared.policy.local_time import zone

# Reasons a message will never go out: a delivery fails it with the reason.
NEVER = frozenset({OPTED_OUT, UNDELIVERABLE, NOTIFICATIONS_DISABLED})

# Cloud Tasks may fire a moment before schedule_time; earlier than this counts as an early wake-up.
EARLY_TOLERANCE = timedelta(seconds=1)
# A re-plan or a wait is never for now, which would spin.
MIN_DEFERRAL = timedelta(seconds=1)
# A decision that found no allowed time still comes back within the hour to look again.
REPLAN_FALLBACK = timedelta(hours=1)
# The queue's own retry would come back in seconds; a model outage usually lasts longer.
RENDER_BACKOFF_FIRST_SECONDS = 30
RENDER_BACKOFF_MAX_SECONDS = 15 * 60


def never_sends(reason: str) -> bool:
    return reason in NEVER


def woken_early(now: datetime, scheduled_for: datetime) -> bool:
    """A task fired before the message's planned time (or an old task of the same generation)."""
    return now < scheduled_for - EARLY_TOLERANCE


def yields_to(priority: str, reservations: Iterable[Reservation], now: datetime) -> bool:
    """Whether a more important message to the same user is due too: it takes this slot, whichever
    task Cloud Tasks happened to fire first."""
    rank = RANK[priority]
    return any(r.at <= now and RANK.get(r.priority, rank) < rank for r in reservations)


def yield_until(now: datetime, limits: Limits) -> datetime:
    """A yielding message follows the more important one after the cooldown."""
    return now + max(limits.cooldown, MIN_DEFERRAL)


def replan_at(allowed_at: datetime | None, reason: str, now: datetime, limits: Limits) -> datetime:
    """When a message not allowed now is tried again: the next allowed time, never now; a message
    in flight to the user holds them for a cooldown."""
    at = allowed_at or now + REPLAN_FALLBACK
    floor = now + (limits.cooldown if reason == IN_FLIGHT else MIN_DEFERRAL)
    return max(at, floor)


def render_backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed render: 30 s, doubling, at most 15 minutes."""
    seconds = RENDER_BACKOFF_FIRST_SECONDS * 2 ** max(attempts - 1, 0)  # an int: no overflow
    return timedelta(seconds=min(seconds, RENDER_BACKOFF_MAX_SECONDS))


# What the database's refusal of a claim means for the message.
SKIP = "skip"  # nothing to do: the row moved on (gone, no longer queued, a newer task)
FAIL = "fail"  # never: failed with the reason
EXPIRE = "expire"  # past its expiresAt
WAIT = "wait"  # the whole account is at a cap: wait for the instant the database computed
REPLAN = "replan"  # another delivery to the user won: plan again from what the database holds

CLAIM_REFUSALS: dict[str, str] = {
    "not_found": SKIP,
    "not_queued": SKIP,
    "stale_task": SKIP,
    OPTED_OUT: FAIL,
    NOTIFICATIONS_DISABLED: FAIL,
    "expired": EXPIRE,
}
# The error recorded on a message failed by a refused claim.
REFUSAL_ERRORS: dict[str, str] = {
    OPTED_OUT: "the user opted out",
    NOTIFICATIONS_DISABLED: REASONS[NOTIFICATIONS_DISABLED],
}


def after_refused_claim(reason: str, retry_at: datetime | None) -> str:
    """SKIP, FAIL, EXPIRE, WAIT or REPLAN for a claim the database refused with `reason`."""
    action = CLAIM_REFUSALS.get(reason)
    if action is not None:
        return action
    if reason.startswith("account_") and retry_at is not None:
        return WAIT
    return REPLAN


def account_retry_at(retry_at: datetime, now: datetime) -> datetime:
    return max(retry_at, now + MIN_DEFERRAL)


def local_date(timezone_name: str, at: datetime) -> str:
    """The user's local calendar date at `at` (ISO), the day a send counts on."""
    return at.astimezone(zone(timezone_name)).date().isoformat()


def expires_before(at: datetime, expires_at: datetime | None) -> bool:
    """A message is never sent late: one that would go out at or after its expiry expires instead."""
    return expires_at is not None and at >= expires_at


def sweep_problem(last_sweep_at: datetime | None, now: datetime, stale_seconds: int) -> str | None:
    """Why the sweep counts as not running (`no_sweep_yet`, `sweep_stale`), None while it runs."""
    if last_sweep_at is None:
        return "no_sweep_yet"
    if (now - last_sweep_at).total_seconds() > stale_seconds:
        return "sweep_stale"
    return None
