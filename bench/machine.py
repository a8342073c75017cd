"""How fast this machine is today, for reading figures across runs: the same 2-core VM has been
seen twice as slow on one day as on another, and every figure above moves with it. Three yardsticks
no change of ours can move: a fixed pure-Python loop, a `select 1` round trip to the embedded
PostgreSQL, and a one-row insert committed with its WAL flush (the cost every durable write pays)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import psycopg

from bench.run import Figure
from bench.support import Postgres

ABOUT = (
    "Yardsticks of the machine itself, so that runs on different days can be compared: the figures below "
    "scale with them (a run with a slower loop and slower commits is a slower machine, not slower code)."
)
LOOP = 2_000_000
QUERIES = 2_000
ROUNDS = 3


def _loop_ns() -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        total = 0
        for i in range(LOOP):
            total += i & 7
        best = min(best, time.perf_counter() - started)
    return best / LOOP * 1e9


def _per_call_us(
    conn: psycopg.Connection[tuple[object, ...]], sql: str, clock: Callable[[], float] = time.perf_counter
) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = clock()
        for _ in range(QUERIES):
            conn.execute(sql)
        rounds.append((clock() - started) / QUERIES * 1e6)
    return statistics.median(rounds)


def run(pg: Postgres) -> list[Figure]:
    figures = [Figure("pure-Python loop, per iteration", _loop_ns(), "ns", note=f"best of {ROUNDS}")]
    with pg.database(migrated=False) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table yardstick (x integer)")
        figures += [
            Figure("`select 1` round trip", _per_call_us(conn, "select 1"), "µs", note=f"median of {ROUNDS}"),
            Figure(
                "`select 1`: this process's CPU per call (psycopg's own cost around any query)",
                _per_call_us(conn, "select 1", time.thread_time),
                "µs",
                note=f"median of {ROUNDS}",
            ),
            Figure(
                "one-row insert, committed (WAL flushed)",
                _per_call_us(conn, "insert into yardstick values (1)"),
                "µs",
                note=f"median of {ROUNDS}",
            ),
        ]
    return figures
