"""A virtual-clock driver for the recorded Cloud Tasks: fires them in time order, as the queue
would, and runs the sweep every minute of virtual time."""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from shared import service
from shared.ports import SmsSender, Store
from tests.support.fakes import RecordedTask, RecordingTaskQueue, VirtualClock


class TaskDriver:
    def __init__(
        self,
        store: Store,
        tasks: RecordingTaskQueue,
        sms: SmsSender,
        config: service.Policy,
        start: datetime,
        *,
        sweep_every: timedelta | None = None,
    ) -> None:
        self.store, self.tasks, self.sms, self.config = store, tasks, sms, config
        self.clock = VirtualClock(start)
        self.sweep_every = sweep_every
        self.next_sweep = start + sweep_every if sweep_every else None
        self.heap: list[tuple[datetime, int, int, RecordedTask]] = []
        self.seen = 0
        self.seq = itertools.count()
        self.calls = 0
        self.errors: list[BaseException] = []

    def _collect(self, order: dict[uuid.UUID, int]) -> None:
        for task in self.tasks.tasks[self.seen :]:
            heapq.heappush(self.heap, (task.at, order.get(task.message_id, 0), next(self.seq), task))
        self.seen = len(self.tasks.tasks)

    def sleep(self, seconds: float) -> None:
        self.clock.advance(timedelta(seconds=seconds))

    def _sweep(self) -> None:
        service.sweep(
            store=self.store,
            tasks=self.tasks,
            sms=self.sms,
            config=self.config,
            clock=self.clock,
            trigger="test",
        )

    def run(
        self,
        until: datetime,
        order: dict[uuid.UUID, int] | None = None,
        on_outcome: Callable[[Any], None] | None = None,
    ) -> None:
        """`order`: among tasks due at the same instant, lower fires first (to play the worst case).
        A 503 answer (action retry) is retried by the queue 10 s later, as its backoff would."""
        order = order or {}
        self._collect(order)
        while True:
            due = self.heap[0][0] if self.heap else None
            if (
                self.next_sweep is not None
                and self.next_sweep <= until
                and (due is None or self.next_sweep <= due)
            ):
                self.clock.now = max(self.clock.now, self.next_sweep)
                self._sweep()
                assert self.sweep_every is not None
                self.next_sweep += self.sweep_every
                self._collect(order)
                continue
            if due is None or due > until:
                return
            at, _, _, task = heapq.heappop(self.heap)
            self.clock.now = max(self.clock.now, at)
            self.calls += 1
            outcome = service.deliver(
                {"messageId": str(task.message_id), "generation": task.generation},
                store=self.store,
                tasks=self.tasks,
                sms=self.sms,
                config=self.config,
                clock=self.clock,
                sleep=self.sleep,
            )
            if on_outcome:
                on_outcome(outcome)
            if outcome.action == "retry":
                retry = RecordedTask(
                    task.message_id, task.generation, self.clock.now + timedelta(seconds=10), self.clock.now
                )
                heapq.heappush(self.heap, (retry.at, 0, next(self.seq), retry))
            self._collect(order)
