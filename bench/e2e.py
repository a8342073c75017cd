"""End-to-end lateness and fairness with the real processes (issue 17, items 3 and 4).

The local stack (shared.dev.stack: every function a functions-framework process, the Cloud Tasks
emulator, the SMS sink, all on loopback) against a fresh bench database. Messages are scheduled
through schedule_message over HTTP, one user each, at their allowed instants: the users have quiet
hours off and fictional numbers (no US calling hours), so each schedule answer's `scheduledFor` is
the request's own instant, which the run checks. A message's lateness is the sink's arrival time
minus that `scheduledFor` (every process reads the same machine clock).

- The emulator's own dispatch delay: tasks with a schedule_time to a tiny HTTP target in this
  process, arrival minus schedule_time, on an otherwise idle emulator.
- Fairness: the same run while one user has FLOOD messages queued whose tasks fire during the run.
  USER_QUEUE_LIMIT (50) refuses that backlog through the API, and through the API the policy
  would park it days ahead anyway, so it is inserted set-based in SQL, and its tasks are created
  through the real Cloud Tasks client, one at each row's scheduled_for, spread over the run. When
  they fire they really compete: deliver_message claims each, the policy defers it (the user's
  cooldown and hourly limit), and a new task is created. The flood run sits between two runs
  without it and is compared with their mean; the two quiet runs' own ratio is reported beside it.

BENCH_E2E_SECONDS (default 300) sets the run's length for development runs; the message counts
scale with it (300 messages and a 1,200-message flood per 5 minutes).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg

from bench.lateness import PRIORITIES, QUEUE_CONCURRENCY, QUEUE_RATE, Msg, ours, seed_design
from bench.run import Figure
from bench.support import Postgres, pct
from shared.dev.stack import QUEUE_PATH, LocalStack, Ports
from shared.dev.tasks_emulator import TasksEmulator
from shared.tasks import CloudTasksQueue, build_tasks_client

SECONDS = float(os.environ.get("BENCH_E2E_SECONDS", "300"))
MESSAGES = max(10, round(300 * SECONDS / 300))
FLOOD = max(40, round(1_200 * SECONDS / 300))
PROBES = max(20, round(100 * SECONDS / 300))  # emulator dispatch probes
PROBE_LEAD = 1.0  # seconds between creating a probe task and its schedule_time
USER_PREFIX = "+1559"
FLOOD_PHONE = "+15580000000"
WARMUP = 3  # messages through the whole chain before the run: cold starts are the Cold start section's
ARRIVAL_TIMEOUT = 60.0  # after the last schedule, for the last arrivals
TARGET_P99 = 1.0
TARGET_FAIRNESS = 1.2
ABOUT = (
    f"The local stack as processes (functions-framework per function, the Cloud Tasks emulator, the SMS "
    f"sink; sweep off): {MESSAGES} messages scheduled through schedule_message over HTTP over "
    f"{SECONDS:.0f} s, one user each, allowed at once (quiet hours off, no calling hours: checked on "
    "each answer's scheduledFor); lateness is the sink's arrival minus scheduledFor. The emulator's "
    "own dispatch delay is measured on its own (tasks to a tiny HTTP target). Fairness: the same run "
    f"while one user's {FLOOD:,} queued messages (inserted in SQL, tasks created through the real "
    "client, spread over the run) fire and are deferred by the policy; it runs between two runs "
    "without the flood and is compared with their mean. Each run starts after "
    f"{WARMUP} warm-up messages (cold starts are their own section). The deployed queue's dispatch "
    "rate, which the emulator does not apply, is simulated on the same times. BENCH_E2E_SECONDS "
    "shortens it."
)


@dataclass(frozen=True)
class Run:
    lateness: list[float]  # seconds, one per message, in scheduling order
    allowed: list[float]  # seconds after the run's start
    flood_fired: int  # flood messages deliver_message handled (sent or deferred) during the run
    deliver_cpu: float  # CPU seconds deliver_message's processes used from the start to the last arrival


def _cpu_seconds(pgid: int) -> float:
    """User + system CPU of every live process in the process group (Linux /proc)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- the emulator on its own ---------------------------------------------------------------------


class _Probe(BaseHTTPRequestHandler):
    arrivals: dict[int, float]

    def do_POST(self) -> None:
        at = time.time()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        self.arrivals.setdefault(int(body["probe"]), at)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def emulator_dispatch(n: int = PROBES, *, stock: bool = False, parked: int = 0) -> list[float]:
    """Seconds from schedule_time to the request reaching a target that does nothing, for n tasks
    created PROBE_LEAD ahead, one every 0.1 s, with `parked` other tasks pending an hour ahead
    (as a deferred backlog is); `stock`: the emulator package's own dispatch loop, not ours."""
    from google.cloud import tasks_v2
    from google.protobuf import timestamp_pb2

    arrivals: dict[int, float] = {}
    handler = type("Probe", (_Probe,), {"arrivals": arrivals})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    def task(k: int, at: float) -> tasks_v2.Task:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(at * 1e9))
        body = json.dumps({"probe": k}).encode()
        request = tasks_v2.HttpRequest(url=url, http_method=tasks_v2.HttpMethod.POST, body=body)
        return tasks_v2.Task(http_request=request, schedule_time=stamp)

    due: dict[int, float] = {}
    try:
        with (
            TasksEmulator(QUEUE_PATH, stock_dispatch=stock) as emulator,
            build_tasks_client(emulator.host) as client,
        ):
            for _ in range(parked):
                client.create_task(parent=QUEUE_PATH, task=task(-1, time.time() + 3600))
            for k in range(n):
                created = client.create_task(parent=QUEUE_PATH, task=task(k, time.time() + PROBE_LEAD))
                due[k] = created.schedule_time.timestamp()
                time.sleep(0.1)
            deadline = time.monotonic() + 30
            while len(arrivals) < n and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        server.shutdown()
        server.server_close()
    if len(arrivals) < n:
        raise RuntimeError(f"only {len(arrivals)} of {n} probe tasks arrived within 30 s")
    return [arrivals[k] - due[k] for k in range(n)]


# -- the stack ------------------------------------------------------------------------------------


@contextmanager
def _stack(url: str) -> Iterator[LocalStack]:
    with tempfile.TemporaryDirectory(prefix="mq-bench-e2e-") as tmp:
        stack = LocalStack(
            Path(tmp) / "stack",
            ports=Ports.free(),
            database_url=url,
            extra_env={"LOG_LEVEL": "WARNING"},
            quiet=True,
            use_pubsub=False,
            sweep_interval=0,  # the sweep would only re-task what Cloud Tasks lost: nothing here
        )
        with stack:  # stops every process it started, on error too
            yield stack


def _seed_users(conn: psycopg.Connection[Any], n: int) -> list[str]:
    """n users with quiet hours off (and the flood's user), numbers on a fictional prefix (not a
    valid US number, so no calling hours): each message is allowed when it is scheduled."""
    since = datetime.now(UTC) - timedelta(days=30)
    conn.execute(
        "insert into users (phone_number, timezone, quiet_hours_enabled, created_at, updated_at)"
        " select %s || lpad(g::text, 7, '0'), 'UTC', false, %s, %s from generate_series(0, %s - 1) g",
        [USER_PREFIX, since, since, n],
    )
    conn.execute(
        "insert into users (phone_number, timezone, quiet_hours_enabled, created_at, updated_at)"
        " values (%s, 'UTC', false, %s, %s)",
        [FLOOD_PHONE, since, since],
    )
    rows = conn.execute(
        "select id from users where phone_number like %s || '%%' order by phone_number", [USER_PREFIX]
    ).fetchall()
    return [str(r[0]) for r in rows]


def _seed_flood(conn: psycopg.Connection[Any], stack: LocalStack, n: int, start: datetime) -> None:
    """n queued messages for the flood user, scheduled_for spread evenly over the run, inserted in
    one statement; then one Cloud Task each at its scheduled_for, created through the real client."""
    step = SECONDS / n
    rows = conn.execute(
        """
        insert into message_queue (user_id, agent_id, message_data, final_message, scheduled_for,
                                   priority, status, can_delay, reason, created_at, updated_at)
        select u.id, 'bench_flood', jsonb_build_object('content', 'flood ' || g), 'flood ' || g,
               %(start)s + make_interval(secs => g * %(step)s), 'medium', 'queued', true, 'scheduled',
               %(now)s, %(now)s
        from generate_series(0, %(n)s - 1) g
        cross join (select id from users where phone_number = %(phone)s) u
        returning id, task_generation, scheduled_for
        """,
        {"start": start, "step": step, "now": datetime.now(UTC), "n": n, "phone": FLOOD_PHONE},
    ).fetchall()
    conn.execute("analyze message_queue")
    with build_tasks_client(stack.function_env()["CLOUD_TASKS_EMULATOR_HOST"]) as client:
        tasks = CloudTasksQueue(
            client, queue_path=QUEUE_PATH, deliver_url=stack.deliver_url, service_account=None
        )
        for mid, generation, at in rows:
            tasks.schedule(uuid.UUID(str(mid)), generation, at, datetime.now(UTC))


def _warm_up(stack: LocalStack, users: list[str]) -> None:
    """A few messages through every process first: a steady stream keeps instances warm, and the
    first request of a fresh process (imports, connections) is the Cold start section's figure."""
    scheduled = _schedule_all(stack, users, datetime.now(UTC), spacing=0.2)
    arrived = _arrivals(stack, {c for c, _ in scheduled}, time.monotonic() + ARRIVAL_TIMEOUT)
    if len(arrived) < len(scheduled):
        raise RuntimeError(f"only {len(arrived)} of {len(scheduled)} warm-up messages reached the sink")


def _schedule_all(
    stack: LocalStack, users: list[str], start: datetime, *, spacing: float | None = None
) -> list[tuple[str, datetime]]:
    """Schedule one message per user, the k-th at start + k * SECONDS / len(users); returns each
    message's content and allowed instant (the answer's scheduledFor, checked to be the request's
    own instant)."""
    step = SECONDS / len(users) if spacing is None else spacing
    out: list[tuple[str, datetime]] = []
    for k, user in enumerate(users):
        pause = (start + timedelta(seconds=k * step) - datetime.now(UTC)).total_seconds()
        if pause > 0:
            time.sleep(pause)
        content = f"e2e {k} {uuid.uuid4().hex[:8]}"
        body = {
            "userId": user,
            "agentId": "bench_e2e",
            "messageData": {"content": content},
            "priority": PRIORITIES[k % len(PRIORITIES)],
        }
        asked = datetime.now(UTC)
        status, answer = stack.post_json(stack.schedule_url, body)
        answered = datetime.now(UTC)
        if status != 201:
            raise RuntimeError(f"schedule {k} answered {status}: {answer}")
        allowed = datetime.fromisoformat(answer["scheduledFor"].replace("Z", "+00:00"))
        # scheduledFor is in milliseconds: allow for its rounding.
        if not asked - timedelta(milliseconds=1) <= allowed <= answered + timedelta(milliseconds=1):
            raise RuntimeError(f"message {k} is not allowed when scheduled: {answer}")
        out.append((content, allowed))
    return out


def _arrivals(stack: LocalStack, contents: set[str], deadline: float) -> dict[str, datetime]:
    found: dict[str, datetime] = {}
    while True:
        for m in stack.sink_messages():
            if m["body"] in contents:
                found.setdefault(m["body"], datetime.fromisoformat(m["received_at"]))
        if len(found) == len(contents) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def lateness_run(pg: Postgres, *, flood: int = 0) -> Run:
    with pg.database() as url, _stack(url) as stack, psycopg.connect(url, autocommit=True) as conn:
        users = _seed_users(conn, WARMUP + MESSAGES)
        _warm_up(stack, users[:WARMUP])
        users = users[WARMUP:]
        start = datetime.now(UTC) + timedelta(seconds=3)
        if flood:
            _seed_flood(conn, stack, flood, start)
            start = max(start, datetime.now(UTC) + timedelta(seconds=1))
        cpu = _cpu_seconds(stack.pid_of("deliver_message"))
        scheduled = _schedule_all(stack, users, start)
        arrived = _arrivals(stack, {c for c, _ in scheduled}, time.monotonic() + ARRIVAL_TIMEOUT)
        cpu = _cpu_seconds(stack.pid_of("deliver_message")) - cpu
        fired = 0
        if flood:
            row = conn.execute(
                "select count(*) from message_queue m join users u on u.id = m.user_id"
                " where u.phone_number = %s and (m.status <> 'queued' or m.task_generation > 0)",
                [FLOOD_PHONE],
            ).fetchone()
            fired = int(row[0]) if row else 0
    missing = [c for c, _ in scheduled if c not in arrived]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(scheduled)} messages never reached the sink")
    return Run(
        lateness=[(arrived[c] - at).total_seconds() for c, at in scheduled],
        allowed=[(at - start).total_seconds() for _, at in scheduled],
        flood_fired=fired,
        deliver_cpu=cpu,
    )


def deployed_pacing(quiet: Run, flood: int) -> tuple[float, float]:
    """Others' p99 lateness with the deployed queue's dispatch rate (QUEUE_RATE/s, QUEUE_CONCURRENCY
    in flight; the emulator applies no rate limit), simulated on the run's allowed times and
    measured lateness, without and with the flood's first firings spread over the run."""
    step = SECONDS / flood
    mixed = sorted(
        [(a, False) for a in quiet.allowed] + [(k * step, True) for k in range(flood)], key=lambda m: m[0]
    )

    def others(msgs: list[tuple[float, bool]]) -> float:
        late = ours(
            [Msg(a, "medium") for a, _ in msgs],
            quiet.lateness,
            delay=0.0,
            rate=QUEUE_RATE,
            concurrency=QUEUE_CONCURRENCY,
        )
        return pct([x for x, (_, flooded) in zip(late, msgs, strict=True) if not flooded], 99)

    return others([(a, False) for a in sorted(quiet.allowed)]), others(mixed)


def _ms(xs: list[float], q: float) -> float:
    return (max(xs) if q == 100 else pct(xs, q)) * 1000


def _dispatch_figures() -> list[Figure]:
    stock = emulator_dispatch(stock=True)
    stock_parked = emulator_dispatch(stock=True, parked=FLOOD)
    on_time = emulator_dispatch()
    on_time_parked = emulator_dispatch(parked=FLOOD)
    probe = f"{PROBES} tasks to an empty HTTP target, arrival minus schedule_time"
    return [
        Figure(
            "emulator dispatch delay p50, the package's own loop",
            _ms(stock, 50),
            "ms",
            note=f"{probe}; it walks its tasks every 0.1 s and sends one at a time: a stand-in's artefact",
        ),
        Figure("emulator dispatch delay p99, the package's own loop", _ms(stock, 99), "ms"),
        Figure(
            "emulator dispatch delay p99, the package's own loop, backlog pending",
            _ms(stock_parked, 99),
            "ms",
            note=f"{FLOOD:,} other tasks pending an hour ahead",
        ),
        Figure(
            "emulator dispatch delay p50, on-time dispatch",
            _ms(on_time, 50),
            "ms",
            note=f"{probe}; shared/dev/tasks_emulator.py's heap by schedule_time, 10 in flight (used below)",
        ),
        Figure("emulator dispatch delay p99, on-time dispatch", _ms(on_time, 99), "ms"),
        Figure("emulator dispatch delay max, on-time dispatch", _ms(on_time, 100), "ms"),
        Figure(
            "emulator dispatch delay p99, on-time dispatch, backlog pending",
            _ms(on_time_parked, 99),
            "ms",
            note=f"{FLOOD:,} other tasks pending an hour ahead",
        ),
    ]


def _fairness_note(
    p99_flood: float, quiet: tuple[float, float], spread: float, flooded: Run, base: Run
) -> str:
    ratio = p99_flood / (sum(quiet) / 2)
    note = (
        f"{p99_flood * 1000:.0f} ms / the mean of the runs before and after it without the flood, "
        f"{quiet[0] * 1000:.0f} and {quiet[1] * 1000:.0f} ms; deliver_message used {flooded.deliver_cpu:.1f} "
        f"CPU-s under the flood against {base.deliver_cpu:.1f} without, on {os.cpu_count()} cores shared by "
        "every process here (deployed, the flood's deliveries run on other instances)"
    )
    if ratio > TARGET_FAIRNESS and spread >= ratio:
        note += (
            f"; the two runs without the flood differ by {spread:.2f}× between themselves, more than this "
            "ratio: at these p99s the machine's own variation exceeds the target's margin"
        )
    return note


def run(pg: Postgres) -> list[Figure]:
    figures = _dispatch_figures()
    # The flood run sits between two runs without it, and is compared with their mean: the machine
    # drifts over a quarter of an hour, and the two quiet runs' own ratio shows how finely a p99 of
    # tens of milliseconds can be compared here at all.
    quiet = lateness_run(pg)
    flooded = lateness_run(pg, flood=FLOOD)
    quiet_after = lateness_run(pg)
    seed = seed_design([Msg(a, PRIORITIES[k % len(PRIORITIES)]) for k, a in enumerate(quiet.allowed)])
    base = f"{MESSAGES} messages over {SECONDS:.0f} s, one user each, through the real processes"
    p99, p99_after = pct(quiet.lateness, 99), pct(quiet_after.lateness, 99)
    p99_flood = pct(flooded.lateness, 99)
    p99_quiet = (p99 + p99_after) / 2
    ratio = p99_flood / p99_quiet if p99_quiet > 0 else float("inf")
    spread = max(p99, p99_after) / min(p99, p99_after) if min(p99, p99_after) > 0 else float("inf")
    paced_quiet, paced_flood = deployed_pacing(quiet, FLOOD)
    flood_note = (
        f"{base}, while {flooded.flood_fired:,} of one user's {FLOOD:,} queued messages fired and went "
        "through deliver_message (1 sent, the rest deferred by the policy)"
    )
    return [
        *figures,
        Figure(
            "e2e lateness p50", pct(quiet.lateness, 50), "s", note=f"{base}: sink arrival minus scheduledFor"
        ),
        Figure("e2e lateness p99", p99, "s", TARGET_P99, higher_is_better=False),
        Figure("e2e lateness max", max(quiet.lateness), "s"),
        Figure(
            "e2e lateness p99, the same run again after the flood's",
            p99_after,
            "s",
            TARGET_P99,
            higher_is_better=False,
        ),
        Figure(
            "e2e lateness p99 of the two runs without the flood, the larger / the smaller",
            spread,
            "×",
            note="the same run twice, nothing changed between them: how finely two p99s compare here",
        ),
        Figure(
            "lateness p50, seed design, same allowed times",
            pct(seed, 50),
            "s",
            note="simulated: a poll every 30 s, 50 per poll",
        ),
        Figure("lateness p99, seed design, same allowed times", pct(seed, 99), "s"),
        Figure("e2e lateness p50 under a flood", pct(flooded.lateness, 50), "s", note=flood_note),
        Figure("e2e lateness p99 under a flood", p99_flood, "s"),
        Figure("e2e lateness max under a flood", max(flooded.lateness), "s"),
        Figure(
            "fairness: others' p99 under the flood / without it",
            ratio,
            "×",
            TARGET_FAIRNESS,
            higher_is_better=False,
            note=_fairness_note(p99_flood, (p99, p99_after), spread, flooded, quiet),
        ),
        Figure(
            "others' p99, deployed queue pacing, simulated, without the flood",
            paced_quiet,
            "s",
            note=(
                f"the run's allowed times and lateness, the queue at {QUEUE_RATE:.0f}/s, "
                f"{QUEUE_CONCURRENCY} in flight"
            ),
        ),
        Figure(
            "others' p99, deployed queue pacing, simulated, under the flood",
            paced_flood,
            "s",
            note=(
                f"as above plus the flood's {FLOOD:,} first firings: its tasks take the queue's shared rate "
                "though the policy only defers them (the emulator applies no rate limit, so the runs "
                "above cannot show it)"
            ),
        ),
    ]
