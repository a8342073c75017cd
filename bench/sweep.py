"""The sweep draining a backlog: 100,000 queued rows, all overdue and untouched for longer than the
grace period (every Cloud Task lost), over many users. `shared.service.sweep` re-tasks them (Cloud
Tasks faked in-process); the figure is messages re-tasked per second. The same backlog drained by
`mq_sweep_overdue` alone shows how much of that is the database."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.policy import TIMEZONES
from bench.run import Figure
from bench.support import Clock, FakeSms, InProcessTasks, Postgres
from shared import bootstrap, service
from shared.config import Settings
from shared.store.postgres import PostgresStore

BACKLOG = 100_000
USERS = 10_000
BIG_BATCH = 2_000
T0 = datetime(2025, 6, 2, 15, 0, tzinfo=UTC)
TARGET = 2_000  # messages/s (issue 7)
ABOUT = (
    f"{BACKLOG:,} queued messages for {USERS:,} users, all overdue and untouched past the grace period "
    "(every Cloud Task lost), inserted set-based; one `service.sweep` re-tasks them (Cloud Tasks faked "
    "in-process, so the Cloud Tasks API's own time and quota are not in it). A fresh backlog for each row."
)


def seed_users(
    conn: psycopg.Connection[Any], n: int, prefix: str = "+1557", *, quiet_hours: bool = True
) -> None:
    """n users, phone numbers prefix + 7 digits, spread over TIMEZONES (one statement)."""
    since = T0 - timedelta(days=30)
    conn.execute(
        "insert into users (phone_number, timezone, quiet_hours_enabled, created_at, updated_at)"
        " select %s || lpad(g::text, 7, '0'), (%s::text[])[1 + g %% %s], %s, %s, %s"
        " from generate_series(0, %s - 1) g",
        [prefix, list(TIMEZONES), len(TIMEZONES), quiet_hours, since, since, n],
    )


def seed_queued(
    conn: psycopg.Connection[Any],
    n: int,
    *,
    scheduled_from: datetime,
    spread_seconds: int,
    touched_at: datetime,
    prefix: str = "+1557",
    priorities: Sequence[str] = ("urgent", "high", "medium", "medium", "low"),
) -> None:
    """n queued messages round-robin over the users whose numbers start with `prefix`, scheduled
    from `scheduled_from` over `spread_seconds`, last touched (updated_at) at `touched_at`: one
    `insert ... select ... from generate_series`, then ANALYZE (as autovacuum would soon)."""
    conn.execute(
        """
        with u as (
            select array_agg(id order by phone_number) as ids
            from users where phone_number like %(prefix)s || '%%')
        insert into message_queue (user_id, agent_id, message_data, final_message, scheduled_for, priority,
                                   status, can_delay, reason, created_at, updated_at)
        select u.ids[1 + g %% cardinality(u.ids)], 'bench_agent',
               jsonb_build_object('content', 'bench message ' || g),
               'bench message ' || g,
               %(start)s + make_interval(secs => (g * 7919) %% greatest(%(spread)s, 1)),
               (%(priorities)s::text[])[1 + g %% %(n_priorities)s],
               'queued', true, 'scheduled', %(created)s, %(touched)s
        from generate_series(0, %(n)s - 1) g cross join u
        """,
        {
            "prefix": prefix,
            "start": scheduled_from,
            "spread": spread_seconds,
            "priorities": list(priorities),
            "n_priorities": len(priorities),
            "created": touched_at,
            "touched": touched_at,
            "n": n,
        },
    )
    conn.execute("analyze message_queue")
    conn.execute("analyze users")


def seed_history(conn: psycopg.Connection[Any], *, per_user: int, prefix: str = "+1557") -> None:
    """per_user sent messages for each user whose number starts with `prefix`, the k-th of them k+1
    days and k hours before T0: what a table in service holds, so that its statistics (taken by
    seed_queued's ANALYZE) know sent rows, as a live table's do, and the counts of the day, the hour
    and the cooldown still start from zero (the messages lie outside those windows, but inside the
    8 days of history the policy reads)."""
    conn.execute(
        """
        insert into message_queue (user_id, agent_id, message_data, final_message, scheduled_for, priority,
                                   status, can_delay, reason, attempts, created_at, updated_at, sent_at,
                                   slot_at, twilio_message_sid)
        select u.id, 'bench_agent', jsonb_build_object('content', 'earlier message ' || k),
               'earlier message ' || k, s.at, 'medium', 'sent', true, 'sent', 1, s.at, s.at, s.at, s.at,
               'SMhist' || md5(u.id::text || k)
        from users u
        cross join generate_series(1, %(per_user)s) k
        cross join lateral (select %(t0)s - make_interval(days => 1 + k, hours => k) as at) s
        where u.phone_number like %(prefix)s || '%%'
        """,
        {"per_user": per_user, "t0": T0, "prefix": prefix},
    )


class TimedStore(PostgresStore):
    """PostgresStore adding up the wall time spent in each store function (round trip, SQL and
    psycopg's decoding of the jsonb answer)."""

    def __init__(self, conninfo: str, *, max_size: int = 4) -> None:
        super().__init__(conninfo, max_size=max_size)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._timing_lock = threading.Lock()

    def call(self, function: str, /, **args: Any) -> Any:
        started = time.perf_counter()
        try:
            return super().call(function, **args)
        finally:
            spent = time.perf_counter() - started
            with self._timing_lock:
                self.seconds[function] += spent
                self.calls[function] += 1


@dataclass(frozen=True)
class Drain:
    retasked: int
    wall: float
    store_seconds: dict[str, float]
    batches: int

    @property
    def rate(self) -> float:
        return self.retasked / self.wall


def backlog_database(pg: Postgres, n: int = BACKLOG, users: int = USERS) -> Any:
    """A database holding the overdue backlog (a context manager yielding its URL)."""
    return _Backlog(pg, n, users)


class _Backlog:
    def __init__(self, pg: Postgres, n: int, users: int) -> None:
        self._cm = pg.database()
        self.n = n
        self.users = users

    def __enter__(self) -> str:
        url = self._cm.__enter__()
        with psycopg.connect(url, autocommit=True) as conn:
            seed_users(conn, self.users)
            # Due over the hour before T0 - 10 min, last touched two hours before T0: all overdue.
            seed_queued(
                conn,
                self.n,
                scheduled_from=T0 - timedelta(minutes=70),
                spread_seconds=3600,
                touched_at=T0 - timedelta(hours=2),
            )
        return url

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def drain_with_sweep(url: str, *, batch: int, budget_seconds: float) -> Drain:
    """One `service.sweep` over the backlog, the way process_queue runs it, with `batch` and
    `budget_seconds` for sweep_batch and sweep_time_budget_seconds."""
    store = TimedStore(url)
    try:
        tasks = InProcessTasks()
        config = replace(
            bootstrap.Container(Settings()).policy,
            sweep_batch=batch,
            sweep_time_budget_seconds=budget_seconds,
        )
        started = time.perf_counter()
        report = service.sweep(
            store=store, tasks=tasks, sms=FakeSms(), config=config, clock=Clock(T0), trigger="bench"
        )
        wall = time.perf_counter() - started
        if report.overdue_requeued != len(tasks.tasks) or report.task_errors:
            raise RuntimeError(f"sweep re-tasked {report.overdue_requeued}, tasks {len(tasks.tasks)}")
        return Drain(report.overdue_requeued, wall, dict(store.seconds), report.batches)
    finally:
        store.close()


def drain_with_sql(url: str, *, batch: int) -> Drain:
    """`mq_sweep_overdue` alone until nothing is left; the answer is counted in the database
    (jsonb_array_length), so neither psycopg nor Python decodes it: this is the database's part."""
    now, grace = T0, Settings().sweep_grace_seconds
    done = calls = 0
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        while True:
            row = conn.execute(
                "select jsonb_array_length(mq_sweep_overdue(%s, %s, %s))", [now, grace, batch]
            ).fetchone()
            calls += 1
            got = int(row[0]) if row else 0
            done += got
            if got < batch:
                break
        wall = time.perf_counter() - started
    return Drain(done, wall, {"mq_sweep_overdue": wall}, calls)


def run(pg: Postgres) -> list[Figure]:
    figures: list[Figure] = []
    with backlog_database(pg) as url:
        big = drain_with_sweep(url, batch=BIG_BATCH, budget_seconds=600)
    with backlog_database(pg) as url:
        sql = drain_with_sql(url, batch=BIG_BATCH)
    defaults = Settings()
    with backlog_database(pg) as url:
        default = drain_with_sweep(
            url, batch=defaults.sweep_batch_size, budget_seconds=defaults.sweep_time_budget_seconds
        )
    in_sql = big.store_seconds.get("mq_sweep_overdue", 0.0)
    note = f"{BACKLOG:,} overdue rows, {USERS:,} users, batch {BIG_BATCH}, Cloud Tasks faked in-process"
    figures += [
        Figure("sweep: overdue messages re-tasked/s", big.rate, "/s", TARGET, note=note),
        Figure(
            "sweep: seconds to drain the backlog",
            big.wall,
            "s",
            note=f"batch {BIG_BATCH}, {big.batches} batches",
        ),
        Figure(
            "sweep: share of the drain in mq_sweep_overdue calls",
            100 * in_sql / big.wall,
            "%",
            note="round trip, SQL and psycopg's jsonb decoding; the rest is Python in service.sweep",
        ),
        Figure(
            "sweep: mq_sweep_overdue alone, rows/s",
            sql.rate,
            "/s",
            note=f"batch {BIG_BATCH}, answer counted in SQL, nothing decoded: the database's ceiling",
        ),
        Figure(
            "sweep: overdue messages re-tasked/s, default settings",
            default.rate,
            "/s",
            TARGET,
            note=f"sweep_batch {defaults.sweep_batch_size}, budget {defaults.sweep_time_budget_seconds} s",
        ),
        Figure(
            "sweep: share of the backlog one default sweep re-tasks",
            100 * default.retasked / BACKLOG,
            "%",
            note=f"{default.retasked:,} in {default.wall:.0f} s, {default.batches} batches",
        ),
    ]
    return figures
