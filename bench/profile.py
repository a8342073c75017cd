"""`python -m bench.profile`: where schedule_message's CPU, the sweep's and the claim path's time
goes; writes bench/profile.md and prints it. Not part of `make bench` (it takes about a minute more).

- schedule_message: cProfile with a CPU clock (time.process_time, so waits on the database are not
  in it) over requests through functions-framework's app and Flask's test client, as the bench
  sends them; the functions of this repository with their CPU, and the floor beside it.

- Python: pyinstrument over one sweep (batch 2000) and over the claim loop (1 thread).
- The database: pg_stat_user_functions (track_functions = all) for the time inside each mq_
  function, pg_stat_wal (track_wal_io_timing) for the commits' WAL syncs, and EXPLAIN ANALYZE of
  mq_sweep_overdue's statement as the SQL function runs it (a generic plan: PostgreSQL 16 plans a
  LANGUAGE sql function's statements without its arguments' values) against a custom plan, on a
  fresh backlog and on one half drained.
"""

from __future__ import annotations

import cProfile
import pstats
import re
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from pyinstrument import Profiler

from bench import claims, db, sweep
from bench.policy import TIMEZONES
from bench.support import InProcessTasks, Postgres
from bench.sweep import T0, seed_queued, seed_users
from shared.store.postgres import PostgresStore

OUT = Path(__file__).resolve().parent / "profile.md"
CLAIMS = 4_000
SCHEDULES = 1_000


def _own_rows(stats: pstats.Stats, n: int, lines: int = 25) -> list[str]:
    """This repository's functions by cumulative CPU, per request (cProfile's own overhead in it)."""
    rows = []
    for (path, line, name), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "/site-packages/" in path or not path.startswith(str(OUT.parents[1])) or "/bench/" in path:
            continue
        rows.append((cum, own, calls, f"{Path(path).relative_to(OUT.parents[1])}:{line}({name})"))
    rows.sort(reverse=True)
    out = ["| function | calls per request | CPU per request, µs (own) |", "|---|---|---|"]
    for cum, own, calls, where in rows[:lines]:
        out.append(f"| `{where}` | {calls / n:.1f} | {cum * 1e6 / n:,.0f} ({own * 1e6 / n:,.0f}) |")
    return out


def schedule_profile(pg: Postgres) -> list[str]:
    from functions_framework import create_app

    from shared import bootstrap
    from shared.config import Settings

    out = ["## schedule_message", ""]
    with pg.database() as url:
        store = PostgresStore(url, max_size=1)
        previous = bootstrap.install(bootstrap.Container(Settings(), store=store, tasks=InProcessTasks()))
        try:
            users = [
                uuid.UUID(store.upsert_user(f"+1555{i:07d}", TIMEZONES[i % len(TIMEZONES)])["id"])
                for i in range(db.USERS)
            ]
            client = create_app("schedule_message", db.MAIN).test_client()
            floor = create_app("echo", db.FLOOR_APP).test_client()
            db._client_run(users, 0, db.WARMUP, [], client=client)
            db._client_run(users, 0, db.WARMUP, [], client=floor, expect=(201, "echo"))
            cpu = time.process_time()
            db._client_run(users, 1_000, SCHEDULES, [], client=client)
            plain = (time.process_time() - cpu) / SCHEDULES
            cpu = time.process_time()
            db._client_run(users, 0, SCHEDULES, [], client=floor, expect=(201, "echo"))
            floor_cpu = (time.process_time() - cpu) / SCHEDULES
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            db._client_run(users, 10_000, SCHEDULES, [], client=client)
            profiler.disable()
        finally:
            bootstrap.install(previous)
            store.close()
    stats = pstats.Stats(profiler)
    total = stats.total_tt / SCHEDULES  # type: ignore[attr-defined]
    out += [
        f"{SCHEDULES:,} requests from one client: {plain * 1e6:,.0f} µs of CPU per request unprofiled, "
        f"the floor {floor_cpu * 1e6:,.0f} µs; profiled, {total * 1e6:,.0f} µs (cProfile multiplies the "
        "cost of every Python call, so read the shares, not the absolute figures).",
        "",
        *_own_rows(stats, SCHEDULES),
        "",
    ]
    return out


def _tree(profiler: Profiler, lines: int = 45) -> str:
    text = profiler.output_text(unicode=False, color=False, show_all=False, timeline=False)
    body = [x for x in text.splitlines() if x.strip()]
    return "\n".join(body[:lines])


def _sql_body(conn: psycopg.Connection[Any], function: str) -> tuple[str, str]:
    """A LANGUAGE sql function's statement with its named arguments as $n, and their types."""
    row = conn.execute(
        "select prosrc, pg_get_function_identity_arguments(oid) from pg_proc where proname = %s", [function]
    ).fetchone()
    assert row is not None
    src, args = str(row[0]), str(row[1])
    names = [a.split()[0] for a in args.split(", ")]
    types = [" ".join(a.split()[1:]) for a in args.split(", ")]
    for k, name in enumerate(names, 1):
        src = re.sub(rf"\b{name}\b", f"${k}", src)
    return src.strip().rstrip(";"), ", ".join(types)


def _explain(conn: psycopg.Connection[Any], mode: str, limit: int) -> list[str]:
    conn.execute(f"set plan_cache_mode = {mode}")
    with conn.transaction(force_rollback=True):
        rows = conn.execute(
            f"explain (analyze, costs off, summary on) execute sweep_stmt('{T0.isoformat()}', 120, {limit})"
        ).fetchall()
    conn.execute("reset plan_cache_mode")
    keep = (
        "Aggregate",
        "Limit",
        "Index Scan",
        "Seq Scan",
        "Hash Join",
        "Nested Loop",
        "Update on",
        "Rows Removed",
    )
    return [str(r[0]) for r in rows if any(k in str(r[0]) for k in keep) or "Execution Time" in str(r[0])]


def _call_ms(conn: psycopg.Connection[Any], limit: int, repeat: int = 5) -> float:
    """Median milliseconds of one mq_sweep_overdue call (each re-tasks `limit` more rows)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        conn.execute("select jsonb_array_length(mq_sweep_overdue(%s, 120, %s))", [T0, limit]).fetchone()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def sweep_profile(pg: Postgres) -> list[str]:
    out = ["## Sweep", ""]
    with sweep.backlog_database(pg) as url, psycopg.connect(url, autocommit=True) as conn:
        language = conn.execute(
            "select l.lanname from pg_proc p join pg_language l on l.oid = p.prolang"
            " where p.proname = 'mq_sweep_overdue'"
        ).fetchone()
        sql_function = language is not None and language[0] == "sql"
        if sql_function:
            body, types = _sql_body(conn, "mq_sweep_overdue")
            conn.execute(f"prepare sweep_stmt({types}) as {body}")
            for mode, label in (
                ("force_generic_plan", "as the SQL function runs it (generic plan)"),
                ("force_custom_plan", "with its arguments' values (custom plan)"),
            ):
                out += [
                    f"Fresh backlog, limit 200, {label}:",
                    "",
                    "```",
                    *_explain(conn, mode, 200),
                    "```",
                    "",
                ]
        else:
            out += [
                f"mq_sweep_overdue is LANGUAGE {language[0] if language else '?'}: its statements get "
                "plans for their arguments' values, so the generic-plan comparison is left out.",
                "",
            ]
        fresh = _call_ms(conn, 200)
        done = 0
        while done < sweep.BACKLOG // 2:
            row = conn.execute("select jsonb_array_length(mq_sweep_overdue(%s, 120, 2000))", [T0]).fetchone()
            done += int(row[0]) if row else 0
        half = _call_ms(conn, 200)
        out += [
            f"One mq_sweep_overdue call of 200 rows: {fresh:.1f} ms on the fresh backlog, {half:.1f} ms "
            f"half drained ({done:,} re-tasked rows still queued). Flat: draining is linear in the "
            "backlog; growing: quadratic (each batch walks past the rows the earlier ones re-tasked).",
            "",
        ]
        if sql_function:
            out += [
                "Half drained, limit 200, custom plan:",
                "",
                "```",
                *_explain(conn, "force_custom_plan", 200),
                "```",
                "",
            ]
    with sweep.backlog_database(pg) as url:
        profiler = Profiler(interval=0.001)
        profiler.start()
        drain = sweep.drain_with_sweep(url, batch=sweep.BIG_BATCH, budget_seconds=600)
        profiler.stop()
    out += [
        f"pyinstrument, one sweep, batch {sweep.BIG_BATCH}: {drain.retasked:,} in {drain.wall:.1f} s "
        f"({drain.rate:,.0f}/s), {drain.store_seconds.get('mq_sweep_overdue', 0):.1f} s in "
        "mq_sweep_overdue calls:",
        "",
        "```",
        _tree(profiler),
        "```",
        "",
    ]
    return out


def claims_profile(pg: Postgres) -> list[str]:
    out = ["## Claim path", ""]
    with pg.database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            db = conn.info.dbname
            conn.execute(f"alter database {db} set track_functions = 'all'")
            conn.execute(f"alter database {db} set track_wal_io_timing = on")
            seed_users(conn, CLAIMS // 2, prefix="+1559")
            seed_queued(
                conn,
                CLAIMS,
                prefix="+1559",
                scheduled_from=T0 - timedelta(minutes=1),
                spread_seconds=1,
                touched_at=T0 - timedelta(minutes=1),
            )
            rows = conn.execute(
                "select q.id, q.task_generation, u.timezone from message_queue q"
                " join users u on u.id = q.user_id order by u.phone_number, q.id"
            ).fetchall()
        first: list[claims.Pending] = [(r[0], r[1], r[2]) for r in rows[0::2]]
        second: list[claims.Pending] = [(r[0], r[1], r[2]) for r in rows[1::2]]
        store = PostgresStore(url, max_size=2)
        try:
            claims._claim_and_record(store, first[:50], T0)
            first = first[50:]
            n = len(first) + len(second)
            started = time.perf_counter()
            for _ in range(n):
                store.call("now")
            trivial = (time.perf_counter() - started) / n
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("select pg_stat_reset(), pg_stat_reset_shared('wal')")
            time.sleep(0.6)
            profiler = Profiler(interval=0.0005)
            profiler.start()
            started = time.perf_counter()
            cpu = time.process_time()
            claims._claim_and_record(store, first, T0)
            claims._claim_and_record(store, second, T0 + claims.ROUND_GAP)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - started
            profiler.stop()
        finally:
            store.close()
        time.sleep(1.0)  # statistics reach the cumulative views within a second
        with psycopg.connect(url, autocommit=True) as conn:
            funcs = conn.execute(
                "select funcname, calls, total_time, self_time from pg_stat_user_functions"
                " order by total_time desc"
            ).fetchall()
            wal = conn.execute("select wal_sync, wal_sync_time, wal_write_time from pg_stat_wal").fetchone()
    us = 1e6 / n
    out += [
        f"{n:,} messages from 1 thread: {wall:.2f} s, {n / wall:,.0f}/s, {wall * us:,.0f} µs per message "
        f"(2 store calls); the Python process used {cpu * us:,.0f} µs of CPU per message "
        "(pyinstrument's own overhead included). A trivial `select now()` through the same store: "
        f"{trivial * 1e6:,.0f} µs per call.",
        "",
        "| inside the database, per message | µs |",
        "|---|---|",
    ]
    for name, calls, total, own in funcs:
        out.append(
            f"| {name} ({calls / n:.1f} calls; self {own * 1000 / n:,.0f} µs) | {total * 1000 / n:,.0f} |"
        )
    if wal is not None:
        out.append(f"| WAL sync at commit ({wal[0] / n:.1f} syncs) | {(wal[1] or 0) * 1000 / n:,.0f} |")
    out += ["", "pyinstrument, the claim loop:", "", "```", _tree(profiler, 30), "```", ""]
    return out


def main() -> int:
    import logging

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="mq-profile-") as tmp:
        pg = Postgres(Path(tmp) / "pg")
        try:
            text = "\n".join(
                [
                    "# Profiles",
                    "",
                    f"`python -m bench.profile` on {sys.platform}, Python {sys.version.split()[0]}, embedded "
                    "PostgreSQL on the same machine. See the module's docstring for what is measured.",
                    "",
                    *schedule_profile(pg),
                    *sweep_profile(pg),
                    *claims_profile(pg),
                ]
            )
        finally:
            pg.stop()
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
