"""Lateness: how long after its allowed time each message goes out, the seed's design against ours,
on the same backlog (the same allowed times and priorities), on a virtual clock.

- The seed's design (simulated): a poller every POLL_SECONDS takes at most POLL_BATCH due messages,
  most important lane first, then the earliest; a message's lateness is the poll that sent it minus
  its allowed time.
- Ours: every message has a Cloud Task at its allowed instant; Cloud Tasks fires it after
  CLOUD_TASKS_DISPATCH_DELAY (an assumption, not measured here), and deliver_message runs. Its part
  is measured: real deliveries through functions-framework's deliver_message, in-process, against
  the bench database (Twilio faked in-process), from the request to mq_record_sent's answer. Each
  simulated message draws one of those measured latencies.

Quiet hours are off for the bench users so that each message's allowed time is its scheduled time
(the policy still runs on every delivery). Twilio's own API time is left out of both designs (the
same call in both; the seed makes its 50 calls one after another, so its real lateness is worse).
"""

from __future__ import annotations

import heapq
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from functions_framework import create_app

from bench.run import Figure
from bench.support import Clock, FakeSms, InProcessTasks, Postgres, pct
from bench.sweep import T0, seed_queued, seed_users
from shared import bootstrap
from shared.config import Settings
from shared.store.postgres import PostgresStore

MAIN = str(Path(__file__).resolve().parents[1] / "functions" / "main.py")
MESSAGES = 2_000  # simulated, allowed times spread over SPREAD_SECONDS
SPREAD_SECONDS = 3_600
POLL_SECONDS = 30.0  # the seed's poller
POLL_BATCH = 50
# Assumed: Cloud Tasks dispatches an HTTP task this long after its schedule_time (typically well
# under a second; Google publishes no figure). A warm instance is assumed too: at ~0.5 message/s
# deliver_message's instances stay warm (min_instance_count is 0; a cold start adds seconds).
CLOUD_TASKS_DISPATCH_DELAY = 0.5
# The deployed delivery queue (infra/terraform: sender_throughput_per_second, delivery_concurrency)
# for the second figure of ours; the token bucket's burst is Cloud Tasks' choice, assumed 1 here.
QUEUE_RATE = 1.0
QUEUE_BURST = 1
QUEUE_BURST_LARGE = 10
QUEUE_CONCURRENCY = 10
SHORT_CODE_RATE = 100.0  # a short code's throughput, the top of sender_throughput_per_second's range
SAMPLE = 300  # real deliveries measured
RANK = {"urgent": 0, "high": 1, "medium": 2, "low": 3}
PRIORITIES = ("urgent", "high", "medium", "medium", "low")
TARGET_P99 = 1.0
ABOUT = (
    f"The same {MESSAGES:,} messages (allowed times spread over an hour, or all at one instant for the "
    "burst rows) on a virtual clock. Seed design, simulated: a poll every "
    f"{POLL_SECONDS:.0f} s takes at most {POLL_BATCH} due messages, most important lane first. Ours: a "
    f"Cloud Task at each allowed instant, fired {CLOUD_TASKS_DISPATCH_DELAY} s later (assumed: "
    "CLOUD_TASKS_DISPATCH_DELAY), then one of the measured real deliveries (functions-framework's "
    "deliver_message in-process, to mq_record_sent's answer). Twilio's API time is in neither; "
    "quiet hours are off for these users so the allowed time is the scheduled time."
)


@dataclass(frozen=True)
class Msg:
    allowed: float  # seconds after the start of the hour
    priority: str


def backlog(n: int = MESSAGES, spread: float = SPREAD_SECONDS, seed: int = 11) -> list[Msg]:
    rnd = random.Random(seed)
    return sorted(
        (Msg(rnd.uniform(0, spread), PRIORITIES[i % len(PRIORITIES)]) for i in range(n)),
        key=lambda m: m.allowed,
    )


def seed_design(msgs: list[Msg], *, interval: float = POLL_SECONDS, batch: int = POLL_BATCH) -> list[float]:
    """Lateness of each message under the seed's poller (first poll at a random phase)."""
    phase = random.Random(3).uniform(0, interval)
    due: list[tuple[int, float]] = []
    late: list[float] = []
    i, poll = 0, phase
    while len(late) < len(msgs):
        while i < len(msgs) and msgs[i].allowed <= poll:
            heapq.heappush(due, (RANK[msgs[i].priority], msgs[i].allowed))
            i += 1
        for _ in range(min(batch, len(due))):
            _, allowed = heapq.heappop(due)
            late.append(poll - allowed)
        poll += interval
    return late


def ours(
    msgs: list[Msg],
    service: list[float],
    *,
    delay: float = CLOUD_TASKS_DISPATCH_DELAY,
    rate: float | None = None,
    burst: int = QUEUE_BURST,
    concurrency: int | None = None,
) -> list[float]:
    """Lateness of each message with a task at its allowed instant: dispatch delay, then (with a
    rate) a token bucket of `burst` refilled at `rate`/s and at most `concurrency` in flight, then
    one measured delivery latency (drawn in turn from `service`)."""
    rnd = random.Random(5)
    late: list[float] = []
    tokens, last = float(burst), 0.0
    slots: list[float] = [0.0] * (concurrency or 0)
    for m in msgs:  # Cloud Tasks dispatches in schedule_time order
        t = m.allowed + delay
        if rate is not None:
            tokens = min(float(burst), tokens + (t - last) * rate)
            if tokens < 1:
                t += (1 - tokens) / rate
                tokens = 1.0
            tokens -= 1
            last = t
        s = rnd.choice(service)
        if concurrency:
            free = heapq.heappop(slots)
            t = max(t, free)
            heapq.heappush(slots, t + s)
        late.append(t + s - m.allowed)
    return late


class _RecordTimer(PostgresStore):
    """Notes when mq_record_sent answered, per thread: the end of a delivery's latency."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(conninfo, max_size=2)
        self.local = threading.local()

    def record_sent(self, *args: Any, **kwargs: Any) -> bool:
        ok = super().record_sent(*args, **kwargs)
        self.local.recorded = time.perf_counter()
        return ok


def measure_deliveries(pg: Postgres, n: int = SAMPLE) -> list[float]:
    """Seconds from a Cloud Task's request reaching deliver_message to mq_record_sent's answer,
    for n real deliveries (one worker; functions-framework in-process; Twilio faked)."""
    with pg.database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            seed_users(conn, n, prefix="+1558", quiet_hours=False)
            seed_queued(
                conn,
                n,
                prefix="+1558",
                scheduled_from=T0 - timedelta(seconds=1),
                spread_seconds=1,
                touched_at=T0 - timedelta(seconds=2),
            )
            rows = conn.execute(
                "select id, task_generation from message_queue where status = 'queued' order by scheduled_for"
            ).fetchall()
        store = _RecordTimer(url)
        container = bootstrap.Container(
            Settings(), store=store, tasks=InProcessTasks(), sms=FakeSms(), clock=Clock(T0)
        )
        previous = bootstrap.install(container)
        try:
            client = create_app("deliver_message", MAIN).test_client()
            latencies: list[float] = []
            for k, (mid, generation) in enumerate(rows):
                body = {"messageId": str(uuid.UUID(str(mid))), "generation": generation}
                started = time.perf_counter()
                resp = client.post("/", json=body, headers={"X-CloudTasks-TaskRetryCount": "0"})
                if resp.status_code != 200 or resp.get_json().get("action") != "sent":
                    raise RuntimeError(f"delivery {k} did not send: {resp.get_data(as_text=True)}")
                latencies.append(store.local.recorded - started)
        finally:
            bootstrap.install(previous)
            store.close()
    return latencies[min(20, n // 10) :]  # the first few warm the app and the connections


def run(pg: Postgres) -> list[Figure]:
    service = measure_deliveries(pg)
    spread = backlog()
    burst = backlog(spread=0.0)
    seed = seed_design(spread)
    mine = ours(spread, service)
    paced = ours(spread, service, rate=QUEUE_RATE, concurrency=QUEUE_CONCURRENCY)
    paced_bucket = ours(
        spread, service, rate=QUEUE_RATE, burst=QUEUE_BURST_LARGE, concurrency=QUEUE_CONCURRENCY
    )
    seed_burst = seed_design(burst)
    paced_burst = ours(burst, service, rate=QUEUE_RATE, concurrency=QUEUE_CONCURRENCY)
    short_burst = ours(burst, service, rate=SHORT_CODE_RATE, burst=QUEUE_BURST, concurrency=QUEUE_CONCURRENCY)
    hour = f"{MESSAGES:,} messages over an hour"
    poll = f"{hour}, poll every {POLL_SECONDS:.0f} s, {POLL_BATCH} per poll, simulated"
    task = (
        f"{hour}, Cloud Tasks dispatch {CLOUD_TASKS_DISPATCH_DELAY} s assumed + measured deliver"
        " to record_sent, queue unthrottled"
    )
    paced_note = (
        f"{hour}, queue at {QUEUE_RATE:.0f}/s (burst {QUEUE_BURST} assumed), {QUEUE_CONCURRENCY} in flight"
    )
    burst_note = f"{MESSAGES:,} allowed at one instant"
    return [
        Figure(
            "deliver_message to record_sent p50",
            pct(service, 50) * 1000,
            "ms",
            note=f"{len(service)} real deliveries, in-process",
        ),
        Figure("deliver_message to record_sent p99", pct(service, 99) * 1000, "ms"),
        Figure("lateness p50, seed design", pct(seed, 50), "s", note=poll),
        Figure("lateness p99, seed design", pct(seed, 99), "s", note=poll),
        Figure("lateness p50, ours", pct(mine, 50), "s", note=task),
        Figure("lateness p99, ours", pct(mine, 99), "s", TARGET_P99, higher_is_better=False, note=task),
        Figure("lateness p99, ours, deployed queue pacing", pct(paced, 99), "s", note=paced_note),
        Figure(
            "lateness p99, ours, deployed queue pacing, larger bucket",
            pct(paced_bucket, 99),
            "s",
            note=f"as above with a burst of {QUEUE_BURST_LARGE}: the figure hangs on Cloud Tasks' choice",
        ),
        Figure("lateness p99, seed design, burst", pct(seed_burst, 99), "s", note=burst_note),
        Figure(
            "lateness p99, ours, burst, deployed queue pacing",
            pct(paced_burst, 99),
            "s",
            note=f"{burst_note}, {QUEUE_RATE:.0f}/s: the sender bounds it (Twilio queues the seed's too)",
        ),
        Figure(
            f"lateness p99, ours, burst, queue at {SHORT_CODE_RATE:.0f}/s",
            pct(short_burst, 99),
            "s",
            note=f"{burst_note}, a short code's throughput",
        ),
    ]
