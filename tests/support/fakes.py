"""In-process stand-ins for the ports that leave the machine (here: Cloud Tasks), and a clock."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RecordedTask:
    message_id: uuid.UUID
    generation: int
    at: datetime
    created_at: datetime


class RecordingTaskQueue:
    """Records the tasks the use cases create, so a test (or a virtual-clock driver) can fire them."""

    def __init__(self, horizon: timedelta = timedelta(days=30) - timedelta(minutes=5)) -> None:
        self.horizon = horizon
        self.tasks: list[RecordedTask] = []
        self._lock = threading.Lock()
        self.fail_next = 0

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        from shared.errors import Unavailable

        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise Unavailable("injected task creation failure")
            if at - now > self.horizon:
                return None
            self.tasks.append(RecordedTask(message_id, generation, at, now))
            return f"tasks/{message_id}-{generation}"

    def for_message(self, message_id: uuid.UUID) -> list[RecordedTask]:
        return [t for t in self.tasks if t.message_id == message_id]


class VirtualClock:
    """A settable clock: `clock()` returns the current virtual instant."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


class RecordingPublisher:
    """Pub/Sub as the sweep sees it: records what is published; `refuse` names data (a substring)
    whose publish raises `error`, the way a malformed event makes the real client raise."""

    def __init__(self, refuse: bytes | None = None, error: Exception | None = None) -> None:
        self.published: list[tuple[str, bytes, dict[str, str]]] = []
        self.refuse, self.error = refuse, error
        self.calls = 0

    def publish(
        self, topic: str, data: bytes, attributes: dict[str, str], *, timeout: float | None = None
    ) -> str:
        self.calls += 1
        if self.refuse is not None and self.refuse in data:
            raise self.error or TypeError("attribute values must be strings")
        self.published.append((topic, data, attributes))
        return str(len(self.published))
