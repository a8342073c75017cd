"""What the hot functions read, counted by PostgreSQL itself: a user's limits must cost the user's
rows, not the account's, even when the table's statistics have not seen the latest sends (a busy
day on a big table is less than the share of changes that triggers ANALYZE). Counted per index from
the transaction's own statistics (pg_stat_get_xact_tuples_returned), so no timing is involved."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from shared import policy
from shared.domain import Limits

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)
OTHERS = 60
SENDS_TODAY = 600  # by the other users, after the last ANALYZE


def _stale_table(conn: psycopg.Connection[Any]) -> tuple[Any, Any]:
    """One user with one queued message, sixty others; ANALYZE while nothing was sent, then 600
    sends of the others today that the statistics never saw."""
    conn.execute(
        "insert into users (phone_number, timezone) select '+1555' || lpad(g::text, 7, '0'), 'UTC'"
        " from generate_series(0, %s) g",
        [OTHERS],
    )
    me = conn.execute("select id from users where phone_number = '+15550000000'").fetchone()
    assert me is not None
    conn.execute(
        "insert into message_queue (user_id, agent_id, message_data, final_message, scheduled_for, status)"
        " values (%s, 'agent', '{}', 'hello', %s, 'queued') ",
        [me[0], NOW - timedelta(minutes=1)],
    )
    conn.execute("analyze message_queue")
    conn.execute(
        """
        insert into message_queue (user_id, agent_id, message_data, final_message, scheduled_for, status,
                                   sent_at, slot_at, twilio_message_sid)
        select u.id, 'agent', '{}', 'earlier', s.at, 'sent', s.at, s.at, 'SM' || g
        from generate_series(1, %(n)s) g
        join users u on u.phone_number = '+1555' || lpad((1 + g %% %(others)s)::text, 7, '0')
        cross join lateral (select %(now)s - make_interval(secs => g * 10) as at) s
        """,
        {"n": SENDS_TODAY, "others": OTHERS, "now": NOW},
    )
    mid = conn.execute("select id from message_queue where user_id = %s", [me[0]]).fetchone()
    assert mid is not None
    return me[0], mid[0]


def _index_reads(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Index entries read so far on this session and not yet reported (earlier transactions'
    too, so callers take differences)."""
    rows = conn.execute(
        "select indexrelname, pg_stat_get_xact_tuples_returned(indexrelid)"
        " from pg_stat_user_indexes where relname = 'message_queue'"
    ).fetchall()
    return {name: int(n) for name, n in rows}


def _read_by(conn: psycopg.Connection[Any], sql: str, args: list[Any]) -> tuple[Any, dict[str, int]]:
    """Run sql in a transaction rolled back afterwards; its answer and the index entries it read."""
    conn.execute("begin")
    before = _index_reads(conn)
    row = conn.execute(sql, args).fetchone()
    after = _index_reads(conn)
    conn.execute("rollback")
    return (None if row is None else row[0]), {
        k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)
    }


@pytest.mark.parametrize("calls", [1, 8], ids=["custom plan", "generic plan"])
def test_a_claim_reads_the_users_rows_not_the_accounts(database_url: str, calls: int) -> None:
    """Eight calls on one session (each rolled back) reach the generic plan plpgsql keeps after
    five; the last must read a handful of index entries, not the 600 sends of the day."""
    limits = Limits()
    _, day_start, day_end = policy.local_day_bounds("UTC", NOW)
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, mid = _stale_table(conn)
        args = [
            mid,
            0,
            NOW,
            120,
            limits.cooldown_seconds,
            limits.hourly_limit,
            limits.daily_limit,
            day_start,
            day_end,
        ]
        for _ in range(calls):
            result, reads = _read_by(conn, "select mq_claim(%s, %s, %s, %s, %s, %s, %s, %s, %s)", args)
    assert result["claimed"] is True, result
    assert sum(reads.values()) < 10, reads


@pytest.mark.parametrize("calls", [1, 8], ids=["custom plan", "generic plan"])
def test_the_users_context_reads_the_users_rows_not_the_accounts(database_url: str, calls: int) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        user, _ = _stale_table(conn)
        for _ in range(calls):
            doc, reads = _read_by(conn, "select mq_user_context(%s, %s, null)", [user, NOW])
    assert doc["sends"] == [], doc
    assert sum(reads.values()) < 10, reads


HOT = (
    "mq_user_context",
    "mq_enqueue",
    "mq_delivery_context",
    "mq_message_doc",
    "mq_claim",
    "mq_record_sent",
    "mq_emit",
    "mq_log_action",
    "mq_conversation_of",
    "increment_message_budget",
)


def test_the_schedule_and_delivery_functions_keep_their_plans(database_url: str) -> None:
    """On PostgreSQL 15 a LANGUAGE sql function that cannot be inlined is planned on every call
    (mq_user_context: 0.94 ms a call as SQL, 0.35 ms as plpgsql); plpgsql keeps its plans for the
    session. Every function schedule_message and deliver_message run on each request is plpgsql."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select p.proname, l.lanname from pg_proc p join pg_language l on l.oid = p.prolang"
            " where p.proname = any(%s)",
            [list(HOT)],
        ).fetchall()
    assert {name for name, _ in rows} == set(HOT)
    # every overload counts: an old SQL signature left beside a new one would still be called
    assert {name for name, language in rows if language != "plpgsql"} == set()


@pytest.mark.parametrize("calls", [1, 8], ids=["custom plan", "generic plan"])
def test_a_page_of_a_users_messages_reads_the_page_not_the_users_history(
    database_url: str, calls: int
) -> None:
    """Keyset paging: a page deep into a user's 400 messages reads about a page of index entries
    (message_queue_user_created walked backwards from the cursor), not the rows before it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        user, _ = _stale_table(conn)
        conn.execute(
            "insert into message_queue (user_id, agent_id, message_data, final_message, scheduled_for,"
            " status, created_at)"
            " select %s, 'agent', '{}', 'old', %s, 'cancelled', %s - make_interval(secs => g)"
            " from generate_series(1, 400) g",
            [user, NOW, NOW],
        )
        conn.execute("analyze message_queue")
        cursor = conn.execute(
            "select created_at, id from message_queue where user_id = %s"
            " order by created_at desc, id desc offset 200 limit 1",
            [user],
        ).fetchone()
        assert cursor is not None
        for _ in range(calls):
            doc, reads = _read_by(
                conn,
                "select mq_list_messages(p_user_id => %s, p_limit => 3, p_before_created_at => %s,"
                " p_before_id => %s)",
                [user, *cursor],
            )
        first, first_reads = _read_by(conn, "select mq_list_messages(p_user_id => %s, p_limit => 3)", [user])
    assert len(doc["messages"]) == 3, doc
    assert sum(reads.values()) < 10, reads
    assert len(first["messages"]) == 3 and sum(first_reads.values()) < 10, first_reads
