"""Against a local embedded PostgreSQL (bench.support.Postgres): schedule_message through
functions-framework's app with 1 and 8 clients, deliveries through shared.service.deliver, and the
database round trips each costs. Cloud Tasks is an in-process fake; deliveries go to an in-process
fake of Twilio, and again through the real twilio client to the local SMS sink (shared/dev/sink.py)."""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from functions_framework import create_app
from psycopg import Connection
from psycopg_pool import ConnectionPool

from bench.policy import TIMEZONES
from bench.run import Figure
from bench.support import Clock, FakeSms, InProcessTasks, Postgres
from shared import bootstrap, service
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.sms import TwilioSender, build_twilio_client
from shared.store.postgres import PostgresStore

MAIN = str(Path(__file__).resolve().parents[1] / "functions" / "main.py")
USERS = 300
WARMUP = 50
SINGLE = 800  # requests with one client
PER_THREAD = 150  # requests per client with eight clients
THREADS = 8
DELIVERIES = 200  # per pool configuration
WARM_SENDS = 20  # to the sink before timing: the HTTP connection and the plans
T0 = datetime(2025, 6, 2, 15, 0, tzinfo=UTC)
ABOUT = (
    "`schedule_message` through functions-framework's app in-process (1 and 8 clients), deliveries "
    "through `service.deliver` (Cloud Tasks faked; Twilio faked in-process, then the real twilio client "
    "to the local SMS sink on loopback), and the database round trips each costs."
)


class CountingStore(PostgresStore):
    """PostgresStore counting its round trips: one per `call` (every store method is one
    `select mq_...()`) plus one per pool checkout while a connection check is on (PostgresStore
    runs none; the bench measures what one would cost)."""

    def __init__(self, conninfo: str, *, max_size: int) -> None:
        super().__init__(conninfo, max_size=max_size)
        self.calls = 0
        self.checks = 0
        self._count_lock = threading.Lock()
        self.pool_check(False)

    def pool_check(self, on: bool) -> None:
        """Turn psycopg_pool's per-checkout `check_connection` on, or off (PostgresStore's setting)."""
        self._pool._check = self._check if on else None

    def _check(self, conn: Connection[Any]) -> None:
        with self._count_lock:
            self.checks += 1
        ConnectionPool.check_connection(conn)

    def call(self, function: str, /, **args: Any) -> Any:
        with self._count_lock:
            self.calls += 1
        return super().call(function, **args)

    def counts(self) -> tuple[int, int]:
        with self._count_lock:
            return self.calls, self.checks


def _body(user: uuid.UUID, i: int) -> dict[str, Any]:
    return {
        "userId": str(user),
        # Twenty agents: each stays under AGENT_RATE_PER_MINUTE (600) at the benchmark's pace, so
        # every request pays for the admission check and none is refused by it.
        "agentId": f"bench_agent_{i % 20}",
        "messageData": {"content": f"bench message {i}"},
        "priority": ("urgent", "high", "medium", "medium", "low")[i % 5],
        "canDelay": i % 10 != 0,
    }


FLOOR_APP = str(Path(__file__).resolve().parent / "floor_app.py")


def _floor_figures(users: list[uuid.UUID]) -> list[Figure]:
    """The same requests to a trivial function through the same app and test client: the part of a
    schedule's latency and CPU that no change to the use case or the database can remove."""
    _client_run(users, 0, WARMUP, [], app=("echo", FLOOR_APP))
    latencies: list[float] = []
    cpu = time.process_time()
    _client_run(users, 0, SINGLE, latencies, app=("echo", FLOOR_APP))
    cpu = time.process_time() - cpu
    note = "functions-framework's app and Flask's test client around a trivial function"
    return [
        Figure("floor p50, 1 client", _pct(latencies, 50), "ms", note=note),
        Figure("floor CPU per request, 1 client", cpu / SINGLE * 1000, "ms", note=note),
    ]


def _client_run(
    users: list[uuid.UUID],
    start: int,
    n: int,
    latencies: list[float],
    *,
    app: tuple[str, str] = ("schedule_message", MAIN),
) -> None:
    client = create_app(*app).test_client()
    for i in range(start, start + n):
        t = time.perf_counter()
        resp = client.post("/", json=_body(users[i % len(users)], i))
        latencies.append(time.perf_counter() - t)
        if resp.status_code != 201:
            raise RuntimeError(f"{app[0]} answered {resp.status_code}: {resp.get_data(as_text=True)}")


def _load(users: list[uuid.UUID], threads: int, per_thread: int, offset: int) -> tuple[list[float], float]:
    results: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            _client_run(users, offset + k * per_thread, per_thread, results[k])
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return [x for r in results for x in r], wall


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] * 1000 if len(xs) > 1 else xs[0] * 1000


def _per(store: CountingStore, n: int, fn: Callable[[], None]) -> tuple[float, float]:
    calls0, checks0 = store.counts()
    fn()
    calls1, checks1 = store.counts()
    return (calls1 - calls0) / n, (checks1 - checks0) / n


def _schedule_figures(store: CountingStore, users: list[uuid.UUID]) -> list[Figure]:
    tasks = InProcessTasks()
    container = bootstrap.Container(Settings(), store=store, tasks=tasks)
    previous = bootstrap.install(container)
    try:
        _load(users, 1, WARMUP, 0)
        single: list[float] = []
        cpu = time.process_time()
        calls, checks = _per(store, SINGLE, lambda: single.extend(_load(users, 1, SINGLE, 10_000)[0]))
        cpu = time.process_time() - cpu  # this process only: PostgreSQL's backends are not in it
        wall1 = sum(single)
        multi, wall8 = _load(users, THREADS, PER_THREAD, 20_000)
        store.pool_check(True)
        nocheck: list[float] = []
        calls_nc, checks_nc = _per(store, SINGLE, lambda: nocheck.extend(_load(users, 1, SINGLE, 30_000)[0]))
        store.pool_check(False)
    finally:
        bootstrap.install(previous)
    pool = f"pool max {store._pool.max_size}"
    return [
        Figure("schedule_message p50, 1 client", _pct(single, 50), "ms"),
        Figure("schedule_message p99, 1 client", _pct(single, 99), "ms", 15, higher_is_better=False),
        Figure("schedule_message req/s, 1 client", len(single) / wall1, "/s", 300),
        Figure("schedule_message Python CPU per request, 1 client", cpu / SINGLE * 1000, "ms"),
        *_floor_figures(users),
        *_clients_figures(multi, wall8, pool),
        Figure("schedule_message p99, 1 client, with a pool check", _pct(nocheck, 99), "ms", note="not used"),
        Figure(
            "schedule_message req/s, 1 client, with a pool check",
            len(nocheck) / sum(nocheck),
            "/s",
            note="not used",
        ),
        Figure("store calls per schedule", calls, "", 2, higher_is_better=False),
        Figure(
            "DB round trips per schedule",
            calls + checks,
            "",
            2,
            higher_is_better=False,
            note="store calls (no pool check, as configured)",
        ),
        Figure("DB round trips per schedule, with a pool check", calls_nc + checks_nc, "", note="not used"),
    ]


def _due_messages(store: CountingStore, users: list[uuid.UUID], tasks: InProcessTasks) -> list[uuid.UUID]:
    config = bootstrap.Container(Settings()).policy
    ids: list[uuid.UUID] = []
    for i, user in enumerate(users):
        body = _body(user, i) | {"priority": "high", "canDelay": True}
        result = service.schedule(body, store=store, tasks=tasks, config=config, now=T0)
        if result.message.scheduled_for != T0:
            raise RuntimeError("a delivery benchmark message was not due at once")
        ids.append(result.message.id)
    return ids


def _deliver_all(store: CountingStore, tasks: InProcessTasks, sms: Any, batch: list[uuid.UUID]) -> float:
    """Deliver each message of the batch in turn (one worker); the wall time."""
    config = bootstrap.Container(Settings()).policy
    clock = Clock(T0 + timedelta(seconds=1))
    started = time.perf_counter()
    for mid in batch:
        out = service.deliver(
            {"messageId": str(mid), "generation": 0},
            store=store,
            tasks=tasks,
            sms=sms,
            config=config,
            clock=clock,
        )
        if out.action != "sent":
            raise RuntimeError(f"delivery did not send: {out.action} {out.reason}")
    return time.perf_counter() - started


def _deliver_sink_figures(store: CountingStore, users: list[uuid.UUID]) -> list[Figure]:
    """The same deliveries through the real twilio client and TwilioSender to the local SMS sink
    (shared/dev/sink.py, Twilio's Messages API on loopback): the HTTP request Twilio would get,
    without Twilio's own time."""
    account, token = "AC" + "0" * 32, "bench-auth-token"
    tasks = InProcessTasks()
    ids = _due_messages(store, users, tasks)
    with SmsSink(account_sid=account, auth_token=token) as sink:
        sender = TwilioSender(
            build_twilio_client(account, token, base_url=sink.url), from_number="+15005550006"
        )
        _deliver_all(store, tasks, sender, ids[:WARM_SENDS])
        calls0, _ = store.counts()
        wall = _deliver_all(store, tasks, sender, ids[WARM_SENDS:])
        calls1, _ = store.counts()
        received = len(sink.messages())
    if received != len(ids):
        raise RuntimeError(f"the sink received {received} of {len(ids)} messages")
    n = len(ids) - WARM_SENDS
    return [
        Figure(
            "deliveries/s, 1 worker, to the local SMS sink",
            n / wall,
            "/s",
            note="real twilio client over loopback",
        ),
        Figure(
            "DB round trips per delivery, to the local SMS sink",
            (calls1 - calls0) / n,
            "",
            3,
            higher_is_better=False,
        ),
    ]


def _deliver_figures(store: CountingStore, url_users: list[uuid.UUID]) -> list[Figure]:
    tasks = InProcessTasks()
    sms = FakeSms()
    ids = _due_messages(store, url_users, tasks)

    def deliver(batch: list[uuid.UUID], wall: list[float]) -> None:
        wall.append(_deliver_all(store, tasks, sms, batch))

    half = len(ids) // 2
    wall_check: list[float] = []
    wall_nc: list[float] = []
    calls, checks = _per(store, half, lambda: deliver(ids[:half], wall_check))
    store.pool_check(True)
    try:
        calls_nc, checks_nc = _per(store, len(ids) - half, lambda: deliver(ids[half:], wall_nc))
    finally:
        store.pool_check(False)
    return [
        Figure("deliveries/s, 1 worker", half / wall_check[0], "/s", note="SMS send faked in-process"),
        Figure(
            "deliveries/s, 1 worker, with a pool check", (len(ids) - half) / wall_nc[0], "/s", note="not used"
        ),
        Figure("store calls per delivery", calls, "", 3, higher_is_better=False),
        Figure(
            "DB round trips per delivery",
            calls + checks,
            "",
            3,
            higher_is_better=False,
            note="store calls (no pool check, as configured)",
        ),
        Figure("DB round trips per delivery, with a pool check", calls_nc + checks_nc, "", note="not used"),
    ]


def _schedule_matched_pool(url: str, users: list[uuid.UUID]) -> list[Figure]:
    """8 clients again with DB_POOL_MAX = 8, one connection per request in flight: what an operator
    sets when an instance takes that many requests at once (deployed instances take one)."""
    store = CountingStore(url, max_size=THREADS)
    previous = bootstrap.install(bootstrap.Container(Settings(), store=store, tasks=InProcessTasks()))
    try:
        _load(users, THREADS, 20, 40_000)  # warm the pool's connections
        multi, wall = _load(users, THREADS, PER_THREAD, 50_000)
    finally:
        bootstrap.install(previous)
        store.close()
    return _clients_figures(multi, wall, f"pool max {THREADS} (DB_POOL_MAX = clients)")


def _clients_figures(latencies: list[float], wall: float, note: str) -> list[Figure]:
    return [
        Figure(f"schedule_message p50, {THREADS} clients", _pct(latencies, 50), "ms", note=note),
        Figure(
            f"schedule_message p99, {THREADS} clients",
            _pct(latencies, 99),
            "ms",
            15,
            higher_is_better=False,
            note=note,
        ),
        Figure(f"schedule_message req/s, {THREADS} clients", len(latencies) / wall, "/s", 300, note=note),
    ]


def _instance(url: str, users: list[str], offset: int, start: Any, out: Any) -> None:
    """One process as one deployed instance: its own app, store (DB_POOL_MAX 1) and interpreter."""
    logging.disable(logging.INFO)
    store = PostgresStore(url, max_size=1)
    bootstrap.install(bootstrap.Container(Settings(), store=store, tasks=InProcessTasks()))
    ids = [uuid.UUID(u) for u in users]
    try:
        _client_run(ids, offset, 20, [])  # warm the connection and the plans
        start.wait()
        latencies: list[float] = []
        began = time.perf_counter()
        _client_run(ids, offset + 20, PER_THREAD, latencies)
        out.put((latencies, began, time.perf_counter()))
    except BaseException as exc:  # reported by the parent
        out.put(exc)
    finally:
        store.close()


def _schedule_processes(url: str, users: list[uuid.UUID]) -> list[Figure]:
    """8 clients as 8 processes, each an instance taking one request at a time (as deployed:
    max_instance_request_concurrency = 1), so no two requests share an interpreter lock."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(THREADS + 1)
    out = ctx.Queue()
    names = [str(u) for u in users]
    procs = [
        ctx.Process(target=_instance, args=(url, names, 60_000 + k * 1_000, start, out))
        for k in range(THREADS)
    ]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=120)
        results = [out.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    latencies = [x for r in results for x in r[0]]
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return _clients_figures(latencies, wall, f"{THREADS} processes, one request at a time each")


def run(pg: Postgres) -> list[Figure]:
    with pg.database() as url:
        store = CountingStore(url, max_size=Settings().db_pool_max)
        try:
            users = [
                uuid.UUID(store.upsert_user(f"+1555{i:07d}", TIMEZONES[i % len(TIMEZONES)])["id"])
                for i in range(USERS)
            ]
            figures = _schedule_figures(store, users)
            figures += _schedule_matched_pool(url, users)
            figures += _schedule_processes(url, users)
            fresh = [
                uuid.UUID(store.upsert_user(f"+1556{i:07d}", "UTC")["id"]) for i in range(2 * DELIVERIES)
            ]
            figures += _deliver_figures(store, fresh)
            sink_users = [
                uuid.UUID(store.upsert_user(f"+1558{i:07d}", "UTC")["id"])
                for i in range(DELIVERIES + WARM_SENDS)
            ]
            figures += _deliver_sink_figures(store, sink_users)
        finally:
            store.close()
    return figures
