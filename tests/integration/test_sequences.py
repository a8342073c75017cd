"""Sequences (one agent turn as 2-5 SMS parts) on real Postgres, sent with the real twilio client to
the local SMS sink; Cloud Tasks recorded in-process; time virtual (the pause between parts advances
the virtual clock)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from shared import service
from shared.dev.sink import SmsSink
from shared.domain import Limits
from shared.errors import IdempotencyConflict, ValidationError
from shared.models import Outcome
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import POLICY, T0
from tests.support.factories import budget, make_user, row, schedule, sql
from tests.support.fakes import RecordingTaskQueue, VirtualClock

PARTS = [
    {"content": "Great news!", "delaySeconds": 0},
    {"content": "Sam accepted your intro.", "delaySeconds": 2},
    {"content": "Want me to set up a call?", "delaySeconds": 3},
]


@pytest.fixture
def store_pool_size() -> int:
    """More connections than PostgresStore's default, as this module has always had."""
    return 8


def schedule_sequence(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    user: uuid.UUID,
    now: datetime,
    parts: list[dict[str, Any]] = PARTS,
    **fields: Any,
) -> service.ScheduleResult:
    body = {"userId": str(user), "agentId": "test_agent", "sequence": parts, **fields}
    return service.schedule(body, store=store, tasks=tasks, config=POLICY, now=now)


def deliver(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    sender: TwilioSender,
    clock: VirtualClock,
    message_id: uuid.UUID,
    *,
    on_pause: Callable[[float], None] | None = None,
) -> Outcome:
    generation = int(row_of(store, message_id)["task_generation"])

    def sleep(seconds: float) -> None:
        clock.advance(timedelta(seconds=seconds))
        if on_pause:
            on_pause(seconds)

    return service.deliver(
        {"messageId": str(message_id), "generation": generation},
        store=store,
        tasks=tasks,
        sms=sender,
        config=POLICY,
        clock=clock,
        sleep=sleep,
    )


def row_of(store: PostgresStore, message_id: uuid.UUID) -> dict[str, Any]:
    m = store.get_message(message_id)
    assert m is not None
    return {"task_generation": m.generation}


def parts(database_url: str, message_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return sql(
        database_url,
        "select position, status, twilio_message_sid, sent_at from message_parts"
        " where message_id = %s order by position",
        message_id,
    )


def test_parts_stored_out_of_order_go_out_in_position_order_with_their_spacing(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, "America/New_York", phone="+15552220001")
    result = schedule_sequence(store, tasks, user, T0)
    assert result.created and result.message.scheduled_for == T0 and len(result.message.parts) == 3
    # Store the parts physically in reverse order: delivery must go by position, not by storage.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "create temp table p as select * from message_parts where message_id = %s", (result.message.id,)
        )
        conn.execute("delete from message_parts where message_id = %s", (result.message.id,))
        conn.execute("insert into message_parts select * from p order by position desc")
    assert [r[0] for r in sql(database_url, "select position from message_parts")] == [3, 2, 1]

    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id)

    assert outcome.action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == [p["content"] for p in PARTS]
    stored = parts(database_url, result.message.id)
    assert [p[1] for p in stored] == ["sent"] * 3
    times = [p[3] for p in stored]
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(times)] == [2.0, 3.0]
    r = row(database_url, result.message.id)
    assert r["status"] == "sent" and r["twilio_message_sid"] == stored[-1][2]
    # Each part is in the conversation history once, linked to the message.
    outbound = sql(
        database_url,
        "select content from messages where message_queue_id = %s order by sent_at",
        result.message.id,
    )
    assert [o[0] for o in outbound] == [p["content"] for p in PARTS]


def test_a_whole_sequence_under_budget_counts_once(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, "America/New_York", phone="+15552220002")
    seq = schedule_sequence(store, tasks, user, T0)
    assert deliver(store, tasks, twilio_sender, clock, seq.message.id).action == "sent"
    assert len(sms_sink.messages()) == 3
    assert budget(database_url, user) == {"2025-06-02": 1}
    # Hourly limit 2: the sequence used one slot, so one more message fits this hour (after the
    # cooldown, counted from the last part), and the one after it waits for the hour.
    clock.advance(timedelta(seconds=40))
    second = schedule(store, tasks, user, clock(), policy=POLICY, content="one more")
    span_end = T0 + timedelta(seconds=5)
    assert second.message.scheduled_for == max(clock(), span_end + timedelta(seconds=30))
    third = schedule(store, tasks, user, clock(), policy=POLICY, content="and another")
    assert third.message.reason == "hourly_limit"
    assert third.message.scheduled_for >= span_end + timedelta(hours=1)


def test_a_sequence_over_the_daily_limit_is_rescheduled_whole_to_one_later_time(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, "America/New_York", phone="+15552220003", daily_limit=1)
    seq = schedule_sequence(store, tasks, user, T0)
    assert seq.message.scheduled_for == T0
    # An urgent message that must not wait takes the day's only slot first.
    urgent = schedule(store, tasks, user, T0, policy=POLICY, priority="urgent", canDelay=False)
    assert urgent.message.scheduled_for == T0
    assert deliver(store, tasks, twilio_sender, clock, urgent.message.id).action == "sent"

    outcome = deliver(store, tasks, twilio_sender, clock, seq.message.id)

    # Deferred whole: nothing of it went out, and it has exactly one new time, after now.
    assert (outcome.action, outcome.reason) == ("deferred", "daily_limit")
    next_morning = datetime(2025, 6, 3, 12, 0, tzinfo=UTC)  # 08:00 in New York, after quiet hours
    assert outcome.scheduled_for == next_morning
    assert [p[1] for p in parts(database_url, seq.message.id)] == ["pending"] * 3
    assert [m["body"] for m in sms_sink.messages()] == ["hello"]
    assert [t.at for t in tasks.for_message(seq.message.id)] == [T0, next_morning]

    clock.now = next_morning
    assert deliver(store, tasks, twilio_sender, clock, seq.message.id).action == "sent"
    assert [m["body"] for m in sms_sink.messages()][1:] == [p["content"] for p in PARTS]
    assert budget(database_url, user) == {"2025-06-02": 1, "2025-06-03": 1}


def test_a_rate_limited_sequence_never_blocks_another_users_message(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
) -> None:
    busy = make_user(store, phone="+15552220004")
    other = make_user(store, phone="+15552220005")
    first = schedule(store, tasks, busy, T0, policy=POLICY)
    assert deliver(store, tasks, twilio_sender, clock, first.message.id).action == "sent"
    seq = schedule_sequence(store, tasks, busy, T0)
    assert seq.message.reason == "cooldown" and seq.message.scheduled_for == T0 + timedelta(seconds=30)
    # Its task fires early (Cloud Tasks may): it is deferred, and the other user's message goes now.
    early = deliver(store, tasks, twilio_sender, clock, seq.message.id)
    assert early.action == "deferred"
    mine = schedule(store, tasks, other, T0, policy=POLICY, content="for the other user")
    assert mine.message.scheduled_for == T0
    assert deliver(store, tasks, twilio_sender, clock, mine.message.id).action == "sent"
    assert [m["to"] for m in sms_sink.messages()] == ["+15552220004", "+15552220005"]


def test_an_urgent_sequence_goes_before_an_older_medium_message(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
) -> None:
    user = make_user(store, phone="+15552220006", hourly_limit=5)
    first = schedule(store, tasks, user, T0, policy=POLICY, content="first")
    assert deliver(store, tasks, twilio_sender, clock, first.message.id).action == "sent"
    medium = schedule(store, tasks, user, T0 + timedelta(seconds=1), policy=POLICY, content="medium")
    seq = schedule_sequence(store, tasks, user, T0 + timedelta(seconds=2), priority="urgent")
    due = T0 + timedelta(seconds=30)
    assert medium.message.scheduled_for == due and seq.message.scheduled_for == due

    # Both tasks fire at once, the older medium one first: it yields to the due urgent sequence.
    clock.now = due
    yielded = deliver(store, tasks, twilio_sender, clock, medium.message.id)
    assert (yielded.action, yielded.reason) == ("deferred", "priority_yield")
    assert deliver(store, tasks, twilio_sender, clock, seq.message.id).action == "sent"
    assert yielded.scheduled_for is not None
    clock.now = max(clock.now + timedelta(seconds=30), yielded.scheduled_for)
    assert deliver(store, tasks, twilio_sender, clock, medium.message.id).action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == ["first", *(p["content"] for p in PARTS), "medium"]


def test_twilio_failing_mid_sequence_never_resends_a_sent_part_and_the_rest_follow(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220007")
    seq = schedule_sequence(store, tasks, user, T0)
    pauses = []

    def fail_next_part(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1:
            # Part 2 is refused by Twilio's rate limit: certainly not sent (a 5xx would need asking).
            sms_sink.add_fault(status=429, count=1)

    outcome = deliver(store, tasks, twilio_sender, clock, seq.message.id, on_pause=fail_next_part)
    assert (outcome.action, outcome.reason) == ("retry", "sequence_interrupted")
    assert [p[1] for p in parts(database_url, seq.message.id)] == ["sent", "pending", "pending"]
    r = row(database_url, seq.message.id)
    assert r["status"] == "sending" and r["slot_at"] is not None  # the sequence keeps its one slot

    # The retried task, once the hold ends, reconciles: Twilio never got part 2, so the message is
    # queued again and the remaining parts follow, part 1 never again.
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds + 1))
    settled = deliver(store, tasks, twilio_sender, clock, seq.message.id)
    assert (settled.action, settled.reason) == ("reconciled", "reconciled_requeued")
    assert deliver(store, tasks, twilio_sender, clock, seq.message.id).action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == [p["content"] for p in PARTS]
    assert [p[1] for p in parts(database_url, seq.message.id)] == ["sent"] * 3
    assert row(database_url, seq.message.id)["status"] == "sent"
    assert sum(budget(database_url, user).values()) == 1


def test_a_lost_sequence_claim_is_reconciled_part_by_part(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    """The instance dies after Twilio took parts 1 and 2 but before part 2 was recorded: the sweep
    records part 2 from Twilio's list and the remaining part follows; nothing is sent twice."""
    user = make_user(store, phone="+15552220008")
    seq = schedule_sequence(store, tasks, user, T0)
    real_record_part = store.record_part

    def record_part(*args: Any, **kwargs: Any) -> bool:
        if kwargs.get("position") == 2:
            raise RuntimeError("instance lost")  # part 2 reached Twilio, then the process died
        return real_record_part(*args, **kwargs)

    store.record_part = record_part  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        deliver(store, tasks, twilio_sender, clock, seq.message.id)
    store.record_part = real_record_part  # type: ignore[method-assign]
    assert [m["body"] for m in sms_sink.messages()] == [p["content"] for p in PARTS[:2]]

    clock.advance(timedelta(seconds=POLICY.lease_seconds + 1))
    report = service.sweep(
        store=store, tasks=tasks, sms=twilio_sender, config=POLICY, clock=clock, trigger="test"
    )
    assert report.reconciled_requeued == 1
    assert [p[1] for p in parts(database_url, seq.message.id)] == ["sent", "sent", "pending"]
    assert deliver(store, tasks, twilio_sender, clock, seq.message.id).action == "sent"
    assert [m["body"] for m in sms_sink.messages()] == [p["content"] for p in PARTS]


@pytest.mark.parametrize(
    ("sequence", "field"),
    [
        ([{"content": "only one"}], "sequence"),
        ([{"content": "a"}] * 6, "sequence"),
        ("not a list", "sequence"),
        ([{"content": "a"}, {"content": ""}], "sequence[1].content"),
        ([{"content": "a"}, {"content": "b", "delaySeconds": 11}], "sequence[1].delaySeconds"),
        ([{"content": "a"}, {"content": "b", "delaySeconds": True}], "sequence[1].delaySeconds"),
        ([{"content": "a"}, {"content": "b", "colour": "red"}], "sequence[1].colour"),
        ([{"content": "a"}, "b"], "sequence[1]"),
        ([{"content": "a"}, {"style": "snarky"}], "sequence[1].type"),
        ([{"content": "a"}, {"type": "x", "style": "rude"}], "sequence[1].style"),
    ],
)
def test_a_bad_sequence_is_a_400_naming_the_part(
    store: PostgresStore, tasks: RecordingTaskQueue, database_url: str, sequence: Any, field: str
) -> None:
    user = make_user(store)
    with pytest.raises(ValidationError) as err:
        schedule_sequence(store, tasks, user, T0, parts=sequence)
    assert field in [e["field"] for e in err.value.errors]
    assert sql(database_url, "select count(*) from message_queue") == [(0,)]


def test_sequence_and_message_data_together_are_refused(
    store: PostgresStore, tasks: RecordingTaskQueue
) -> None:
    user = make_user(store)
    with pytest.raises(ValidationError) as err:
        schedule_sequence(store, tasks, user, T0, messageData={"content": "x"})
    assert [e["field"] for e in err.value.errors] == ["sequence"]


def test_an_idempotent_replay_of_a_sequence_answers_the_same_message(
    store: PostgresStore, tasks: RecordingTaskQueue
) -> None:
    user = make_user(store)
    first = schedule_sequence(store, tasks, user, T0, idempotencyKey="turn-1")
    again = schedule_sequence(store, tasks, user, T0, idempotencyKey="turn-1")
    assert not again.created and again.message.id == first.message.id and len(again.message.parts) == 3
    changed = [dict(PARTS[0]), *PARTS[1:]]
    changed[0]["content"] = "Different"
    with pytest.raises(IdempotencyConflict):
        schedule_sequence(store, tasks, user, T0, parts=changed, idempotencyKey="turn-1")


class FlakyTwilio:
    """Twilio with faults, in-process (it is what leaves the machine): some sends fail before Twilio
    has them (503), some time out after Twilio accepted them (the outcome is unknown to us)."""

    def __init__(self, seed: int) -> None:
        import random

        self.rng = random.Random(seed)
        self.accepted: list[tuple[str, str, uuid.UUID, str, datetime]] = []  # to, body, message, sid, at
        self.clock: VirtualClock | None = None
        self.refused = 0
        self.timed_out = 0

    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        from shared.errors import TransientSendError

        roll = self.rng.random()
        if roll < 0.12:
            self.refused += 1
            raise TransientSendError("injected 503", code="20503", status=503)
        assert self.clock is not None
        sid = "SM" + uuid.uuid4().hex
        self.accepted.append((to, body, message_id, sid, self.clock()))
        if roll < 0.2:
            self.timed_out += 1
            err = TransientSendError("injected read timeout after Twilio accepted it")
            err.maybe_sent = True
            raise err
        return sid

    def find_sent(self, to: str, body: str, *, since: datetime) -> list[Any]:
        from shared.models import SentRecord

        return [
            SentRecord(sid=sid, sent_at=at)
            for (t, b, _, sid, at) in reversed(self.accepted)
            if t == to and b == body and at >= since
        ]


@pytest.mark.parametrize("seed", [7, 11, 23])
def test_sequences_under_twilio_faults_send_every_part_exactly_once(
    store: PostgresStore, tasks: RecordingTaskQueue, database_url: str, seed: int
) -> None:
    """30 users, each with sequences and single messages, Twilio failing one send in five (some after
    accepting it); Cloud Tasks retries and the sweep every minute. Judged from Twilio's record and
    the database: every part of every message went out exactly once, every message is sent, and
    each counted once in the budget."""
    from tests.support.driver import TaskDriver

    twilio = FlakyTwilio(seed=seed)
    config = service.Policy(
        limits=Limits(hourly_limit=10, daily_limit=50), max_attempts=20, reconcile_after_seconds=30
    )
    driver = TaskDriver(store, tasks, twilio, config, T0, sweep_every=timedelta(minutes=1))  # type: ignore[arg-type]
    twilio.clock = driver.clock
    expected: dict[uuid.UUID, list[str]] = {}
    for u in range(30):
        user = make_user(store)
        for k in range(3):
            if k % 2 == 0:
                parts = [
                    {"content": f"u{u} m{k} p{p}", "delaySeconds": p % 3} for p in range(1 + (u + k) % 4 + 1)
                ]
                body = {"userId": str(user), "agentId": "a", "sequence": parts}
                texts = [p["content"] for p in parts]
            else:
                body = {"userId": str(user), "agentId": "a", "messageData": {"content": f"u{u} m{k}"}}
                texts = [f"u{u} m{k}"]
            result = service.schedule(body, store=store, tasks=tasks, config=config, now=T0)
            expected[result.message.id] = texts

    driver.run(until=T0 + timedelta(hours=6))

    sent_bodies: dict[uuid.UUID, list[str]] = {}
    for _, body, mid, _, _ in twilio.accepted:
        sent_bodies.setdefault(mid, []).append(body)
    for mid, texts in expected.items():
        assert sorted(sent_bodies.get(mid, [])) == sorted(texts), f"{mid}: {sent_bodies.get(mid)} != {texts}"
        assert sent_bodies[mid] == texts  # and in position order
    statuses = sql(database_url, "select status, count(*) from message_queue group by status")
    assert statuses == [("sent", len(expected))]
    unsent_parts = sql(database_url, "select count(*) from message_parts where status <> 'sent'")
    assert unsent_parts == [(0,)]
    recorded = {
        r[0]
        for r in sql(database_url, "select twilio_message_sid from messages where direction = 'outbound'")
    }
    assert recorded == {sid for *_, sid, _ in twilio.accepted}
    assert sql(database_url, "select sum(messages_sent) from user_message_budget") == [(len(expected),)]
    # The faults did happen, and the paths they exercise ran.
    assert twilio.refused >= 10 and twilio.timed_out >= 5
    actions = dict(
        sql(database_url, "select action_type, count(*) from agent_actions_log group by action_type")
    )
    assert actions.get("reconciled", 0) >= 5 and actions.get("part_sent", 0) > 0


def test_a_sender_that_lost_its_claim_mid_sequence_stops_and_its_part_is_kept(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    """The sender pauses between parts; meanwhile its claim goes to another holder (the sweep's
    reconciler after a lapsed lease takes it with a new token). The part the sender then sends is
    recorded (it went out: never again), but the sender stops there: one holder acts, not two."""
    user = make_user(store, phone="+15552220019")
    seq = schedule_sequence(store, tasks, user, T0)

    def taken_over(seconds: float) -> None:
        clock.advance(timedelta(seconds=seconds))
        sql(
            database_url,
            "update message_queue set claim_token = gen_random_uuid() where id = %s",
            seq.message.id,
        )

    outcome = service.deliver(
        {"messageId": str(seq.message.id), "generation": 0},
        store=store, tasks=tasks, sms=twilio_sender, config=POLICY, clock=clock, sleep=taken_over,
    )  # fmt: skip
    assert (outcome.action, outcome.reason) == ("skipped", "claim_lost")
    assert [m["body"] for m in sms_sink.messages()] == [p["content"] for p in PARTS[:2]]
    assert [p[1] for p in parts(database_url, seq.message.id)] == ["sent", "sent", "pending"]
    assert row(database_url, seq.message.id)["status"] == "sending"  # the new holder settles it
