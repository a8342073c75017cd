"""What the database benchmarks share, without importing tests/: one embedded PostgreSQL (pgserver)
with the migrations applied once to a template database, a fresh clone of it per benchmark, and
in-process stand-ins for what leaves the machine (Cloud Tasks, Twilio) and for the clock."""

from __future__ import annotations

import os
import statistics
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from shared.errors import Unavailable
from shared.models import SentRecord
from shared.store.migrate import apply_migrations

TEMPLATE = "mq_bench_template"


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


class Postgres:
    """An embedded server in `datadir` to make bench databases on; with BENCH_DATABASE_URL (or
    TEST_DATABASE_URL, as the tests) that server instead."""

    def __init__(self, datadir: Path) -> None:
        explicit = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
        if explicit:
            self.admin_url = explicit
            self._server = None
        else:
            import pgserver

            self._server = pgserver.get_server(str(datadir), cleanup_mode="stop")
            self.admin_url = self._server.get_uri("postgres")
        self._template_ready = False
        self._lock = threading.Lock()

    def url(self, database: str) -> str:
        return with_database(self.admin_url, database)

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def _ensure_template(self) -> None:
        with self._lock:
            if self._template_ready:
                return
            with self._admin() as conn:
                conn.execute(f"drop database if exists {TEMPLATE}")
                conn.execute(f"create database {TEMPLATE}")
            apply_migrations(self.url(TEMPLATE))
            self._template_ready = True

    @contextmanager
    def database(self, *, migrated: bool = True) -> Iterator[str]:
        """A new database (a clone of the migrated template, or an empty one), dropped afterwards."""
        if migrated:
            self._ensure_template()
        name = "bench_" + uuid.uuid4().hex[:12]
        with self._admin() as conn:
            conn.execute(f"create database {name}" + (f" template {TEMPLATE}" if migrated else ""))
        try:
            yield self.url(name)
        finally:
            with self._admin() as conn:
                conn.execute(f"drop database if exists {name} with (force)")

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()


@dataclass(frozen=True)
class Task:
    message_id: uuid.UUID
    generation: int
    at: datetime
    created_at: datetime


class InProcessTasks:
    """The TaskQueue port in memory: records each task instead of calling Cloud Tasks."""

    def __init__(self, horizon: timedelta = timedelta(days=30) - timedelta(minutes=5)) -> None:
        self.horizon = horizon
        self.tasks: list[Task] = []
        self._lock = threading.Lock()
        self.fail_next = 0

    def schedule(self, message_id: uuid.UUID, generation: int, at: datetime, now: datetime) -> str | None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise Unavailable("injected task creation failure")
            if at - now > self.horizon:
                return None
            self.tasks.append(Task(message_id, generation, at, now))
            return f"tasks/{message_id}-{generation}"


class Clock:
    """A settable clock: `clock()` is the current virtual instant."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


class FakeSms:
    """Twilio accepts everything at once."""

    def send(self, to: str, body: str, *, message_id: uuid.UUID) -> str:
        return "SM" + message_id.hex

    def find_sent(self, to: str, body: str, *, since: datetime) -> list[SentRecord]:
        return []


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0 < q < 100) of xs, interpolated."""
    if len(xs) == 1:
        return xs[0]
    cuts = statistics.quantiles(xs, n=1000, method="inclusive")
    return cuts[round(q * 10) - 1]


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (every process, PostgreSQL's
    included: Linux /proc/stat, all but idle and iowait), or None where there is no /proc/stat.
    Two readings bracket a run: their difference over its wall time is how many cores it kept busy."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")
