"""Soak: a week of bursty traffic for 1,000 users in ten timezones, through the real use cases and
real Postgres, on a virtual clock, with Twilio faults and lost Cloud Tasks.

The run starts on 2025-03-03 (a Monday), so the US DST change of 2025-03-09 is inside it. Agents
send bursts of 1-6 messages of mixed priority (some canDelay false, some with expiresAt, some sent
twice with one idempotency key); users write to us at any hour, and a support agent answers, so the
"user is active" exception is exercised at night. Cloud Tasks (in process) loses, duplicates and
jitters tasks and retries failed attempts with backoff; Twilio (in process) answers 500/429,
refuses a few numbers for good, times out after or without accepting, and instances die around the
call. The sweep runs every virtual minute. After the week the clock runs on until nothing is left
to do, and then the run is judged from the database and Twilio's record only (harness.judge):
every limit on what was actually sent, no message sent twice, and the accounting identity.

`pytest tests/soak -s` prints the summary. SOAK_USERS, SOAK_DAYS, SOAK_SEED and SOAK_WORKERS
change the run, SOAK_STRESS=1 makes it a short one with many more faults (the thresholds on how
much was exercised apply to the full-size run only).
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest

from shared import service
from shared.domain import Limits
from shared.errors import NotDeliverable, Unavailable
from shared.store.postgres import PostgresStore
from tests.soak.harness import (
    FAULTS,
    ClockTaskQueue,
    EventLanes,
    FakeTwilio,
    Inbound,
    InstanceCrash,
    Judgement,
    LaneClock,
    SafeCounter,
    ScheduleCall,
    Task,
    TrafficPlan,
    TrafficShape,
    TwilioFaults,
    judge,
    make_users,
)
from tests.support.factories import make_user, sql
from tests.support.fakes import RecordingTaskQueue, VirtualClock

pytestmark = [pytest.mark.soak, pytest.mark.xdist_group("soak")]

START = datetime(2025, 3, 3, tzinfo=UTC)
TICK = timedelta(minutes=1)  # the sweep's period (Cloud Scheduler)
# Every soak agent may send urgent messages in quiet hours (URGENT_AGENTS=*): the run checks that
# urgent ones do go out then, and that nothing else does.
POLICY = service.Policy(limits=Limits(), urgent_agents=frozenset({"*"}))


@dataclass(frozen=True)
class SoakConfig:
    users: int = 1000
    days: int = 7
    seed: int = 20250303
    workers: int = 2
    lose: float = 0.02  # tasks that never fire
    duplicate: float = 0.01  # tasks that fire twice
    create_failure: float = 0.002  # task creates that fail (Unavailable)
    max_drain: timedelta = timedelta(hours=24)
    shape: TrafficShape = field(default_factory=TrafficShape)
    faults: TwilioFaults = field(default_factory=TwilioFaults)

    @classmethod
    def stress(cls) -> SoakConfig:
        """Fewer users, far more traffic and faults: for hunting bugs (SOAK_STRESS=1)."""
        return cls(
            users=200,
            days=3,
            lose=0.1,
            duplicate=0.05,
            create_failure=0.02,
            max_drain=timedelta(hours=12),
            shape=TrafficShape(bursts_per_day=1.0, conversations_per_day=1.0),
            faults=TwilioFaults(
                server_error=0.05,
                server_error_accepted=0.03,
                rate_limited=0.05,
                timeout_accepted=0.05,
                timeout_lost=0.05,
                crash_after_accept=0.02,
                crash_before_send=0.02,
                lookup_unavailable=0.2,
            ),
        )

    @classmethod
    def from_env(cls) -> SoakConfig:
        env = os.environ
        base = cls.stress() if env.get("SOAK_STRESS") == "1" else cls()
        return replace(
            base,
            users=int(env.get("SOAK_USERS", base.users)),
            days=int(env.get("SOAK_DAYS", base.days)),
            seed=int(env.get("SOAK_SEED", base.seed)),
            workers=int(env.get("SOAK_WORKERS", base.workers)),
        )

    @property
    def full_size(self) -> bool:
        return self.users >= 1000 and self.days >= 7


class LogTally(logging.Handler):
    """Counts the service's log records by level (the soak silences their output)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.critical: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1
        if record.levelno >= logging.CRITICAL:
            self.critical.append(f"{record.getMessage()} {getattr(record, 'fields', '')}")


class Soak:
    """The driver: one virtual clock, minute by minute; in each minute every user's events in time
    order (users side by side on `workers` threads), then the sweep at the minute's end."""

    def __init__(self, store: PostgresStore, cfg: SoakConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.clock = LaneClock(START)
        self.lanes = EventLanes()
        self.users = make_users(cfg.users, random.Random(cfg.seed))
        self.rngs = [random.Random(cfg.seed * 104_729 + u.lane) for u in self.users]
        self.owner: dict[uuid.UUID, int] = {}
        self.accepted_keys: set[str] = set()
        phone_lane = {u.phone: u.lane for u in self.users}
        self.queue = ClockTaskQueue(
            self.lanes,
            lane_of=self._lane_of,
            rng_of=self.rngs.__getitem__,
            lose=cfg.lose,
            duplicate=cfg.duplicate,
            create_failure=cfg.create_failure,
        )
        self.twilio = FakeTwilio(
            self.clock,
            rng_of_phone=lambda phone: self.rngs[phone_lane[phone]],
            permanent={u.phone: u.permanent_code for u in self.users if u.permanent_code},
            faults=cfg.faults,
        )
        self.stats = SafeCounter()
        self.sweep_counts: Counter[str] = Counter()
        self.end = START + timedelta(days=cfg.days)
        self.finished_at = START

    def _lane_of(self, message_id: uuid.UUID) -> int:
        lane = self.owner.get(message_id)
        if lane is None:  # created inside schedule(), before it returned the id: this thread's user
            lane = self.clock.lane
        assert lane is not None, f"task for unknown message {message_id}"
        return lane

    def setup(self) -> Counter[str]:
        for u in self.users:
            self.store.upsert_user(u.phone, u.timezone, id=u.id, **u.settings)
        plan = TrafficPlan(self.users, START, self.cfg.days, self.cfg.shape, self.cfg.seed)
        for lane, at, kind, payload in plan.events:
            self.lanes.push(lane, at, kind, payload)
        return plan.counts()

    # One user's events -------------------------------------------------------------------------

    def run_lane(self, lane: int, before: datetime) -> None:
        self.clock.lane = lane
        while (ev := self.lanes.pop_before(lane, before)) is not None:
            self.clock.now = ev.at
            if ev.kind == "task":
                self._deliver(lane, ev.payload)
            elif ev.kind == "schedule":
                self._schedule(lane, ev.payload)
            else:
                self._inbound(lane, ev.payload)
        self.clock.lane = None

    def _schedule(self, lane: int, call: ScheduleCall) -> None:
        self.stats.add("schedule_calls")
        key = call.body["idempotencyKey"]
        try:
            result = service.schedule(
                call.body, store=self.store, tasks=self.queue, config=POLICY, now=self.clock()
            )
        except NotDeliverable:
            self.stats.add("rejected_422")
            return
        if not result.created:
            self.stats.add("replayed_200")
            if key not in self.accepted_keys:
                self.stats.add("replay_without_original")
            return
        if key in self.accepted_keys:
            self.stats.add("accepted_twice")
        self.accepted_keys.add(key)
        self.owner[result.message.id] = lane
        self.stats.add("accepted_201")

    def _inbound(self, lane: int, msg: Inbound) -> None:
        self.stats.add("inbound")
        self.store.record_inbound(self.users[lane].id, msg.body, msg.sid, self.clock())

    def _deliver(self, lane: int, task: Task) -> None:
        self.stats.add("deliveries")
        now = self.clock()
        try:
            outcome = service.deliver(
                task.body(),
                store=self.store,
                tasks=self.queue,
                sms=self.twilio,
                config=POLICY,
                clock=self.clock,
            )
        except InstanceCrash:
            # The instance died mid-request: Cloud Tasks sees no answer and retries with backoff.
            self.stats.add("crashes")
            self.queue.retry(lane, task, now)
            return
        except Unavailable:
            self.stats.add("deliver_5xx")
            self.queue.retry(lane, task, now)
            return
        self.stats.add(f"action_{outcome.action}")
        if outcome.action == "deferred":
            self.stats.add("deferrals")
        elif outcome.action == "reconciled":
            self.stats.add(f"deliver_{outcome.reason}")
        elif outcome.action == "retry":
            self.queue.retry(lane, task, now)

    # The loop ----------------------------------------------------------------------------------

    def sweep(self) -> None:
        report = service.sweep(
            store=self.store,
            tasks=self.queue,
            sms=self.twilio,
            config=POLICY,
            clock=self.clock,
            trigger="soak",
        )
        self.stats.add("sweeps")
        self.sweep_counts.update(report.counts())

    def open_rows(self, database_url: str) -> int:
        [(n,)] = sql(database_url, "select count(*) from message_queue where status in ('queued', 'sending')")
        return int(n)

    def run(self, database_url: str) -> None:
        t = START
        idle_since: datetime | None = None
        with ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="soak") as pool:
            while True:
                nxt = t + TICK
                lanes = self.lanes.lanes_before(nxt)
                if len(lanes) == 1 or self.cfg.workers == 1:
                    for lane in lanes:
                        self.run_lane(lane, nxt)
                elif lanes:
                    list(pool.map(partial(self.run_lane, before=nxt), lanes))
                self.clock.now = nxt
                self.sweep()
                t = nxt
                if t < self.end or (t - START) % timedelta(minutes=10):
                    continue
                # After the week: run on until nothing is queued, sending or due, then 10 more minutes
                # (at most max_drain: users with a daily limit of 3 may hold a backlog for days).
                if self.open_rows(database_url) == 0 and self.lanes.pending() == 0:
                    idle_since = idle_since or t
                    if t - idle_since >= timedelta(minutes=10):
                        break
                else:
                    idle_since = None
                if t >= self.end + self.cfg.max_drain:
                    break
        self.finished_at = t


@pytest.fixture
def store(database_url: str) -> Iterator[PostgresStore]:
    # Commits need not wait for the WAL flush: the same SQL, the same transactions and the same
    # isolation, only not durable across a crash of the database server, which this run never has.
    # It saves the soak a WAL flush per write (about a quarter of its time here).
    [(name,)] = sql(database_url, "select current_database()")
    sql(database_url, f"alter database {name} set synchronous_commit = off")
    s = PostgresStore(database_url, max_size=SoakConfig.from_env().workers + 2)
    yield s
    s.close()


@pytest.fixture
def quiet_service_logs() -> Iterator[LogTally]:
    """The service logs every decision; the soak counts them instead of formatting ~100k records."""
    logger = logging.getLogger("orchestrator")
    tally = LogTally()
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(tally)
    yield tally
    logger.removeHandler(tally)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def summary(
    soak: Soak, plan: Counter[str], j: Judgement, wall: float, logs: LogTally
) -> list[tuple[str, object]]:
    s = soak.stats.snapshot()
    q = soak.queue.stats.snapshot()
    tw = soak.twilio.stats.snapshot()
    sw = soak.sweep_counts
    st = j.statuses
    reconciled = (
        sw["reconciled_sent"]
        + sw["reconciled_requeued"]
        + s["deliver_reconciled_sent"]
        + s["deliver_reconciled_requeued"]
    )
    return [
        ("users / timezones", f"{len(soak.users)} / {len({u.timezone for u in soak.users})}"),
        ("virtual time", f"{START:%Y-%m-%d} .. {soak.finished_at:%Y-%m-%d %H:%M} UTC"),
        ("schedule calls (replays)", f"{s['schedule_calls']} ({plan['replays']})"),
        ("messages accepted (201)", s["accepted_201"]),
        ("idempotent replays (200)", s["replayed_200"]),
        ("rejected (422, expires first)", s["rejected_422"]),
        ("sent", st["sent"]),
        ("failed", st["failed"]),
        ("expired", st["expired"]),
        ("superseded / cancelled", f"{st['superseded']} / {st['cancelled']}"),
        ("still queued / sending", f"{st['queued']} / {st['sending']}"),
        ("inbound messages", s["inbound"]),
        ("deliveries (deliver calls)", s["deliveries"]),
        ("deferrals", s["deferrals"]),
        ("retries (queue backoff)", q["retried"]),
        (
            "reconciliations (sent/requeued)",
            f"{reconciled} ({sw['reconciled_sent'] + s['deliver_reconciled_sent']}"
            f"/{sw['reconciled_requeued'] + s['deliver_reconciled_requeued']})",
        ),
        ("sweeps (overdue re-tasked)", f"{s['sweeps']} ({sw['overdue_requeued']})"),
        ("tasks created / lost / duplicated", f"{q['created']} / {q['lost']} / {q['duplicated']}"),
        ("task creates failed", q["create_failed"]),
        ("Twilio faults injected", soak.twilio.faults_injected()),
        (
            "  5xx lost / after create, 429",
            f"{tw['server_error']} / {tw['server_error_accepted']}, {tw['rate_limited']}",
        ),
        ("  permanent 21211 / 21610", f"{tw['permanent_21211']} / {tw['permanent_21610']}"),
        ("  timeout accepted / lost", f"{tw['timeout_accepted']} / {tw['timeout_lost']}"),
        ("  crash after accept / before", f"{tw['crash_after_accept']} / {tw['crash_before_send']}"),
        ("  lookups unavailable", tw["lookup_unavailable"]),
        ("SMS accepted by Twilio", j.sends),
        ("quiet-hour sends: active / urgent", f"{j.quiet_sends_active} / {j.quiet_sends_urgent}"),
        (
            "violations",
            f"{j.violations} (cooldown {len(j.cooldown)}, hourly {len(j.hourly)}, daily "
            f"{len(j.daily)}, quiet {len(j.quiet)}, after expiry {len(j.sent_after_expiry)})",
        ),
        (
            "duplicates",
            f"{j.duplicates} (sent twice {len(j.sent_twice)}, unknown sid {len(j.unknown_sid)}, "
            f"shared sid {len(j.shared_sid)}, unrecorded {len(j.unrecorded)})",
        ),
        ("budget counter mismatches", len(j.budget_mismatch)),
        (
            "service warnings / errors / critical",
            f"{logs.counts['WARNING']} / {logs.counts['ERROR']} / {logs.counts['CRITICAL']}",
        ),
        ("wall time", f"{wall:.1f} s"),
    ]


def test_a_week_of_traffic_breaks_no_limit_sends_nothing_twice_and_accounts_for_every_message(
    store: PostgresStore, database_url: str, quiet_service_logs: LogTally
) -> None:
    cfg = SoakConfig.from_env()
    began = time.perf_counter()
    soak = Soak(store, cfg)
    plan = soak.setup()
    soak.run(database_url)
    j = judge(database_url, soak.twilio.records, POLICY.limits)
    [(stuck,)] = sql(
        database_url,
        "select count(*) from message_queue where status = 'queued' and scheduled_for < %s",
        soak.finished_at - timedelta(seconds=POLICY.sweep_grace_seconds) - 2 * TICK,
    )
    wall = time.perf_counter() - began

    rows = summary(soak, plan, j, wall, quiet_service_logs)
    width = max(len(k) for k, _ in rows)
    print(f"\nsoak (seed {cfg.seed}, {cfg.workers} workers)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for name in (
        "cooldown",
        "hourly",
        "daily",
        "quiet",
        "sent_after_expiry",
        "sent_twice",
        "unknown_sid",
        "shared_sid",
        "unrecorded",
        "budget_mismatch",
    ):
        found = getattr(j, name)
        for line in found[:5]:
            print(f"  ! {name}: {line}")

    s = soak.stats.snapshot()
    st = j.statuses
    accepted = s["accepted_201"]
    final = st["sent"] + st["failed"] + st["superseded"] + st["cancelled"] + st["expired"] + st["queued"]
    assert j.violations == 0, "limit violations (see the lines marked ! above)"
    assert j.duplicates == 0, "messages sent twice or misrecorded (see the lines marked ! above)"
    assert j.budget_mismatch == [], "user_message_budget disagrees with what Twilio sent"
    assert accepted == j.rows == final, f"accounting: accepted {accepted}, rows {j.rows}, states {dict(st)}"
    assert st["sending"] == 0, "claims left in 'sending' after the drain"
    assert stuck == 0, "queued messages overdue after the drain: the sweep lost them"
    assert s["accepted_twice"] == 0 and s["replay_without_original"] == 0, "idempotency broken"
    assert quiet_service_logs.critical == [], quiet_service_logs.critical
    if cfg.full_size:
        # The run really exercised what it is about.
        q = soak.queue.stats.snapshot()
        assert s["deliveries"] > 10_000 and s["schedule_calls"] > 10_000
        assert q["lost"] > 50 and soak.sweep_counts["overdue_requeued"] > q["lost"] // 2
        assert soak.twilio.faults_injected() > 300
        assert soak.sweep_counts["reconciled_sent"] + s["deliver_reconciled_sent"] > 10
        assert soak.sweep_counts["reconciled_requeued"] + s["deliver_reconciled_requeued"] > 10
        assert j.quiet_sends_active > 50 and j.quiet_sends_urgent > 10
        assert st["failed"] > 0 and st["expired"] > 0 and s["replayed_200"] > 100


def test_reconciling_a_lost_send_never_takes_the_sid_of_another_message_with_the_same_text(
    store: PostgresStore, database_url: str
) -> None:
    t0 = datetime(2025, 3, 3, 15, 0, tzinfo=UTC)
    clock = VirtualClock(t0)
    tasks = RecordingTaskQueue()
    twilio = FakeTwilio(
        clock,
        rng_of_phone=lambda _: random.Random(0),
        permanent={},
        faults=TwilioFaults(**dict.fromkeys(FAULTS, 0.0), lookup_unavailable=0.0),
    )
    user = make_user(store, "UTC", phone="+14449990001")
    body = {"userId": str(user), "agentId": "reminder_agent", "messageData": {"content": "Reminder: today"}}
    a = service.schedule(
        body | {"idempotencyKey": "a"}, store=store, tasks=tasks, config=POLICY, now=t0
    ).message
    b = service.schedule(
        body | {"idempotencyKey": "b"}, store=store, tasks=tasks, config=POLICY, now=t0
    ).message
    assert b.scheduled_for == t0 + timedelta(seconds=30)  # spread by the cooldown

    def deliver(m: uuid.UUID, generation: int) -> tuple[str, str]:
        body = {"messageId": str(m), "generation": generation}
        o = service.deliver(body, store=store, tasks=tasks, sms=twilio, config=POLICY, clock=clock)
        return o.action, o.reason

    assert deliver(a.id, 0) == ("sent", "ok")
    # B's call times out and Twilio never got it: held, then reconciled once the hold ends.
    twilio.forced[b.id] = "timeout_lost"
    clock.now = t0 + timedelta(seconds=30)
    assert deliver(b.id, 0) == ("retry", "outcome_unknown")
    clock.now = t0 + timedelta(seconds=30 + POLICY.reconcile_after_seconds)
    reconciled = deliver(b.id, 0)

    [a_sms] = twilio.records
    sent_rows = sql(database_url, "select id, twilio_message_sid from message_queue where status = 'sent'")
    # Twilio only ever had A: B must not be recorded with A's sid (which would lose B and count two
    # sends); it is queued again instead.
    assert sent_rows == [(a.id, a_sms.sid)], f"B recorded as sent with A's sid: {sent_rows}"
    assert reconciled == ("reconciled", "reconciled_requeued")
