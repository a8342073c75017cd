"""Scheduling and delivery through the real use cases, on real Postgres, sending with the real
twilio client to the local SMS sink. Cloud Tasks is recorded in-process; time is virtual."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from shared import service, sms
from shared.dev.sink import SmsSink
from shared.models import Outcome
from shared.sms import TwilioSender, build_twilio_client
from shared.store.postgres import PostgresStore
from tests.integration.sms_fixtures import (
    TEST_ACCOUNT_SID,
    TEST_AUTH_TOKEN,
    TEST_FROM_NUMBER,
    TEST_MESSAGING_SERVICE_SID,
    TEST_STATUS_CALLBACK,
)
from tests.support.constants import POLICY, T0
from tests.support.factories import budget, make_active, make_user, row, schedule, sql
from tests.support.fakes import RecordingTaskQueue, VirtualClock


@pytest.fixture
def store_pool_size() -> int:
    """Twenty deliveries race on their own threads in one test."""
    return 24


def deliver(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    sender: TwilioSender,
    clock: VirtualClock,
    message_id: uuid.UUID,
    generation: int | None = 0,
    policy: service.Policy = POLICY,
) -> Outcome:
    body: dict[str, object] = {"messageId": str(message_id)}
    if generation is not None:
        body["generation"] = generation
    return service.deliver(body, store=store, tasks=tasks, sms=sender, config=policy, clock=clock)


def test_an_allowed_message_is_sent_once_and_recorded(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, "America/New_York", phone="+15551110001")
    result = schedule(store, tasks, user, T0, content="Your intro is ready", policy=POLICY)
    assert result.created and result.message.scheduled_for == T0 and result.message.reason == "ok"
    assert [(t.generation, t.at) for t in tasks.for_message(result.message.id)] == [(0, T0)]

    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id)

    assert outcome.action == "sent" and outcome.sid and outcome.sid.startswith("SM")
    sent = sms_sink.messages()
    assert [(m["to"], m["body"]) for m in sent] == [("+15551110001", "Your intro is ready")]
    r = row(database_url, result.message.id)
    assert r["status"] == "sent" and r["twilio_message_sid"] == outcome.sid and r["attempts"] == 1
    assert r["delivered_message_id"] is not None and r["claim_token"] is None
    history = sql(
        database_url,
        "select direction, content, status, twilio_message_sid from messages where user_id = %s",
        user,
    )
    assert history == [("outbound", "Your intro is ready", "sent", outcome.sid)]
    assert budget(database_url, user) == {"2025-06-02": 1}

    # The same task again (Cloud Tasks delivers at least once): nothing more is sent.
    again = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (again.action, again.reason) == ("skipped", "already_sent")
    assert len(sms_sink.messages()) == 1
    assert budget(database_url, user) == {"2025-06-02": 1}


def test_budget_is_counted_on_the_users_local_date(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    clock: VirtualClock,
    database_url: str,
) -> None:
    # 15:00 UTC on June 2nd is 00:00 on June 3rd in Tokyo; the user wrote a minute ago (active).
    user = make_user(store, "Asia/Tokyo")
    make_active(store, user, T0 - timedelta(minutes=1))
    result = schedule(store, tasks, user, T0, policy=POLICY)
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).action == "sent"
    assert budget(database_url, user) == {"2025-06-03": 1}


def test_a_stale_task_sends_nothing(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
) -> None:
    user = make_user(store)
    result = schedule(store, tasks, user, T0, policy=POLICY)
    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id, generation=7)
    assert (outcome.action, outcome.reason) == ("skipped", "stale_task")
    assert sms_sink.messages() == []


def test_an_unknown_message_is_acknowledged_without_sending(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
) -> None:
    outcome = deliver(store, tasks, twilio_sender, clock, uuid.uuid4())
    assert (outcome.action, outcome.reason) == ("skipped", "not_found")
    assert sms_sink.messages() == []


def test_limits_are_rechecked_when_the_task_fires(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, "America/New_York")
    first = schedule(store, tasks, user, T0, policy=POLICY)
    second = schedule(store, tasks, user, T0, policy=POLICY)
    assert second.message.scheduled_for == T0 + timedelta(seconds=30)
    assert second.message.reason == "cooldown"
    assert deliver(store, tasks, twilio_sender, clock, first.message.id).action == "sent"
    # An urgent message, scheduled after the second was planned, goes out first at T0 + 30 s...
    clock.advance(timedelta(seconds=30))
    urgent = schedule(store, tasks, user, clock(), policy=POLICY, priority="urgent", canDelay=False)
    assert deliver(store, tasks, twilio_sender, clock, urgent.message.id).action == "sent"
    # ...so when the second message's task fires a second later, the cooldown holds it back, and the
    # hourly limit (2 sent in the last hour) moves it to when the first send leaves the window: the
    # reason given is the weightier hourly limit.
    clock.advance(timedelta(seconds=1))
    outcome = deliver(store, tasks, twilio_sender, clock, second.message.id)
    assert (outcome.action, outcome.reason) == ("deferred", "hourly_limit")
    assert outcome.scheduled_for == T0 + timedelta(hours=1)
    r = row(database_url, second.message.id)
    assert r["status"] == "queued" and r["task_generation"] == 1 and r["reason"] == "hourly_limit"
    assert [t.generation for t in tasks.for_message(second.message.id)] == [0, 1]
    assert len(sms_sink.messages()) == 2
    # The old task, if it fires again, is stale; the new one sends.
    assert deliver(store, tasks, twilio_sender, clock, second.message.id, generation=0).reason == "stale_task"
    clock.now = T0 + timedelta(hours=1)
    assert deliver(store, tasks, twilio_sender, clock, second.message.id, generation=1).action == "sent"
    assert len(sms_sink.messages()) == 3


def test_quiet_hours_are_rechecked_at_delivery(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    # Planned at 21:59:50 in New York (allowed); the task fires at 22:00:10 (quiet hours).
    planned = datetime(2025, 6, 3, 1, 59, 50, tzinfo=UTC)
    user = make_user(store, "America/New_York")
    result = schedule(store, tasks, user, planned, policy=POLICY)
    assert result.message.scheduled_for == planned
    late = VirtualClock(planned + timedelta(seconds=20))
    outcome = deliver(store, tasks, twilio_sender, late, result.message.id)
    assert (outcome.action, outcome.reason) == ("deferred", "quiet_hours")
    assert outcome.scheduled_for == datetime(2025, 6, 3, 12, 0, tzinfo=UTC)  # 08:00 EDT
    assert sms_sink.messages() == []
    assert row(database_url, result.message.id)["scheduled_for"].startswith("2025-06-03T12:00:00")


def test_twenty_concurrent_deliveries_for_one_user_send_exactly_one(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, "Europe/Berlin", phone="+15551110020")
    # canDelay false plans against sends only, so all twenty are due at the same instant.
    ids = [
        schedule(store, tasks, user, T0, content=f"m{i}", policy=POLICY, canDelay=False).message.id
        for i in range(20)
    ]
    assert {row(database_url, i)["scheduled_for"] for i in ids} == {"2025-06-02T15:00:00+00:00"}
    barrier = threading.Barrier(len(ids))
    outcomes: dict[uuid.UUID, Outcome] = {}
    errors: list[BaseException] = []

    def run(message_id: uuid.UUID) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[message_id] = deliver(store, tasks, twilio_sender, VirtualClock(T0), message_id)
        except BaseException as exc:  # surfaced below: a thread's exception would vanish otherwise
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors

    actions = sorted(o.action for o in outcomes.values())
    assert actions == ["deferred"] * 19 + ["sent"]
    assert len(sms_sink.messages(to="+15551110020")) == 1
    statuses = sql(database_url, "select status, count(*) from message_queue group by status order by status")
    assert statuses == [("queued", 19), ("sent", 1)]
    assert budget(database_url, user) == {"2025-06-02": 1}
    for o in outcomes.values():
        if o.action == "deferred":
            assert o.scheduled_for is not None and o.scheduled_for >= T0 + timedelta(seconds=30)
            assert o.reason in ("cooldown", "in_flight")
            r = row(database_url, o.message_id)
            assert r["task_generation"] == 1 and r["slot_at"] is None and r["attempts"] == 0
            assert [t.generation for t in tasks.for_message(o.message_id)] == [0, 1]


def test_opt_out_is_rechecked_at_delivery(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store)
    result = schedule(store, tasks, user, T0, policy=POLICY)
    sql(database_url, "update users set opted_out_at = %s where id = %s", T0, user)
    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (outcome.action, outcome.reason) == ("failed", "opted_out")
    assert sms_sink.messages() == []
    assert row(database_url, result.message.id)["status"] == "failed"


@pytest.mark.parametrize(
    # 21610 (unsubscribed) fails the message too, and opts the user out: tests/integration/test_consent.py
    ("phone", "code"),
    [("+15005550001", "21211"), ("+15005550002", "21612"), ("+15005550009", "21614")],
)
def test_permanent_twilio_errors_fail_without_retry(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    clock: VirtualClock,
    database_url: str,
    phone: str,
    code: str,
) -> None:
    user = make_user(store, phone=phone)
    result = schedule(store, tasks, user, T0, policy=POLICY)
    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (outcome.action, outcome.reason) == ("failed", f"twilio_{code}")
    r = row(database_url, result.message.id)
    assert r["status"] == "failed" and r["reason"] == f"twilio_{code}" and code in r["last_error"]
    assert r["attempts"] == 1 and r["slot_at"] is None
    # A retried task does not try again.
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).reason == "already_failed"
    assert budget(database_url, user) == {}


# Refusals that prove no message was created (a 5xx proves nothing: the tests after this one).
@pytest.mark.parametrize(("status", "code"), [(429, 20429), (429, None), (401, 20003), (403, 20003)])
def test_transient_twilio_errors_release_the_claim_and_retry(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
    status: int,
    code: int | None,
) -> None:
    user = make_user(store, phone="+15551110030")
    result = schedule(store, tasks, user, T0, policy=POLICY)
    sms_sink.add_fault(status=status, code=code, count=1)
    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert outcome.action == "retry"
    r = row(database_url, result.message.id)
    assert r["status"] == "queued" and r["attempts"] == 1 and r["slot_at"] is None and r["last_error"]
    # The queue retries the same task: it goes out now, once (the failed try used no slot).
    clock.advance(timedelta(seconds=5))
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).action == "sent"
    assert len(sms_sink.messages()) == 1
    assert row(database_url, result.message.id)["attempts"] == 2


def test_a_timeout_after_twilio_accepted_is_reconciled_not_resent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15551110040")
    result = schedule(store, tasks, user, T0, policy=POLICY)
    # Twilio accepts the message but answers after the client's 1 s timeout.
    sms_sink.add_fault(delay_seconds=1.5)
    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (outcome.action, outcome.reason) == ("retry", "outcome_unknown")
    r = row(database_url, result.message.id)
    assert r["status"] == "sending" and r["reason"] == "outcome_unknown"
    sms_sink.wait_for(1, to="+15551110040", timeout=5)
    # A retry before the hold ends sends nothing and keeps the queue retrying.
    clock.advance(timedelta(seconds=5))
    early = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (early.action, early.reason) == ("retry", "awaiting_reconciliation")
    # After it, the retried task asks Twilio, finds the message and records it: one SMS in all.
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds))
    later = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (later.action, later.reason) == ("reconciled", "reconciled_sent")
    [sent] = sms_sink.messages(to="+15551110040")
    r = row(database_url, result.message.id)
    assert r["status"] == "sent" and r["twilio_message_sid"] == sent["sid"]
    assert budget(database_url, user) == {"2025-06-02": 1}
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).reason == "already_sent"
    assert len(sms_sink.messages()) == 1


def test_a_timeout_twilio_never_accepted_is_sent_after_reconciling(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15551110041")
    result = schedule(store, tasks, user, T0, policy=POLICY)
    # No answer in time, and in the end a refusal: Twilio never had it.
    sms_sink.add_fault(status=503, delay_seconds=1.5)
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).reason == "outcome_unknown"
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds + 1))
    reconciled = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (reconciled.action, reconciled.reason) == ("reconciled", "reconciled_requeued")
    r = row(database_url, result.message.id)
    assert r["status"] == "queued" and r["task_generation"] == 1 and r["slot_at"] is None
    assert tasks.for_message(result.message.id)[-1].generation == 1
    sent = deliver(store, tasks, twilio_sender, clock, result.message.id, generation=1)
    assert sent.action == "sent"
    assert len(sms_sink.messages(to="+15551110041")) == 1


def test_attempts_are_bounded(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store)
    result = schedule(store, tasks, user, T0, policy=POLICY)
    sms_sink.add_fault(status=429, count=POLICY.max_attempts)
    actions = [deliver(store, tasks, twilio_sender, clock, result.message.id).action for _ in range(3)]
    assert actions == ["retry", "retry", "failed"]
    r = row(database_url, result.message.id)
    assert (r["status"], r["reason"], r["attempts"]) == ("failed", "attempts_exhausted", 3)
    assert sms_sink.messages() == []


def test_an_expired_message_is_never_sent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store)
    result = schedule(store, tasks, user, T0, policy=POLICY, expiresAt="2025-06-02T15:05:00Z")
    late = VirtualClock(T0 + timedelta(minutes=6))
    outcome = deliver(store, tasks, twilio_sender, late, result.message.id)
    assert (outcome.action, outcome.status) == ("expired", "expired")
    assert sms_sink.messages() == []
    assert row(database_url, result.message.id)["status"] == "expired"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_5xx_after_twilio_created_the_message_is_reconciled_as_sent_never_sent_twice(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
    status: int,
) -> None:
    phone = "+15551110050"
    user = make_user(store, phone=phone)
    result = schedule(store, tasks, user, T0, policy=POLICY)
    # Twilio's API created the message; its edge answered 5xx: the answer is lost, the SMS is not.
    sms_sink.add_fault(status=status, accept=True)
    outcome = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (outcome.action, outcome.reason) == ("retry", "outcome_unknown")
    r = row(database_url, result.message.id)
    assert r["status"] == "sending" and r["reason"] == "outcome_unknown" and r["slot_at"] is not None
    # The queue retries at once: nothing is sent while the hold lasts.
    clock.advance(timedelta(seconds=5))
    early = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (early.action, early.reason) == ("retry", "awaiting_reconciliation")
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds))
    later = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (later.action, later.reason) == ("reconciled", "reconciled_sent")
    [sent] = sms_sink.messages(to=phone)
    r = row(database_url, result.message.id)
    assert r["status"] == "sent" and r["twilio_message_sid"] == sent["sid"]
    assert budget(database_url, user) == {"2025-06-02": 1}
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).reason == "already_sent"
    assert len(sms_sink.messages()) == 1


def test_a_5xx_twilio_never_acted_on_is_sent_once_after_reconciling(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    phone = "+15551110051"
    user = make_user(store, phone=phone)
    result = schedule(store, tasks, user, T0, policy=POLICY)
    sms_sink.add_fault(status=502)  # and this time Twilio really has nothing
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).reason == "outcome_unknown"
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds + 1))
    reconciled = deliver(store, tasks, twilio_sender, clock, result.message.id)
    assert (reconciled.action, reconciled.reason) == ("reconciled", "reconciled_requeued")
    assert deliver(store, tasks, twilio_sender, clock, result.message.id, generation=1).action == "sent"
    assert len(sms_sink.messages(to=phone)) == 1
    assert row(database_url, result.message.id)["status"] == "sent"


def test_a_connection_dropped_after_the_request_is_reconciled_not_resent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    phone = "+15551110052"
    user = make_user(store, phone=phone)
    result = schedule(store, tasks, user, T0, policy=POLICY)
    sms_sink.add_fault(drop=True, accept=True)  # created, then the connection reset: no answer
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).reason == "outcome_unknown"
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds + 1))
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).reason == "reconciled_sent"
    assert len(sms_sink.messages(to=phone)) == 1
    assert row(database_url, result.message.id)["status"] == "sent"


def test_a_refused_connection_gives_the_claim_back_at_once(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15551110053")
    result = schedule(store, tasks, user, T0, policy=POLICY)
    with SmsSink() as gone:
        closed = gone.url  # nothing listens here any more
    client = build_twilio_client(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, base_url=closed, timeout_seconds=1)
    down = TwilioSender(client, from_number=TEST_FROM_NUMBER)
    outcome = deliver(store, tasks, down, clock, result.message.id)
    # No request went out, so there is nothing to reconcile: released, not held for the hold's length.
    assert (outcome.action, outcome.reason) == ("retry", f"twilio_{sms.CONNECT_FAILED}")
    r = row(database_url, result.message.id)
    assert r["status"] == "queued" and r["slot_at"] is None and r["attempts"] == 1
    clock.advance(timedelta(seconds=5))
    assert deliver(store, tasks, twilio_sender, clock, result.message.id).action == "sent"
    assert len(sms_sink.messages()) == 1


@pytest.fixture
def smart_sink() -> Iterator[SmsSink]:
    """A sink whose Messaging Service has Smart Encoding on: it stores the bodies it rewrote."""
    with SmsSink(account_sid=TEST_ACCOUNT_SID, auth_token=TEST_AUTH_TOKEN, smart_encoding=True) as sink:
        yield sink


@pytest.fixture
def service_sender(smart_sink: SmsSink) -> TwilioSender:
    client = build_twilio_client(
        TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, base_url=smart_sink.url, timeout_seconds=1
    )
    return TwilioSender(
        client, messaging_service_sid=TEST_MESSAGING_SERVICE_SID, status_callback=TEST_STATUS_CALLBACK
    )


CURLY = "Your table\u2019s ready \u2013 \u201ctable 4\u201d\u2026"


def test_a_body_twilio_smart_encoded_is_reconciled_as_sent_not_resent(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    service_sender: TwilioSender,
    smart_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    phone = "+15551110060"
    user = make_user(store, phone=phone)
    result = schedule(store, tasks, user, T0, content=CURLY, policy=POLICY)
    assert result.message.content == CURLY  # SMART_ENCODING is off here: we send the curly text
    smart_sink.add_fault(status=502, accept=True)
    assert deliver(store, tasks, service_sender, clock, result.message.id).reason == "outcome_unknown"
    [stored] = smart_sink.messages(to=phone)
    assert stored["body"] == 'Your table\'s ready - "table 4"...'  # not the text we sent
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds + 1))
    later = deliver(store, tasks, service_sender, clock, result.message.id)
    assert (later.action, later.reason) == ("reconciled", "reconciled_sent")
    assert row(database_url, result.message.id)["twilio_message_sid"] == stored["sid"]
    assert len(smart_sink.messages()) == 1


def test_another_message_to_the_same_number_in_the_window_is_not_taken_for_ours(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    service_sender: TwilioSender,
    smart_sink: SmsSink,
    clock: VirtualClock,
    database_url: str,
) -> None:
    phone = "+15551110061"
    user = make_user(store, phone=phone)
    result = schedule(store, tasks, user, T0, content=CURLY, policy=POLICY)
    smart_sink.add_fault(status=503)  # Twilio never got ours...
    assert deliver(store, tasks, service_sender, clock, result.message.id).reason == "outcome_unknown"
    # ...but someone else texted the same number meanwhile, a text that differs by one character.
    other = service_sender.send(phone, CURLY.replace("4", "5"), message_id=uuid.uuid4())
    clock.advance(timedelta(seconds=POLICY.reconcile_after_seconds + 1))
    reconciled = deliver(store, tasks, service_sender, clock, result.message.id)
    assert (reconciled.action, reconciled.reason) == ("reconciled", "reconciled_requeued")
    sent = deliver(store, tasks, service_sender, clock, result.message.id, generation=1)
    assert sent.action == "sent" and sent.sid != other
    assert [m["body"] for m in smart_sink.messages(to=phone)] == [
        'Your table\'s ready - "table 5"...',
        'Your table\'s ready - "table 4"...',
    ]
