"""The rules around the planner, one table each: pure functions of their inputs and `now`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.domain import Limits, Reservation
from shared.policy import rules

NOW = datetime(2025, 6, 2, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reason", "retry_at", "action"),
    [
        ("not_found", None, rules.SKIP),
        ("not_queued", None, rules.SKIP),
        ("stale_task", None, rules.SKIP),
        ("opted_out", None, rules.FAIL),
        ("notifications_disabled", None, rules.FAIL),
        ("expired", None, rules.EXPIRE),
        ("account_rate", NOW, rules.WAIT),
        ("account_rate", None, rules.REPLAN),  # no instant to wait for: plan again
        ("cooldown", None, rules.REPLAN),
        ("in_flight", None, rules.REPLAN),
    ],
)
def test_what_a_refused_claim_means(reason: str, retry_at: datetime | None, action: str) -> None:
    assert rules.after_refused_claim(reason, retry_at) == action


def test_every_failing_refusal_has_an_error_text() -> None:
    failing = {r for r, a in rules.CLAIM_REFUSALS.items() if a == rules.FAIL}
    assert failing == set(rules.REFUSAL_ERRORS)


@pytest.mark.parametrize(
    ("attempts", "seconds"), [(0, 30), (1, 30), (2, 60), (3, 120), (5, 480), (6, 900), (10, 900), (200, 900)]
)
def test_render_backoff_doubles_up_to_fifteen_minutes(attempts: int, seconds: int) -> None:
    assert rules.render_backoff(attempts) == timedelta(seconds=seconds)


def test_a_replan_is_never_for_now() -> None:
    limits = Limits(cooldown_seconds=30)
    assert rules.replan_at(NOW, "cooldown", NOW, limits) == NOW + timedelta(seconds=1)
    assert rules.replan_at(NOW, "in_flight", NOW, limits) == NOW + timedelta(seconds=30)
    assert rules.replan_at(None, "no_slot", NOW, limits) == NOW + timedelta(hours=1)
    later = NOW + timedelta(hours=3)
    assert rules.replan_at(later, "quiet_hours", NOW, limits) == later


def test_a_delivery_yields_only_to_a_due_and_more_important_message() -> None:
    due_urgent = Reservation(at=NOW, priority="urgent")
    later_urgent = Reservation(at=NOW + timedelta(seconds=1), priority="urgent")
    due_low = Reservation(at=NOW - timedelta(minutes=1), priority="low")
    assert rules.yields_to("medium", [due_urgent], NOW)
    assert not rules.yields_to("medium", [later_urgent, due_low], NOW)
    assert not rules.yields_to("urgent", [due_urgent], NOW)  # the same lane takes turns by time
    assert rules.yield_until(NOW, Limits(cooldown_seconds=0)) == NOW + timedelta(seconds=1)
    assert rules.yield_until(NOW, Limits(cooldown_seconds=45)) == NOW + timedelta(seconds=45)


def test_early_wake_ups_and_expiry() -> None:
    assert rules.woken_early(NOW, NOW + timedelta(seconds=2))
    assert not rules.woken_early(NOW, NOW + timedelta(seconds=1))  # within Cloud Tasks' tolerance
    assert rules.expires_before(NOW, NOW)
    assert not rules.expires_before(NOW, NOW + timedelta(seconds=1))
    assert not rules.expires_before(NOW, None)
    assert rules.account_retry_at(NOW - timedelta(seconds=5), NOW) == NOW + timedelta(seconds=1)


def test_the_local_date_a_send_counts_on() -> None:
    late_evening_in_new_york = datetime(2025, 6, 3, 3, 30, tzinfo=UTC)
    assert rules.local_date("America/New_York", late_evening_in_new_york) == "2025-06-02"
    assert rules.local_date("Asia/Tokyo", late_evening_in_new_york) == "2025-06-03"


def test_when_the_sweep_counts_as_stale() -> None:
    assert rules.sweep_problem(None, NOW, 300) == "no_sweep_yet"
    assert rules.sweep_problem(NOW - timedelta(seconds=300), NOW, 300) is None
    assert rules.sweep_problem(NOW - timedelta(seconds=301), NOW, 300) == "sweep_stale"
    assert rules.never_sends("opted_out") and not rules.never_sends("cooldown")
