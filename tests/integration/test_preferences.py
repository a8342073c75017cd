"""User preferences (preferred window, weekly cap, notifications switch) and account-wide caps,
through the real use cases on real Postgres and the SMS sink, on a virtual clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta

import pytest

from shared import domain, policy, service
from shared.dev.sink import SmsSink
from shared.domain import AccountCaps, Limits
from shared.errors import NotificationsDisabled
from shared.models import Outcome
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import POLICY, T0
from tests.support.driver import TaskDriver
from tests.support.factories import make_user, schedule, sql
from tests.support.fakes import RecordingTaskQueue, VirtualClock

MONDAY = T0  # Monday 17:00 in Berlin, 11:00 in New York


@pytest.fixture
def store_pool_size() -> int:
    """Deliveries race on their own threads in one test."""
    return 8


def deliver(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    sender: TwilioSender,
    now: datetime,
    message_id: uuid.UUID,
    generation: int | None = None,
    config: service.Policy = POLICY,
) -> Outcome:
    if generation is None:
        m = store.get_message(message_id)
        assert m is not None
        generation = m.generation
    return service.deliver(
        {"messageId": str(message_id), "generation": generation},
        store=store,
        tasks=tasks,
        sms=sender,
        config=config,
        clock=VirtualClock(now),
    )


def test_medium_lands_in_the_preferred_window_and_urgent_ignores_it(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender, sms_sink: SmsSink
) -> None:
    user = make_user(
        store,
        "Europe/Berlin",
        preferred_days=[2, 4],
        preferred_window_start=time(18, 0),
        preferred_window_end=time(20, 0),
    )
    medium = schedule(store, tasks, user, MONDAY, policy=POLICY, content="weekly summary")
    low = schedule(store, tasks, user, MONDAY, policy=POLICY, content="tip", priority="low")
    urgent = schedule(store, tasks, user, MONDAY, policy=POLICY, content="code 1234", priority="urgent")
    high = schedule(store, tasks, user, MONDAY, policy=POLICY, content="match!", priority="high")
    now_ = schedule(store, tasks, user, MONDAY, policy=POLICY, content="now", canDelay=False)

    tuesday_18 = datetime(2025, 6, 3, 16, 0, tzinfo=UTC)  # Tuesday 18:00 in Berlin
    assert (medium.message.scheduled_for, medium.message.reason) == (tuesday_18, "preferred_window")
    assert medium.message.scheduled_for.astimezone(policy.zone("Europe/Berlin")).isoweekday() == 2
    assert low.message.scheduled_for >= tuesday_18 and low.message.reason == "preferred_window"
    assert low.message.scheduled_for < tuesday_18 + timedelta(hours=2)
    assert urgent.message.scheduled_for == MONDAY
    assert high.message.scheduled_for < tuesday_18 and now_.message.scheduled_for < tuesday_18

    assert deliver(store, tasks, twilio_sender, MONDAY, urgent.message.id).action == "sent"
    # The lanes that ignore the window go out on Monday (the hourly limit then holds the rest).
    assert deliver(store, tasks, twilio_sender, high.message.scheduled_for, high.message.id).action == "sent"
    later = high.message.scheduled_for + timedelta(hours=1)
    assert deliver(store, tasks, twilio_sender, later, now_.message.id).action == "sent"
    # Woken too early, the medium one keeps its plan; at Tuesday 18:00 it goes.
    early = deliver(store, tasks, twilio_sender, MONDAY + timedelta(hours=5), medium.message.id)
    assert (early.action, early.scheduled_for) == ("deferred", tuesday_18)
    assert deliver(store, tasks, twilio_sender, tuesday_18, medium.message.id).action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == ["code 1234", "match!", "now", "weekly summary"]


def test_a_window_set_after_scheduling_is_honoured_at_delivery(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, "Europe/Berlin")
    medium = schedule(store, tasks, user, MONDAY, policy=POLICY)
    assert medium.message.scheduled_for == MONDAY
    sql(
        database_url,
        "update users set preferred_window_start = '09:00', preferred_window_end = '12:00' where id = %s",
        user,
    )
    outcome = deliver(store, tasks, twilio_sender, MONDAY, medium.message.id)
    assert (outcome.action, outcome.reason) == ("deferred", "preferred_window")
    assert outcome.scheduled_for == datetime(2025, 6, 3, 7, 0, tzinfo=UTC)  # Tuesday 09:00 in Berlin
    assert sms_sink.messages() == []


def test_the_weekly_cap_holds_over_a_virtual_week(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, "America/New_York", weekly_limit=3, phone="+15553330001")
    for i in range(6):
        schedule(store, tasks, user, MONDAY, policy=POLICY, content=f"note {i}")
    driver = TaskDriver(store, tasks, twilio_sender, POLICY, MONDAY)
    driver.run(until=MONDAY + timedelta(days=14))

    sent = sorted(
        r[0]
        for r in sql(
            database_url, "select slot_at from message_queue where user_id = %s and status = 'sent'", user
        )
    )
    assert len(sent) == 6 and len(sms_sink.messages()) == 6
    tz = policy.zone("America/New_York")
    weeks: dict[tuple[int, int], int] = {}
    for s in sent:
        iso = s.astimezone(tz).isocalendar()
        weeks[(iso.year, iso.week)] = weeks.get((iso.year, iso.week), 0) + 1
    assert max(weeks.values()) == 3 and len(weeks) == 2
    # The fourth waits for the next local Monday, after quiet hours.
    assert sent[3].astimezone(tz) == datetime(2025, 6, 9, 8, 0, tzinfo=tz)
    reasons = [r[0] for r in sql(database_url, "select reason from message_queue where user_id = %s", user)]
    assert reasons == ["sent"] * 6


def test_the_claim_enforces_the_weekly_cap_under_the_users_lock(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender
) -> None:
    """A policy that let one more through (it raced another delivery) is still stopped by the claim."""
    user = make_user(store, weekly_limit=1)
    first = schedule(store, tasks, user, MONDAY, policy=POLICY)
    assert deliver(store, tasks, twilio_sender, MONDAY, first.message.id).action == "sent"
    second = schedule(store, tasks, user, MONDAY, policy=POLICY, canDelay=False)
    start, end = policy.local_week_bounds("UTC", MONDAY)
    claim = store.claim(
        second.message.id,
        second.message.generation,
        MONDAY + timedelta(hours=2),
        limits=Limits(),
        daily_cap=10,
        day_start=start,
        day_end=end,
        lease_seconds=60,
        weekly_cap=1,
        week=(start, end),
    )
    assert (claim.claimed, claim.reason) == (False, "weekly_limit")


def test_notifications_off_refuses_all_but_urgent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store)
    queued = schedule(store, tasks, user, MONDAY, policy=POLICY, content="queued before")
    sql(database_url, "update users set notifications_enabled = false where id = %s", user)
    with pytest.raises(NotificationsDisabled) as err:
        schedule(store, tasks, user, MONDAY, policy=POLICY)
    assert err.value.http_status == 409 and err.value.details == {"userId": str(user)}
    urgent = schedule(store, tasks, user, MONDAY, policy=POLICY, priority="urgent", content="your code")
    outcome = deliver(store, tasks, twilio_sender, MONDAY, queued.message.id)
    assert (outcome.action, outcome.reason) == ("failed", "notifications_disabled")
    assert deliver(store, tasks, twilio_sender, MONDAY, urgent.message.id).action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == ["your code"]


def test_a_burst_at_0800_drains_at_the_configured_rate_urgent_first(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender, database_url: str
) -> None:
    rate = 10
    config = service.Policy(limits=Limits(), max_attempts=3, account_caps=AccountCaps(per_second=rate))
    night = datetime(2025, 6, 2, 7, 0, tzinfo=UTC)  # 03:00 in New York: quiet until 08:00
    eight = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
    lanes = ["high", "medium", "low"]
    order: dict[uuid.UUID, int] = {}
    urgent: set[uuid.UUID] = set()
    for i in range(450):
        user = make_user(store, "America/New_York")
        lane = lanes[i % 3]
        r = schedule(store, tasks, user, night, policy=config, priority=lane)
        assert r.message.scheduled_for == eight
        order[r.message.id] = -domain.RANK[lane]  # the worst case: the least important fire first
    for _ in range(50):
        user = make_user(store, "America/New_York")
        r = schedule(store, tasks, user, eight, policy=config, priority="urgent")
        assert r.message.scheduled_for == eight
        urgent.add(r.message.id)
        order[r.message.id] = 0

    driver = TaskDriver(store, tasks, twilio_sender, config, eight)
    driver.run(until=eight + timedelta(hours=2), order=order)

    rows = sql(
        database_url, "select id, slot_at, priority from message_queue where status = 'sent' order by slot_at"
    )
    assert len(rows) == 500
    slots = [r[1] for r in rows]
    # Never more than `rate` sends in any one-second window.
    assert all(slots[i + rate] - slots[i] >= timedelta(seconds=1) for i in range(len(slots) - rate))
    # It drains at about the rate: no long idle gaps (500 at 10/s is 50 s).
    assert slots[-1] - slots[0] <= timedelta(seconds=500 / rate * 2)
    last_urgent = max(r[1] for r in rows if r[0] in urgent)
    first_other = min(r[1] for r in rows if r[0] not in urgent)
    assert last_urgent <= first_other
    assert driver.calls < 500 * 6  # deferrals are spread, not retried every second
    deferred = sql(
        database_url,
        "select count(*) from agent_actions_log where action_type = 'deferred'"
        " and output_data ->> 'reason' like 'account_%%'",
    )
    assert deferred[0][0] > 0


def test_account_caps_hold_under_concurrent_deliveries(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender, database_url: str
) -> None:
    """20 deliveries racing at one instant, on real connections: the account's per-second cap lets
    exactly 5 through; the others wait for a later second."""
    import threading

    config = service.Policy(limits=Limits(), account_caps=AccountCaps(per_second=5, hourly=100))
    ids = [
        schedule(store, tasks, make_user(store), MONDAY, policy=config, content=f"m{i}").message.id
        for i in range(20)
    ]
    barrier = threading.Barrier(len(ids))
    outcomes: list[Outcome] = []

    def run(mid: uuid.UUID) -> None:
        barrier.wait()
        outcomes.append(deliver(store, tasks, twilio_sender, MONDAY, mid, 0, config))

    threads = [threading.Thread(target=run, args=(mid,)) for mid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.action for o in outcomes) == ["deferred"] * 15 + ["sent"] * 5
    assert {o.reason for o in outcomes if o.action == "deferred"} == {"account_throughput"}
    assert all(
        o.scheduled_for and o.scheduled_for >= MONDAY + timedelta(seconds=1)
        for o in outcomes
        if o.action == "deferred"
    )
    sent = sql(database_url, "select count(*) from message_queue where status = 'sent'")
    assert sent == [(5,)]
