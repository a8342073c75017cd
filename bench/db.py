"""Against a local embedded PostgreSQL (bench.support.Postgres): schedule_message through
functions-framework's app with 1 and 8 clients, deliveries through shared.service.deliver, and the
database round trips each costs. Cloud Tasks is an in-process fake; deliveries go to an in-process
fake of Twilio, and again through the real twilio client to the local SMS sink (shared/dev/sink.py)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from functions_framework import create_app
from psycopg import Connection
from psycopg_pool import ConnectionPool

from bench.policy import TIMEZONES
from bench.run import Figure
from bench.support import Clock, FakeSms, InProcessTasks, Postgres, machine_busy_seconds
from shared import bootstrap, service
from shared.config import Settings
from shared.dev.sink import SmsSink
from shared.sms import TwilioSender, build_twilio_client
from shared.store.postgres import PostgresStore

MAIN = str(Path(__file__).resolve().parents[1] / "functions" / "main.py")
USERS = 300
WARMUP = 50
SINGLE = 400  # requests with one client, per round (and as many to the floor)
ROUNDS = 3  # alternating rounds of the one-client and floor runs, and of the 1- and 8-process runs
CPU_RATIO = 3.0  # issue 17: a schedule's Python CPU at most 3x the floor's
P99_RATIO = 10.0  # issue 17: p99 at 1 client at most 10x the floor's p50
PROCESS_GAIN = 1.6  # issue 17: 8 processes give at least 1.6x the requests/s of 1
PER_THREAD = 150  # requests per client with eight clients
PER_PROCESS = 200  # requests per process, with 1 process and with eight
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
        # While `timing` is set (one client only): each call's (wall, this thread's CPU), so the
        # ratio rows can say how much of a schedule is the database's round trips.
        self.timing: list[tuple[float, float]] | None = None

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
        if self.timing is None:
            return super().call(function, **args)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return super().call(function, **args)
        finally:
            self.timing.append((time.perf_counter() - wall, time.thread_time() - cpu))

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


def _floor_round(client: Any, users: list[uuid.UUID], latencies: list[float]) -> float:
    """One round of the floor: the same requests to a trivial function through the same app and test
    client (the part of a schedule's latency and CPU that no change to the use case or the database
    can remove); its CPU seconds."""
    cpu = time.process_time()
    _client_run(users, 0, SINGLE, latencies, client=client, expect=(201, "echo"))
    return time.process_time() - cpu


def _client_run(
    users: list[uuid.UUID],
    start: int,
    n: int,
    latencies: list[float],
    *,
    client: Any = None,
    expect: tuple[int, str] = (201, "schedule_message"),
) -> None:
    client = client or create_app("schedule_message", MAIN).test_client()
    for i in range(start, start + n):
        t = time.perf_counter()
        resp = client.post("/", json=_body(users[i % len(users)], i))
        latencies.append(time.perf_counter() - t)
        if resp.status_code != expect[0]:
            raise RuntimeError(f"{expect[1]} answered {resp.status_code}: {resp.get_data(as_text=True)}")


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


def _ratio_note(value: float, floor: float, unit: str) -> str:
    return f"{value:.2f} vs {floor:.2f} {unit}" if unit == "ms" else f"{value:,.0f} vs {floor:,.0f} {unit}"


def _single_rounds(
    store: CountingStore, users: list[uuid.UUID]
) -> tuple[list[float], list[float], list[float], list[float], float]:
    """ROUNDS rounds, each SINGLE schedules from one client then SINGLE floor requests, so that the
    VM's drift hits both alike: (schedule latencies, floor latencies, schedule CPU per request per
    round, floor CPU per request per round). CPU is this process's only: PostgreSQL's is not in it."""
    schedule = create_app("schedule_message", MAIN).test_client()
    floor = create_app("echo", FLOOR_APP).test_client()
    _client_run(users, 0, WARMUP, [], client=schedule)
    _client_run(users, 0, WARMUP, [], client=floor, expect=(201, "echo"))
    single: list[float] = []
    floor_lat: list[float] = []
    cpu: list[float] = []
    floor_cpu: list[float] = []
    calls = 0.0
    store.timing = []
    for k in range(ROUNDS):
        started = time.process_time()
        calls += _per(
            store,
            SINGLE,
            lambda at=10_000 + k * SINGLE: _client_run(users, at, SINGLE, single, client=schedule),
        )[0]
        cpu.append((time.process_time() - started) / SINGLE * 1000)
        store.timing, timed = None, store.timing
        floor_cpu.append(_floor_round(floor, users, floor_lat) / SINGLE * 1000)
        store.timing = timed
    return single, floor_lat, cpu, floor_cpu, calls / ROUNDS


def _single_figures(store: CountingStore, users: list[uuid.UUID]) -> tuple[float, list[Figure]]:
    """The store calls per schedule; the one-client figures and the ratios to the floor."""
    single, floor_lat, cpu, floor_cpu, calls = _single_rounds(store, users)
    timed, store.timing = store.timing or [], None
    note = "functions-framework's app and Flask's test client around a trivial function"
    cpu_ratio = statistics.median(c / f for c, f in zip(cpu, floor_cpu, strict=True))
    p99, floor_p50 = _pct(single, 99), _pct(floor_lat, 50)
    # Per request: its store calls' wall time (two round trips, the second a flushed commit) and the
    # CPU this process spends in them (psycopg, the pool, decoding the answers).
    per = max(1, round(calls))
    db_wall = [sum(w for w, _ in timed[i : i + per]) for i in range(0, len(timed) - per + 1, per)]
    db_cpu = sum(c for _, c in timed) / max(1, len(db_wall)) * 1000
    med_cpu, med_floor = statistics.median(cpu), statistics.median(floor_cpu)
    cpu_note = (
        f"median of the rounds' ratios; {_ratio_note(med_cpu, med_floor, 'ms')}; of a schedule's CPU "
        f"{db_cpu:.2f} ms is in its {per} store calls (psycopg, the pool, decoding): the floor plus "
        f"them alone is {(med_floor + db_cpu) / med_floor:.2f}× the floor, and the rest "
        f"({med_cpu - db_cpu - med_floor:.2f} ms: parsing, policy, rendering, answer) "
        f"{(med_cpu - db_cpu - med_floor) / med_floor:.2f}× more"
    )
    room = CPU_RATIO * med_floor - med_floor - db_cpu
    if cpu_ratio > CPU_RATIO:
        cpu_note += (
            f"; within {CPU_RATIO:.0f}× that rest would have {max(room, 0):.2f} ms, "
            f"{max(room, 0) / max(med_cpu - db_cpu - med_floor, 1e-9):.0%} of what it takes"
        )
    p99_note = (
        f"{_ratio_note(p99, floor_p50, 'ms')}; the {per} store calls alone (round trips to PostgreSQL "
        f"on this machine, the second with a flushed commit) take p50 {_pct(db_wall, 50):.2f} ms, "
        f"p99 {_pct(db_wall, 99):.2f} ms of a schedule's wall time: their p50 alone is "
        f"{_pct(db_wall, 50) / floor_p50:.1f}× the floor's p50, which is an in-process call "
        f"with no I/O, and their p99 alone {_pct(db_wall, 99) / floor_p50:.1f}×"
    )
    if p99 / floor_p50 > P99_RATIO:
        p99_note += (
            f": within {P99_RATIO:.0f}× ({P99_RATIO * floor_p50:.2f} ms) the rest of a p99 schedule "
            f"would have {max(P99_RATIO * floor_p50 - _pct(db_wall, 99), 0):.2f} ms, where its CPU "
            f"outside the store calls alone is {med_cpu - db_cpu:.2f} ms"
        )
    return calls, [
        Figure("schedule_message p50, 1 client", _pct(single, 50), "ms"),
        Figure("schedule_message p99, 1 client", p99, "ms"),
        Figure("schedule_message req/s, 1 client", len(single) / sum(single), "/s"),
        Figure(
            "schedule_message Python CPU per request, 1 client",
            statistics.median(cpu),
            "ms",
            note=f"median of {ROUNDS} rounds: {', '.join(f'{c:.2f}' for c in cpu)}",
        ),
        Figure("floor p50, 1 client", floor_p50, "ms", note=note),
        Figure(
            "floor CPU per request, 1 client",
            statistics.median(floor_cpu),
            "ms",
            note=f"{note}; rounds: {', '.join(f'{c:.2f}' for c in floor_cpu)}",
        ),
        Figure(
            "schedule_message CPU / floor CPU, per request",
            cpu_ratio,
            "×",
            CPU_RATIO,
            higher_is_better=False,
            note=cpu_note,
        ),
        Figure(
            "schedule_message p99, 1 client / floor p50",
            p99 / floor_p50,
            "×",
            P99_RATIO,
            higher_is_better=False,
            note=p99_note,
        ),
        Figure(
            "schedule_message: its store calls' wall time per request, p50",
            _pct(db_wall, 50),
            "ms",
            note="mq_user_context then mq_enqueue, 1 client",
        ),
        Figure("schedule_message: its store calls' wall time per request, p99", _pct(db_wall, 99), "ms"),
    ]


def _schedule_figures(store: CountingStore, users: list[uuid.UUID]) -> list[Figure]:
    tasks = InProcessTasks()
    container = bootstrap.Container(Settings(), store=store, tasks=tasks)
    previous = bootstrap.install(container)
    try:
        calls, figures = _single_figures(store, users)  # no pool check: PostgresStore runs none
        multi, wall8 = _load(users, THREADS, PER_THREAD, 20_000)
        store.pool_check(True)
        nocheck: list[float] = []
        calls_nc, checks_nc = _per(store, SINGLE, lambda: nocheck.extend(_load(users, 1, SINGLE, 30_000)[0]))
        store.pool_check(False)
    finally:
        bootstrap.install(previous)
    pool = f"pool max {store._pool.max_size}"
    return [
        *figures,
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
            calls,
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


def _clients_figures(latencies: list[float], wall: float, note: str, clients: int = THREADS) -> list[Figure]:
    # No targets: issue 17 retired p99 <= 15 ms at 8 clients and >= 300 req/s (on 2 cores, 8 closed
    # loops measure the machine); 8 processes against 1 (below) is the figure with a target.
    label = f"{clients} {'client' if clients == 1 else 'clients'}"
    return [
        Figure(f"schedule_message p50, {label}", _pct(latencies, 50), "ms", note=note),
        Figure(f"schedule_message p99, {label}", _pct(latencies, 99), "ms", note=note),
        Figure(f"schedule_message req/s, {label}", len(latencies) / wall, "/s", note=note),
    ]


def _instance(url: str, users: list[str], offset: int, start: Any, out: Any) -> None:
    """One process as one deployed instance: its own app, store (DB_POOL_MAX 1) and interpreter."""
    logging.disable(logging.INFO)
    store = PostgresStore(url, max_size=1)
    bootstrap.install(bootstrap.Container(Settings(), store=store, tasks=InProcessTasks()))
    ids = [uuid.UUID(u) for u in users]
    try:
        client = create_app("schedule_message", MAIN).test_client()
        _client_run(ids, offset, 20, [], client=client)  # warm the connection and the plans
        start.wait()
        latencies: list[float] = []
        began, cpu = time.perf_counter(), time.process_time()
        _client_run(ids, offset + 20, PER_PROCESS, latencies, client=client)
        out.put((latencies, began, time.perf_counter(), time.process_time() - cpu))
    except BaseException as exc:  # reported by the parent
        out.put(exc)
    finally:
        store.close()


@dataclass(frozen=True)
class ProcessRun:
    latencies: list[float]
    wall: float  # seconds, the first process's start of its requests to the last one's end
    busy_cores: float | None  # the machine's busy CPU seconds over the run / its wall time
    client_cpu: float  # seconds of CPU the n processes themselves used for their requests

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    @property
    def machine_ms(self) -> float | None:
        """The whole machine's CPU per request (these processes, their PostgreSQL backends, the rest)."""
        return None if self.busy_cores is None else self.busy_cores * self.wall / len(self.latencies) * 1000

    @property
    def client_ms(self) -> float:
        return self.client_cpu / len(self.latencies) * 1000


def _processes(url: str, users: list[uuid.UUID], n: int, offset: int) -> ProcessRun:
    """n processes, each an instance taking one request at a time (as deployed:
    max_instance_request_concurrency = 1), so no two requests share an interpreter lock: their
    latencies, the wall time from the first start to the last end, and how many of the machine's
    cores were busy meanwhile (the processes' start-up is before the barrier, so not in it)."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(n + 1)
    out = ctx.Queue()
    names = [str(u) for u in users]
    procs = [
        ctx.Process(target=_instance, args=(url, names, offset + k * 1_000, start, out)) for k in range(n)
    ]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=120)
        busy0, began = machine_busy_seconds(), time.perf_counter()
        results = [out.get(timeout=300) for _ in procs]
        busy1, ended = machine_busy_seconds(), time.perf_counter()
    finally:
        for p in procs:
            p.join(timeout=30)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    latencies = [x for r in results for x in r[0]]
    busy = None if busy0 is None or busy1 is None else (busy1 - busy0) / (ended - began)
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return ProcessRun(latencies, wall, busy, sum(r[3] for r in results))


def _cores_note(one: list[ProcessRun], many: list[ProcessRun]) -> str:
    """Why the gain is what it is on this machine: the cores one process already keeps busy bound
    it (the most n processes can add is cores / that), and what each request costs the whole
    machine when n processes take turns on it. The gain is the product of the two ratios."""
    if any(r.busy_cores is None for r in (*one, *many)):
        return ""
    cores = os.cpu_count() or 1
    busy1 = statistics.median(r.busy_cores or 0.0 for r in one)
    busy8 = statistics.median(r.busy_cores or 0.0 for r in many)
    ms1 = statistics.median(r.machine_ms or 0.0 for r in one)
    ms8 = statistics.median(r.machine_ms or 0.0 for r in many)
    client1 = statistics.median(r.client_ms for r in one)
    client8 = statistics.median(r.client_ms for r in many)
    return (
        f"; 1 process keeps {busy1:.2f} of the {cores} cores busy (its client and its PostgreSQL "
        f"backend take turns), so here no number of processes can give more than {cores / busy1:.2f}×; "
        f"{THREADS} keep {busy8:.2f} busy ({busy8 / busy1:.2f}×), and a request costs the whole machine "
        f"{ms8:.2f} ms of CPU against {ms1:.2f} with one ({ms1 / ms8:.2f}×: {2 * THREADS} processes "
        f"taking turns on {cores} cores), of which the schedule processes' own {client8:.2f} against "
        f"{client1:.2f} ms and PostgreSQL and the rest {ms8 - client8:.2f} against {ms1 - client1:.2f} ms"
    )


def _schedule_processes(url: str, users: list[uuid.UUID]) -> list[Figure]:
    """1 process and THREADS processes, measured the same way, in ROUNDS alternating rounds; the
    latencies pooled over the rounds, the gain the median of the rounds' gains."""
    runs1: list[ProcessRun] = []
    runs8: list[ProcessRun] = []
    for k in range(ROUNDS):
        runs1.append(_processes(url, users, 1, 60_000 + k * 20_000))
        runs8.append(_processes(url, users, THREADS, 70_000 + k * 20_000))
    one = [x for r in runs1 for x in r.latencies]
    many = [x for r in runs8 for x in r.latencies]
    rates = [(o.rate, m.rate) for o, m in zip(runs1, runs8, strict=True)]
    gain = statistics.median(m / o for o, m in rates)
    rate1 = statistics.median(o for o, _ in rates)
    rate8 = statistics.median(m for _, m in rates)
    note = f"{PER_PROCESS} requests each, median of {ROUNDS} rounds"
    return [
        Figure("schedule_message req/s, 1 process", rate1, "/s", note=f"one request at a time, {note}"),
        Figure("schedule_message p99, 1 process", _pct(one, 99), "ms", note="one request at a time"),
        Figure(
            f"schedule_message req/s, {THREADS} processes",
            rate8,
            "/s",
            note=f"one request at a time each, {note}",
        ),
        Figure(
            f"schedule_message p50, {THREADS} processes",
            _pct(many, 50),
            "ms",
            note="one request at a time each",
        ),
        Figure(
            f"schedule_message p99, {THREADS} processes",
            _pct(many, 99),
            "ms",
            note="one request at a time each",
        ),
        Figure(
            f"schedule_message req/s, {THREADS} processes / 1 process",
            gain,
            "×",
            PROCESS_GAIN,
            note=f"rounds: {', '.join(f'{m / o:.2f}' for o, m in rates)}; {_ratio_note(rate8, rate1, '/s')}"
            + _cores_note(runs1, runs8),
        ),
    ]


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
