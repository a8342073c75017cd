"""The sweep, every minute: what Cloud Tasks may have missed. Expire what is past its expiry,
reconcile claims past their lease, re-task overdue rows and rows come within the task horizon,
publish what waits in the event outbox. And the health answer built on the sweep's record."""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from shared.domain import Policy
from shared.errors import StoreUnavailable, Unavailable
from shared.log import event
from shared.models import QueueHealth, SweepReport, TaskRef
from shared.policy import rules
from shared.ports import EventPublisher, SmsSender, Store, TaskQueue
from shared.service.common import Clock, log
from shared.service.conversations import drain_events
from shared.service.reconcile import REQUEUED, SENT, reconcile


def sweep(
    *,
    store: Store,
    tasks: TaskQueue,
    sms: SmsSender,
    config: Policy,
    clock: Clock,
    trigger: str,
    events: EventPublisher | None = None,
) -> SweepReport:
    """One pass, recorded in sweep_runs. Safe to run twice at once: every batch is claimed with
    SKIP LOCKED."""
    run = _Sweep(
        store, tasks, sms, config, clock, events, _time.monotonic() + config.sweep_time_budget_seconds
    )
    started = clock()
    error: str | None = None
    try:
        run.expire()
        run.reconcile_stale()
        run.report.overdue_requeued += run.retask(run.overdue, due_now=True)
        run.report.horizon_tasked += run.retask(run.horizon, due_now=False)
        run.drain()
    except StoreUnavailable as exc:
        error = exc.message
        raise
    except Exception as exc:
        # Not recorded as a run: health must not take a failed sweep for a working one.
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        finished = clock()
        counts = run.report.counts()
        level = logging.ERROR if error or run.report.task_errors else logging.INFO
        event(log, level, "sweep finished", trigger=trigger, error=error, **counts)
        if error is None:
            store.record_sweep(trigger, started, finished, counts, None)
    return run.report


@dataclass
class _Sweep:
    store: Store
    tasks: TaskQueue
    sms: SmsSender
    config: Policy
    clock: Clock
    events: EventPublisher | None
    deadline: float  # time.monotonic() after which no new batch starts

    def __post_init__(self) -> None:
        self.report = SweepReport()
        self.limit = self.config.sweep_batch

    def more(self, got: int) -> bool:
        """Another batch, while the last one was full and the time budget lasts."""
        self.report.batches += 1
        return got >= self.limit and _time.monotonic() < self.deadline

    def expire(self) -> None:
        while True:
            n = self.store.sweep_expire(self.clock(), limit=self.limit)
            self.report.expired += n
            if not self.more(n):
                return

    def reconcile_stale(self) -> None:
        while True:
            claims = self.store.take_stale_claims(
                self.clock(), lease_seconds=self.config.lease_seconds, limit=self.limit
            )
            for c in claims:
                result = reconcile(
                    c, store=self.store, tasks=self.tasks, sms=self.sms, config=self.config, clock=self.clock
                )
                if result == SENT:
                    self.report.reconciled_sent += 1
                elif result == REQUEUED:
                    self.report.reconciled_requeued += 1
                else:
                    self.report.reconcile_deferred += 1
            if not self.more(len(claims)):
                return

    def overdue(self, now: datetime) -> list[TaskRef]:
        """Queued rows overdue (their task lost), bumped to a new generation."""
        return self.store.sweep_overdue(now, grace_seconds=self.config.sweep_grace_seconds, limit=self.limit)

    def horizon(self, now: datetime) -> list[TaskRef]:
        """Queued rows planned beyond the task horizon that came within it."""
        return self.store.sweep_horizon(
            now, horizon_seconds=self.config.task_horizon_seconds, limit=self.limit
        )

    def retask(self, fetch: Callable[[datetime], list[TaskRef]], *, due_now: bool) -> int:
        """Batches of rows that need a task: due now (overdue ones) or at their planned time."""
        count = 0
        while True:
            now = self.clock()
            refs = fetch(now)
            count += len(refs)
            self.report.task_errors += create_tasks(
                self.tasks, refs, now, due_now, self.config.sweep_task_concurrency
            )
            if not self.more(len(refs)):
                return count

    def drain(self) -> None:
        while True:
            published, failed = drain_events(
                store=self.store, publisher=self.events, clock=self.clock, limit=self.limit
            )
            self.report.events_published += published
            self.report.events_failed += failed
            if failed or not self.more(published):
                return


def create_tasks(
    tasks: TaskQueue, refs: list[TaskRef], now: datetime, due_now: bool, concurrency: int
) -> int:
    """Create a batch's tasks; how many failed. Each Cloud Tasks call is a network round trip
    (tens of ms), so a large backlog is only re-tasked at speed with several calls in flight."""

    def one(ref: TaskRef) -> bool:
        return _task(tasks, ref, now if due_now else ref.scheduled_for, now)

    if concurrency <= 1 or len(refs) <= 1:
        return sum(not one(ref) for ref in refs)
    with ThreadPoolExecutor(max_workers=min(concurrency, len(refs)), thread_name_prefix="sweep-task") as pool:
        return sum(not ok for ok in pool.map(one, refs))


def _task(tasks: TaskQueue, ref: TaskRef, at: datetime, now: datetime) -> bool:
    try:
        tasks.schedule(ref.message_id, ref.generation, at, now)
    except Unavailable as exc:
        event(
            log,
            logging.ERROR,
            "sweep: task creation failed; retried next sweep",
            messageId=str(ref.message_id),
            generation=ref.generation,
            reason="task_create_failed",
            error=exc.message,
        )
        return False
    return True


@dataclass(frozen=True)
class HealthReport:
    """The queue as the health check sees it: `problem` None when healthy, else why not
    (database_unavailable, no_sweep_yet, sweep_stale); `queue` None when the database is down."""

    now: datetime
    queue: QueueHealth | None
    problem: str | None


def health(*, store: Store, config: Policy, now: datetime) -> HealthReport:
    """Unhealthy when the database is unreachable or the sweep has not finished a run for
    health_stale_seconds."""
    try:
        queue = store.health(now)
    except StoreUnavailable:
        return HealthReport(now=now, queue=None, problem="database_unavailable")
    problem = rules.sweep_problem(queue.last_sweep_at, now, config.health_stale_seconds)
    return HealthReport(now=now, queue=queue, problem=problem)
