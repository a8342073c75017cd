"""The sweep, every minute: what Cloud Tasks may have missed. Expire what is past its expiry,
reconcile claims past their lease, re-task overdue rows and rows come within the task horizon,
publish what waits in the event outbox. And the health answer built on the sweep's record.

One bad row must not stop the sweep: the sweep is the safety net of every other row, so a row
whose step raises is isolated (failed with `invalid_timezone` when its timezone is the problem,
else left for the next sweep), logged once with its id, counted in `row_errors`, and the batch goes
on; a stage whose batch call fails for another reason than an outage does not skip the stages after
it (the sweep still fails at the end, so health sees it). An outage (Unavailable) aborts the sweep
at once, as before: Pub/Sub redelivers, and every row would fail the same way."""

from __future__ import annotations

import logging
import time as _time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from shared.domain import Policy
from shared.errors import StoreUnavailable, Unavailable
from shared.log import event
from shared.models import QueueHealth, StaleClaim, SweepReport, TaskRef
from shared.policy import UnknownTimezone, rules
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
        run.stages(
            ("expire", run.expire),
            ("reconcile", run.reconcile_stale),
            ("overdue", run.retask_overdue),
            ("horizon", run.retask_horizon),
            ("drain", run.drain),
        )
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
        level = logging.ERROR if error or run.report.task_errors or run.report.row_errors else logging.INFO
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

    def stages(self, *steps: tuple[str, Callable[[], None]]) -> None:
        """Every stage, in order. An outage aborts at once; another error ends its stage only, and
        the first such error is raised once every stage had its turn (not recorded as a run)."""
        first: Exception | None = None
        for name, step in steps:
            try:
                step()
            except Unavailable:
                raise
            except Exception as exc:
                event(
                    log,
                    logging.ERROR,
                    f"sweep: stage {name} failed; the next stages go on",
                    stage=name,
                    reason="sweep_stage_failed",
                    error=f"{type(exc).__name__}: {exc}",
                )
                first = first or exc
        if first is not None:
            raise first

    def isolated(self, message_id: uuid.UUID, stage: str, exc: Exception) -> None:
        """A row whose step raised (not an outage): failed for good when its timezone is the
        problem (nothing can be planned for it until the timezone is fixed), else left as it is for
        the next sweep. Logged once here, counted; the caller goes on with the rest of the batch."""
        self.report.row_errors += 1
        failed = False
        if isinstance(exc, UnknownTimezone):
            failed = self.store.fail(message_id, error=str(exc), reason="invalid_timezone", now=self.clock())
        event(
            log,
            logging.ERROR,
            "sweep: row failed" + ("" if failed else "; left for the next sweep"),
            messageId=str(message_id),
            stage=stage,
            reason="invalid_timezone" if failed else "sweep_row_failed",
            error=f"{type(exc).__name__}: {exc}",
        )

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
                try:
                    result = self.reconcile_one(c)
                except Unavailable:
                    raise
                except Exception as exc:
                    # Its fresh lease keeps it from the next sweeps until the lease runs out again.
                    self.isolated(c.message.id, "reconcile", exc)
                    continue
                if result == SENT:
                    self.report.reconciled_sent += 1
                elif result == REQUEUED:
                    self.report.reconciled_requeued += 1
                else:
                    self.report.reconcile_deferred += 1
            if not self.more(len(claims)):
                return

    def reconcile_one(self, c: StaleClaim) -> str:
        return reconcile(
            c, store=self.store, tasks=self.tasks, sms=self.sms, config=self.config, clock=self.clock
        )

    def retask_overdue(self) -> None:
        self.report.overdue_requeued += self.retask(self.overdue, due_now=True)

    def retask_horizon(self) -> None:
        self.report.horizon_tasked += self.retask(self.horizon, due_now=False)

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
            results = create_tasks(self.tasks, refs, now, due_now, self.config.sweep_task_concurrency)
            for ref, result in zip(refs, results, strict=True):
                if result is TASK_ERROR:
                    self.report.task_errors += 1
                elif isinstance(result, Exception):
                    self.isolated(ref.message_id, "overdue" if due_now else "horizon", result)
            if not self.more(len(refs)):
                return count

    def drain(self) -> None:
        while True:
            drained = drain_events(
                store=self.store, publisher=self.events, clock=self.clock, limit=self.limit
            )
            self.report.events_published += drained.published
            self.report.events_failed += drained.failed
            self.report.row_errors += drained.isolated
            # Pub/Sub failing: the rest waits for the next sweep (each try would wait its timeout).
            if drained.stopped or not self.more(drained.published + drained.isolated):
                return


TASK_OK, TASK_ERROR = "ok", "task_error"


def create_tasks(
    tasks: TaskQueue, refs: list[TaskRef], now: datetime, due_now: bool, concurrency: int
) -> list[str | Exception]:
    """Create a batch's tasks; for each ref TASK_OK, TASK_ERROR (Cloud Tasks unavailable: logged,
    retried next sweep) or the exception its creation raised, which the caller isolates (in a pool,
    one raising call would otherwise take the whole batch's results with it). Each Cloud Tasks call
    is a network round trip (tens of ms), so a large backlog is only re-tasked at speed with
    several calls in flight."""

    def one(ref: TaskRef) -> str | Exception:
        try:
            return _task(tasks, ref, now if due_now else ref.scheduled_for, now)
        except Exception as exc:
            return exc

    if concurrency <= 1 or len(refs) <= 1:
        return [one(ref) for ref in refs]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(refs)), thread_name_prefix="sweep-task") as pool:
        return list(pool.map(one, refs))


def _task(tasks: TaskQueue, ref: TaskRef, at: datetime, now: datetime) -> str:
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
        return TASK_ERROR
    return TASK_OK


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
