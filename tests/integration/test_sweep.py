"""The sweep and the faults it exists for, on real Postgres with the real twilio client and the SMS
sink: lost tasks, a process dying around Twilio's accept, the database going away mid-delivery,
duplicate and racing deliveries. Each fault test ends with one SMS at the sink and the row's state."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared import service, web
from shared.dev.sink import SmsSink
from shared.domain import Limits
from shared.errors import StoreUnavailable
from shared.models import Outcome
from shared.sms import TwilioSender
from shared.store.postgres import PostgresStore
from tests.support.constants import T0
from tests.support.factories import budget, make_user, row, schedule, sql
from tests.support.fakes import RecordingPublisher, RecordingTaskQueue, VirtualClock

POLICY = service.Policy(limits=Limits(), max_attempts=3, lease_seconds=120, sweep_grace_seconds=120)


class Crash(BaseException):
    """The instance dies here (BaseException: nothing in the service may catch it)."""


class CrashAfterSend:
    """Twilio accepts the message, then the process dies before it can record anything."""

    def __init__(self, inner: TwilioSender) -> None:
        self.inner = inner

    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        self.inner.send(to, body, message_id=message_id)
        raise Crash

    def find_sent(self, to: str, body: str, *, since: datetime) -> Any:
        return self.inner.find_sent(to, body, since=since)


class CrashBeforeSend(CrashAfterSend):
    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        raise Crash


class FlakyStore:
    """The real store, except that the named method finds the database gone (`times` times)."""

    def __init__(self, inner: PostgresStore, method: str, times: int = 1_000_000) -> None:
        self.inner, self.method, self.times = inner, method, times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def failing(*args: Any, **kwargs: Any) -> Any:
            if self.times > 0:
                self.times -= 1
                raise StoreUnavailable()
            return attr(*args, **kwargs)

        return failing


@pytest.fixture
def store_pool_size() -> int:
    """Deliveries and sweeps race on their own threads."""
    return 8


def deliver(
    store: Any, tasks: RecordingTaskQueue, sms: Any, at: datetime, mid: uuid.UUID, gen: int = 0
) -> Outcome:
    return service.deliver(
        {"messageId": str(mid), "generation": gen},
        store=store,
        tasks=tasks,
        sms=sms,
        config=POLICY,
        clock=VirtualClock(at),
    )


def sweep(
    store: Any, tasks: RecordingTaskQueue, sms: Any, at: datetime, config: service.Policy = POLICY
) -> Any:
    return service.sweep(
        store=store, tasks=tasks, sms=sms, config=config, clock=VirtualClock(at), trigger="test"
    )


def test_a_lost_task_is_recreated_by_the_sweep_and_the_old_one_goes_stale(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220001")
    mid = schedule(store, tasks, user, T0, policy=POLICY).message.id
    tasks.tasks.clear()  # the task is lost
    assert (
        sweep(store, tasks, twilio_sender, T0 + timedelta(seconds=60)).overdue_requeued == 0
    )  # within grace
    report = sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=3))
    assert report.overdue_requeued == 1
    assert [(t.generation, t.at) for t in tasks.for_message(mid)] == [(1, T0 + timedelta(minutes=3))]
    # Just swept (updated_at moved): the next minute's sweep leaves it alone.
    assert sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=4)).overdue_requeued == 0
    # If the lost task turns up after all, it is stale; the new one sends.
    assert deliver(store, tasks, twilio_sender, T0 + timedelta(minutes=3), mid, 0).reason == "stale_task"
    assert deliver(store, tasks, twilio_sender, T0 + timedelta(minutes=3), mid, 1).action == "sent"
    assert len(sms_sink.messages(to="+15552220001")) == 1
    assert row(database_url, mid)["status"] == "sent"
    runs = sql(database_url, "select trigger, counts->>'overdue_requeued' from sweep_runs order by id")
    assert runs == [("test", "0"), ("test", "1"), ("test", "0")]
    actions = sql(database_url, "select action_type from agent_actions_log where message_id = %s", mid)
    assert sorted(a for (a,) in actions) == ["scheduled", "sent", "task_recreated"]


def test_a_message_beyond_the_task_horizon_gets_its_task_when_it_comes_in_range(
    store: PostgresStore, twilio_sender: TwilioSender, database_url: str
) -> None:
    # A one-hour horizon stands in for Cloud Tasks' 30 days.
    tasks = RecordingTaskQueue(horizon=timedelta(hours=1))
    config = service.Policy(limits=Limits(), task_horizon_seconds=3600)
    user = make_user(store, "America/New_York")
    night = datetime(2025, 6, 3, 3, 0, tzinfo=UTC)  # 23:00 in New York: planned for 08:00, 9 h away
    result = schedule(store, tasks, user, night, policy=config)
    assert result.message.scheduled_for == datetime(2025, 6, 3, 12, 0, tzinfo=UTC)
    assert tasks.tasks == []
    assert sweep(store, tasks, twilio_sender, night + timedelta(hours=7), config).horizon_tasked == 0
    report = sweep(store, tasks, twilio_sender, night + timedelta(hours=8, minutes=30), config)
    assert report.horizon_tasked == 1
    assert [(t.generation, t.at) for t in tasks.tasks] == [(0, datetime(2025, 6, 3, 12, 0, tzinfo=UTC))]
    assert (
        sweep(store, tasks, twilio_sender, night + timedelta(hours=8, minutes=31), config).horizon_tasked == 0
    )


def test_a_process_dying_after_twilio_accepted_is_reconciled_without_a_resend(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220002")
    mid = schedule(store, tasks, user, T0, policy=POLICY).message.id
    with pytest.raises(Crash):
        deliver(store, tasks, CrashAfterSend(twilio_sender), T0, mid)
    assert row(database_url, mid)["status"] == "sending"
    # Cloud Tasks retries the dead request: the claim is still leased, so nothing is sent.
    retried = deliver(store, tasks, twilio_sender, T0 + timedelta(seconds=20), mid)
    assert (retried.action, retried.reason) == ("skipped", "in_flight")
    assert sweep(store, tasks, twilio_sender, T0 + timedelta(seconds=60)).reconciled_sent == 0
    report = sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=3))
    assert (report.reconciled_sent, report.reconciled_requeued) == (1, 0)
    [sent] = sms_sink.messages(to="+15552220002")
    r = row(database_url, mid)
    assert r["status"] == "sent" and r["twilio_message_sid"] == sent["sid"] and r["claim_token"] is None
    assert budget(database_url, user) == {"2025-06-02": 1}
    actions = sql(database_url, "select action_type from agent_actions_log where message_id = %s", mid)
    assert sorted(a for (a,) in actions) == ["reconciled", "scheduled"]


def test_a_process_dying_before_twilio_got_it_is_requeued_and_sent_once(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220003")
    mid = schedule(store, tasks, user, T0, policy=POLICY).message.id
    with pytest.raises(Crash):
        deliver(store, tasks, CrashBeforeSend(twilio_sender), T0, mid)
    report = sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=3))
    assert (report.reconciled_sent, report.reconciled_requeued) == (0, 1)
    r = row(database_url, mid)
    assert r["status"] == "queued" and r["task_generation"] == 1 and r["slot_at"] is None
    assert deliver(store, tasks, twilio_sender, T0 + timedelta(minutes=3), mid, 1).action == "sent"
    assert len(sms_sink.messages(to="+15552220003")) == 1
    assert row(database_url, mid)["status"] == "sent"


def test_the_database_going_away_after_twilio_accepted_loses_nothing(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220004")
    mid = schedule(store, tasks, user, T0, policy=POLICY).message.id
    flaky = FlakyStore(store, "record_sent")
    with pytest.raises(StoreUnavailable):  # the HTTP layer answers 503
        deliver(flaky, tasks, twilio_sender, T0, mid)
    assert row(database_url, mid)["status"] == "sending"
    report = sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=3))
    assert report.reconciled_sent == 1
    [sent] = sms_sink.messages(to="+15552220004")
    assert row(database_url, mid)["twilio_message_sid"] == sent["sid"]


def test_the_database_down_before_the_claim_sends_nothing_and_the_retry_sends(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220005")
    mid = schedule(store, tasks, user, T0, policy=POLICY).message.id
    with pytest.raises(StoreUnavailable):
        deliver(FlakyStore(store, "claim"), tasks, twilio_sender, T0, mid)
    assert sms_sink.messages() == [] and row(database_url, mid)["status"] == "queued"
    assert deliver(store, tasks, twilio_sender, T0 + timedelta(seconds=10), mid).action == "sent"
    assert len(sms_sink.messages(to="+15552220005")) == 1


def test_the_same_task_delivered_twice_at_once_sends_once(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220006")
    mid = schedule(store, tasks, user, T0, policy=POLICY).message.id
    barrier = threading.Barrier(2)
    outcomes: list[Outcome] = []

    def run() -> None:
        barrier.wait(timeout=10)
        outcomes.append(deliver(store, tasks, twilio_sender, T0, mid))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(o.action for o in outcomes) in (["sent", "skipped"], ["deferred", "sent"])
    assert len(sms_sink.messages(to="+15552220006")) == 1
    assert row(database_url, mid)["status"] == "sent"


def test_a_sweep_racing_a_delivery_leaves_the_claim_alone(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store, phone="+15552220007")
    mid = schedule(store, tasks, user, T0 - timedelta(minutes=10), policy=POLICY).message.id
    swept: list[Any] = []

    class SweepDuringSend:
        """While Twilio is being called for the overdue message, the minute's sweep runs."""

        def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
            swept.append(sweep(store, tasks, twilio_sender, T0))
            return twilio_sender.send(to, body, message_id=message_id)

        def find_sent(self, to: str, body: str, *, since: datetime) -> Any:
            return twilio_sender.find_sent(to, body, since=since)

    assert deliver(store, tasks, SweepDuringSend(), T0, mid).action == "sent"
    [report] = swept
    assert (report.overdue_requeued, report.reconciled_sent, report.reconciled_requeued) == (0, 0, 0)
    assert len(sms_sink.messages(to="+15552220007")) == 1
    assert row(database_url, mid)["status"] == "sent"


def test_two_sweeps_at_once_take_each_row_once(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender, database_url: str
) -> None:
    users = [make_user(store) for _ in range(40)]
    mids = [schedule(store, tasks, u, T0, policy=POLICY).message.id for u in users]
    tasks.tasks.clear()
    small = service.Policy(limits=Limits(), sweep_batch=7)
    barrier = threading.Barrier(2)
    reports: list[Any] = []

    def run() -> None:
        barrier.wait(timeout=10)
        reports.append(sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=5), small))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(r.overdue_requeued for r in reports) == 40
    assert sorted(t.message_id for t in tasks.tasks) == sorted(mids)
    assert sql(database_url, "select distinct task_generation from message_queue") == [(1,)]


def test_the_sweep_expires_what_can_no_longer_go_out(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
) -> None:
    user = make_user(store)
    mid = schedule(store, tasks, user, T0, policy=POLICY, expiresAt="2025-06-02T15:10:00Z").message.id
    assert sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=5)).expired == 0
    assert sweep(store, tasks, twilio_sender, T0 + timedelta(minutes=11)).expired == 1
    assert row(database_url, mid)["status"] == "expired"
    assert deliver(store, tasks, twilio_sender, T0 + timedelta(minutes=12), mid).reason == "already_expired"
    assert sms_sink.messages() == []


def test_health_reports_the_queue_and_the_sweep(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender
) -> None:
    status, body = web.health_answer(service.health(store=store, config=POLICY, now=T0))
    assert (status, body["status"], body["reason"]) == (503, "unhealthy", "no_sweep_yet")
    user = make_user(store)
    schedule(store, tasks, user, T0 - timedelta(minutes=2), policy=POLICY)
    sweep(store, tasks, twilio_sender, T0)
    status, body = web.health_answer(
        service.health(store=store, config=POLICY, now=T0 + timedelta(minutes=1))
    )
    assert status == 200 and body["status"] == "healthy" and body["service"] == "message-orchestrator"
    stats = body["stats"]
    assert stats["messagesQueued"] == 1 and stats["processorRunning"] is True
    assert stats["lastProcessTime"] == "2025-06-02T15:00:00.000Z"
    assert stats["oldestOverdueSeconds"] == 180.0
    status, body = web.health_answer(
        service.health(store=store, config=POLICY, now=T0 + timedelta(minutes=6))
    )
    assert (status, body["reason"], body["stats"]["processorRunning"]) == (503, "sweep_stale", False)
    dead = PostgresStore("postgresql://postgres@127.0.0.1:1/none", timeout=0.5)
    try:
        status, body = web.health_answer(service.health(store=dead, config=POLICY, now=T0))
        assert (status, body["reason"]) == (503, "database_unavailable")
    finally:
        dead.close()


class SlowTaskQueue(RecordingTaskQueue):
    """Cloud Tasks with a network round trip per call: counts how many calls were in flight at once,
    and fails the creation for some messages."""

    def __init__(self, fail_for: set[uuid.UUID]) -> None:
        super().__init__()
        self.fail_for = fail_for
        self.in_flight = 0
        self.most_in_flight = 0
        self._gate = threading.Lock()

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        from shared.errors import Unavailable

        with self._gate:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            threading.Event().wait(0.02)
            if message_id in self.fail_for:
                raise Unavailable("injected create failure")
            return super().schedule(message_id, generation, at, now)
        finally:
            with self._gate:
                self.in_flight -= 1


def test_a_batch_of_lost_tasks_is_recreated_several_at_a_time_and_failures_are_counted(
    store: PostgresStore, twilio_sender: TwilioSender
) -> None:
    ids = []
    for i in range(24):
        user = make_user(store, phone=f"+1555444{i:04d}")
        ids.append(schedule(store, RecordingTaskQueue(), user, T0, policy=POLICY).message.id)
    slow = SlowTaskQueue(fail_for=set(ids[:3]))
    config = service.Policy(limits=Limits(), sweep_grace_seconds=120, sweep_task_concurrency=8)

    report = sweep(store, slow, twilio_sender, T0 + timedelta(minutes=3), config)

    assert report.overdue_requeued == 24 and report.task_errors == 3
    assert {t.message_id for t in slow.tasks} == set(ids[3:])
    assert all(t.generation == 1 for t in slow.tasks)
    assert slow.most_in_flight > 1  # several Cloud Tasks calls were in flight together


def _bad_timezone(database_url: str, user: uuid.UUID) -> None:
    """A timezone that is not an IANA name, written by hand (the API refuses it)."""
    sql(database_url, "update users set timezone = 'America/NewYork' where id = %s", user)


@pytest.mark.parametrize("twilio_had_it", [True, False])
def test_a_held_claim_of_a_user_with_an_unknown_timezone_does_not_stop_the_sweep(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    database_url: str,
    twilio_had_it: bool,
) -> None:
    bad = make_user(store, phone="+15552230001")
    held = schedule(store, tasks, bad, T0, policy=POLICY).message.id
    with pytest.raises(Crash):
        deliver(store, tasks, (CrashAfterSend if twilio_had_it else CrashBeforeSend)(twilio_sender), T0, held)
    _bad_timezone(database_url, bad)
    other = make_user(store, phone="+15552230002")
    lost = schedule(store, tasks, other, T0, policy=POLICY).message.id
    tasks.tasks.clear()  # the other user's task is lost
    store.inbound("+15552230003", "hello?", "SM" + uuid.uuid4().hex, keyword=None, num_media=0, now=T0)
    publisher = RecordingPublisher()

    at = T0 + timedelta(minutes=3)
    report = service.sweep(
        store=store,
        tasks=tasks,
        sms=twilio_sender,
        config=POLICY,
        clock=VirtualClock(at),
        trigger="test",
        events=publisher,
    )

    # The rest of the sweep went on: the lost task re-created, the outbox drained.
    assert report.overdue_requeued == 1 and [t.generation for t in tasks.for_message(lost)] == [1]
    assert report.events_published >= 1 and publisher.published
    assert sql(database_url, "select count(*) from events_outbox where published_at is null") == [(0,)]
    r = row(database_url, held)
    if twilio_had_it:
        # It went out: recorded with Twilio's sid (never failed, which would invite a resend), its
        # send counted on the UTC date for want of a local one.
        [sent] = sms_sink.messages(to="+15552230001")
        assert report.reconciled_sent == 1
        assert (r["status"], r["twilio_message_sid"]) == ("sent", sent["sid"])
        assert budget(database_url, bad) == {"2025-06-02": 1}
    else:
        # Twilio never got it: queued again, and its delivery fails it with invalid_timezone.
        assert report.reconciled_requeued == 1 and r["status"] == "queued"
        outcome = deliver(store, tasks, twilio_sender, at, held, r["task_generation"])
        assert (outcome.action, outcome.reason) == ("failed", "invalid_timezone")
        assert row(database_url, held)["status"] == "failed"
        assert sms_sink.messages(to="+15552230001") == []
    assert sql(database_url, "select count(*) from sweep_runs") == [(1,)]


class FaultySms:
    """The real twilio client, except that asking Twilio about one number raises `error`."""

    def __init__(self, inner: TwilioSender, phone: str, error: Exception) -> None:
        self.inner, self.phone, self.error = inner, phone, error

    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        return self.inner.send(to, body, message_id=message_id)

    def find_sent(self, to: str, body: str, *, since: datetime) -> Any:
        if to == self.phone:
            raise self.error
        return self.inner.find_sent(to, body, since=since)


class FaultyTasks(RecordingTaskQueue):
    """Cloud Tasks whose creation raises a non-outage error for one message."""

    def __init__(self, bad: set[uuid.UUID]) -> None:
        super().__init__()
        self.bad = bad

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        if message_id in self.bad:
            raise ValueError("injected: a task name the queue refuses")
        return super().schedule(message_id, generation, at, now)


def _crashed_claim(
    store: PostgresStore, tasks: RecordingTaskQueue, sms: TwilioSender, phone: str
) -> uuid.UUID:
    user = make_user(store, phone=phone)
    mid = schedule(store, tasks, user, T0, policy=POLICY).message.id
    with pytest.raises(Crash):
        deliver(store, tasks, CrashAfterSend(sms), T0, mid)
    return mid


def test_a_row_whose_step_raises_is_isolated_in_every_stage_and_the_batch_goes_on(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from shared.policy import UnknownTimezone

    # Reconcile: one claim's Twilio lookup raises a bug, another's a timezone error, a third is fine.
    buggy = _crashed_claim(store, tasks, twilio_sender, "+15552240001")
    tz = _crashed_claim(store, tasks, twilio_sender, "+15552240002")
    fine = _crashed_claim(store, tasks, twilio_sender, "+15552240003")
    sms = FaultySms(twilio_sender, "+15552240001", RuntimeError("injected: unreadable answer"))
    tz_sms = FaultySms(sms, "+15552240002", UnknownTimezone("unknown timezone 'America/NewYork'"))
    # Re-tasking: one overdue row's task creation raises, the other's works.
    lost = [schedule(store, tasks, make_user(store), T0, policy=POLICY).message.id for _ in range(2)]
    queue = FaultyTasks(bad={lost[0]})
    # Draining: one event makes its publish raise, the others go out.
    for n in range(3):
        body = "poison" if n == 1 else f"hello {n}"
        store.inbound(f"+155522410{n:02d}", body, "SM" + uuid.uuid4().hex, keyword=None, num_media=0, now=T0)
    publisher = RecordingPublisher(refuse=b"poison")

    report = service.sweep(
        store=store,
        tasks=queue,
        sms=tz_sms,
        config=POLICY,
        clock=VirtualClock(T0 + timedelta(minutes=3)),
        trigger="test",
        events=publisher,
    )

    assert report.reconciled_sent == 1 and row(database_url, fine)["status"] == "sent"
    assert row(database_url, buggy)["status"] == "sending"  # left for the next sweep
    assert (row(database_url, tz)["status"], row(database_url, tz)["reason"]) == (
        "failed",
        "invalid_timezone",
    )
    assert report.overdue_requeued == 2 and [t.message_id for t in queue.tasks] == [lost[1]]
    assert report.events_published == 4  # two inbound, fine's message.sent, tz's message.failed
    assert report.row_errors == 4 and report.task_errors == 0
    [(error,)] = sql(database_url, "select last_error from events_outbox where published_at is null")
    assert error.startswith("TypeError")
    logged = [r for r in caplog.records if r.getMessage().startswith("sweep: row failed")]
    ids = sorted(r.fields["messageId"] for r in logged)  # type: ignore[attr-defined]
    assert ids == sorted(str(m) for m in (buggy, tz, lost[0]))  # once each, with its error
    assert all(r.fields["error"] for r in logged)  # type: ignore[attr-defined]
    # The run counts as done: health sees a working sweep.
    assert sql(database_url, "select counts->>'row_errors' from sweep_runs") == [("4",)]
    # The next sweep, after the lease, tries the left row again.
    later = service.sweep(
        store=store,
        tasks=queue,
        sms=twilio_sender,
        config=POLICY,
        clock=VirtualClock(T0 + timedelta(minutes=6)),
        trigger="test",
    )
    assert later.reconciled_sent == 1 and row(database_url, buggy)["status"] == "sent"


class FailingStore(FlakyStore):
    """The real store, except that the named method raises `error` every time."""

    def __init__(self, inner: PostgresStore, method: str, error: Exception) -> None:
        super().__init__(inner, method)
        self.error = error

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise self.error

        return failing


@pytest.mark.parametrize("method", ["take_stale_claims", "sweep_overdue", "events_pending"])
def test_a_database_outage_still_aborts_the_sweep(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    twilio_sender: TwilioSender,
    database_url: str,
    method: str,
) -> None:
    lost = schedule(store, tasks, make_user(store), T0, policy=POLICY).message.id
    tasks.tasks.clear()
    with pytest.raises(StoreUnavailable):
        service.sweep(
            store=FailingStore(store, method, StoreUnavailable()),
            tasks=tasks,
            sms=twilio_sender,
            config=POLICY,
            clock=VirtualClock(T0 + timedelta(minutes=3)),
            trigger="test",
            events=RecordingPublisher(),
        )
    assert sql(database_url, "select count(*) from sweep_runs") == [(0,)]
    if method == "take_stale_claims":  # aborted before re-tasking
        assert tasks.for_message(lost) == [] and row(database_url, lost)["task_generation"] == 0


def test_a_stage_whose_batch_call_fails_does_not_skip_the_others(
    store: PostgresStore, tasks: RecordingTaskQueue, twilio_sender: TwilioSender, database_url: str
) -> None:
    from shared.errors import StoreError

    lost = schedule(store, tasks, make_user(store), T0, policy=POLICY).message.id
    tasks.tasks.clear()
    with pytest.raises(StoreError):
        service.sweep(
            store=FailingStore(store, "sweep_expire", StoreError("injected: rejected")),
            tasks=tasks,
            sms=twilio_sender,
            config=POLICY,
            clock=VirtualClock(T0 + timedelta(minutes=3)),
            trigger="test",
        )
    assert [t.generation for t in tasks.for_message(lost)] == [1]  # re-tasking still ran
    assert sql(database_url, "select count(*) from sweep_runs") == [(0,)]  # but not a working run
