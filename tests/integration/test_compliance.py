"""The recipient's place and its law, through the real schedule and inbound use cases on real
Postgres: the timezone a number says, US calling hours as a floor under quiet hours, the stricter
states, urgent and transactional only for allowed agents. Times are June 2025: PDT is UTC-7,
EDT UTC-4, Alaska UTC-8, Hawaii UTC-10."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared import compliance, service
from shared.config import Settings
from shared.store.postgres import PostgresStore
from tests.support.constants import POLICY
from tests.support.factories import sql
from tests.support.fakes import RecordingTaskQueue

PT, ET = ZoneInfo("America/Los_Angeles"), ZoneInfo("America/New_York")
SF = "+14155550123"  # San Francisco: valid, one zone
MIAMI = "+13055550123"  # Florida
ANCHORAGE = "+19075550123"  # Alaska: America/Adak and America/Anchorage
FICTIONAL = "+15550000123"  # not a valid number: no zone of its own


def at(tz: ZoneInfo, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 6, day, hour, minute, tzinfo=tz)


def inbound_user(store: PostgresStore, phone: str, now: datetime) -> uuid.UUID:
    """A user created by their first SMS, as in production: no timezone but what the number says."""
    form = {"From": phone, "Body": "hello", "MessageSid": "SM" + uuid.uuid4().hex, "NumMedia": "0"}
    return uuid.UUID(str(service.inbound(form, store=store, now=now)["userId"]))


def user(store: PostgresStore, phone: str, timezone: str) -> uuid.UUID:
    return uuid.UUID(store.upsert_user(phone, timezone)["id"])


def schedule(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    who: uuid.UUID,
    now: datetime,
    config: service.Policy = POLICY,
    **fields: Any,
) -> service.ScheduleResult:
    body = {"userId": str(who), "agentId": "agent", "messageData": {"content": "hi"}} | fields
    return service.schedule(body, store=store, tasks=tasks, config=config, now=now)


URGENT_OK = replace(POLICY, urgent_agents=frozenset({"pager"}))


def test_a_user_created_by_an_inbound_sms_gets_the_numbers_timezone(
    store: PostgresStore, tasks: RecordingTaskQueue, database_url: str
) -> None:
    who = inbound_user(store, SF, at(PT, 1, 12))
    assert sql(database_url, "select timezone, timezone_source from users where id = %s", who) == [
        ("America/Los_Angeles", "phone_number")
    ]
    result = schedule(store, tasks, who, at(PT, 2, 3))  # 03:00 PDT, not UTC
    assert result.message.scheduled_for == at(PT, 2, 8)
    assert result.message.reason == "calling_hours"


def test_a_timezone_the_user_set_is_kept(store: PostgresStore, database_url: str) -> None:
    who = user(store, SF, "Europe/Paris")
    inbound_user(store, SF, at(PT, 1, 12))
    assert sql(database_url, "select timezone, timezone_source from users where id = %s", who) == [
        ("Europe/Paris", "user")
    ]


# (number, the user's stored timezone or None for inbound-created, now, urgent agent?, fields,
#  expected time, expected reason)
CASES = [
    (
        "21:30 PT: past the federal 9 pm",
        SF,
        "America/Los_Angeles",
        at(PT, 2, 21, 30),
        {},
        at(PT, 3, 8),
        "calling_hours",
    ),
    ("20:59 PT: allowed", SF, "America/Los_Angeles", at(PT, 2, 20, 59), {}, at(PT, 2, 20, 59), "ok"),
    (
        "Florida 20:30 ET: past the state's 8 pm",
        MIAMI,
        "America/New_York",
        at(ET, 2, 20, 30),
        {},
        at(ET, 3, 8),
        "state_calling_hours",
    ),
    ("Florida 19:59 ET: allowed", MIAMI, "America/New_York", at(ET, 2, 19, 59), {}, at(ET, 2, 19, 59), "ok"),
    (
        "urgent from a non-allowed agent at 03:00",
        SF,
        "America/Los_Angeles",
        at(PT, 2, 3),
        {"priority": "urgent"},
        at(PT, 2, 8),
        "calling_hours",
    ),
    (
        "urgent from an allowed agent at 23:00: quiet hours passed, the law not",
        SF,
        "America/Los_Angeles",
        at(PT, 2, 23),
        {"priority": "urgent", "agentId": "pager"},
        at(PT, 3, 8),
        "calling_hours",
    ),
    (
        "urgent, transactional, allowed agent at 03:00",
        SF,
        "America/Los_Angeles",
        at(PT, 2, 3),
        {"priority": "urgent", "agentId": "pager", "transactional": True},
        at(PT, 2, 3),
        "ok",
    ),
    (
        "transactional from a non-allowed agent at 03:00",
        SF,
        "America/Los_Angeles",
        at(PT, 2, 3),
        {"transactional": True},
        at(PT, 2, 8),
        "calling_hours",
    ),
    (
        "transactional, allowed, not urgent at 23:00: quiet hours still",
        SF,
        "America/Los_Angeles",
        at(PT, 2, 23),
        {"agentId": "pager", "transactional": True},
        at(PT, 3, 8),
        "quiet_hours",
    ),
    (
        "Alaska, two zones: 08:00 in Anchorage is 07:00 in Adak",
        ANCHORAGE,
        None,
        datetime(2025, 6, 2, 16, 0, tzinfo=UTC),
        {},
        datetime(2025, 6, 2, 17, 0, tzinfo=UTC),
        "calling_hours",
    ),
    (
        "a fictional number: every US zone's quiet hours, 08:00 PDT is 05:00 in Hawaii",
        FICTIONAL,
        None,
        at(PT, 2, 8),
        {},
        datetime(2025, 6, 2, 18, 0, tzinfo=UTC),
        "quiet_hours",
    ),
]


@pytest.mark.parametrize(("case", "phone", "timezone", "now", "fields", "expected", "reason"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_the_law_of_the_recipients_place(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    case: str,
    phone: str,
    timezone: str | None,
    now: datetime,
    fields: dict[str, Any],
    expected: datetime,
    reason: str,
) -> None:
    who = user(store, phone, timezone) if timezone else inbound_user(store, phone, now - timedelta(days=1))
    result = schedule(store, tasks, who, now, URGENT_OK, **fields)
    assert (result.message.scheduled_for, result.message.reason) == (expected, reason), result.blocked_by


def test_a_fourth_message_on_one_topic_in_24_hours_to_florida_waits(
    store: PostgresStore, tasks: RecordingTaskQueue
) -> None:
    who = user(store, MIAMI, "America/New_York")
    planned = [
        schedule(store, tasks, who, at(ET, 2, 9), agentId=f"agent_{i}", topicKey="promo").message
        for i in range(4)
    ]
    first = planned[0].scheduled_for
    assert [m.reason for m in planned[:3]] != ["state_topic_limit"] * 3
    assert planned[3].reason == "state_topic_limit"
    assert planned[3].scheduled_for >= first + timedelta(hours=24)
    # another topic is not held back by it, nor is a number of another state
    other = schedule(store, tasks, who, at(ET, 2, 9), agentId="agent_x", topicKey="news").message
    assert other.scheduled_for < first + timedelta(hours=24)
    sf = user(store, SF, "America/Los_Angeles")
    for i in range(4):
        m = schedule(store, tasks, sf, at(PT, 2, 9), agentId=f"agent_{i}", topicKey="promo").message
        assert m.reason != "state_topic_limit"


def test_the_profile_none_leaves_the_users_own_quiet_hours(
    store: PostgresStore, tasks: RecordingTaskQueue
) -> None:
    who = user(store, SF, "America/Los_Angeles")
    none = replace(POLICY, compliance_profile="none")
    assert schedule(store, tasks, who, at(PT, 2, 21, 30), none).message.reason == "ok"
    assert schedule(store, tasks, who, at(PT, 2, 23), none, agentId="b").message.reason == "quiet_hours"


def test_the_settings() -> None:
    assert (Settings().policy.compliance_profile, Settings().policy.urgent_agents) == ("us", frozenset())
    s = Settings.from_env({"COMPLIANCE_PROFILE": "NONE", "URGENT_AGENTS": "pager, ops ,"}).policy
    assert (s.compliance_profile, s.urgent_agents) == ("none", frozenset({"pager", "ops"}))
    assert s.privileged("ops") and not s.privileged("other")
    with pytest.raises(ValueError, match="COMPLIANCE_PROFILE"):
        Settings.from_env({"COMPLIANCE_PROFILE": "eu"})


def test_every_zone_a_number_can_map_to_is_one_the_planner_knows() -> None:
    from phonenumbers import timezone as tz_data

    from shared.policy import is_timezone

    zones = {z for zs in tz_data.TIMEZONE_DATA.values() for z in zs if z != "Etc/Unknown"}
    assert len(zones) > 250
    assert sorted(z for z in zones if not is_timezone(z)) == []
    assert all(is_timezone(z) for z in compliance._US_ZONES)


def test_a_transactional_message_is_stored_as_such_and_delivered_outside_calling_hours(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: Any, database_url: str
) -> None:
    from tests.support.fakes import VirtualClock

    who = user(store, SF, "America/Los_Angeles")
    now = at(PT, 2, 3)
    fields = {"priority": "urgent", "agentId": "pager", "transactional": True}
    message = schedule(store, tasks, who, now, URGENT_OK, **fields).message
    assert message.transactional and message.scheduled_for == now
    assert sql(database_url, "select transactional from message_queue where id = %s", message.id) == [(True,)]
    # The same message from an agent not allowed: stored transactional, but the floor holds at delivery.
    other = schedule(store, tasks, user(store, "+14155550124", "America/Los_Angeles"), now, URGENT_OK,
                     transactional=True).message  # fmt: skip
    clock = VirtualClock(now)
    sent = service.deliver({"messageId": str(message.id), "generation": 0}, store=store, tasks=tasks,
                           sms=twilio_sender, config=URGENT_OK, clock=clock)  # fmt: skip
    assert sent.action == "sent"
    # Even woken at 03:00 (its plan moved there by hand), delivery holds it to the floor.
    assert other.scheduled_for == at(PT, 2, 8)
    sql(database_url, "update message_queue set scheduled_for = %s where id = %s", now, other.id)
    held = service.deliver(
        {"messageId": str(other.id), "generation": 0},
        store=store, tasks=tasks, sms=twilio_sender, config=URGENT_OK, clock=clock,
    )  # fmt: skip
    assert (held.action, held.reason, held.scheduled_for) == ("deferred", "calling_hours", at(PT, 2, 8))
