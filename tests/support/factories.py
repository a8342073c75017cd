"""Helpers that put users, inbound messages and scheduled messages into a real test database."""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime
from typing import Any

import psycopg

from shared import service
from shared.store.postgres import PostgresStore
from tests.support.fakes import RecordingTaskQueue

_phones = itertools.count(1)


def new_phone() -> str:
    return f"+1555{next(_phones):07d}"


def make_user(
    store: PostgresStore, timezone: str = "UTC", phone: str | None = None, **settings: Any
) -> uuid.UUID:
    row = store.upsert_user(phone or new_phone(), timezone, **settings)
    return uuid.UUID(row["id"])


def make_active(store: PostgresStore, user_id: uuid.UUID, at: datetime) -> None:
    """An inbound message at `at`: the user counts as active for the next 10 minutes."""
    store.record_inbound(user_id, "hi", "SM" + uuid.uuid4().hex, at)


def schedule(
    store: PostgresStore,
    tasks: RecordingTaskQueue,
    user_id: uuid.UUID,
    now: datetime,
    *,
    content: str = "hello",
    policy: service.Policy,
    **fields: Any,
) -> service.ScheduleResult:
    body = {"userId": str(user_id), "agentId": "test_agent", "messageData": {"content": content}, **fields}
    return service.schedule(body, store=store, tasks=tasks, config=policy, now=now)


def table_counts(database_url: str) -> dict[str, int]:
    tables = (
        "users",
        "conversations",
        "messages",
        "message_queue",
        "user_message_budget",
        "agent_actions_log",
    )
    with psycopg.connect(database_url) as conn:
        return {t: conn.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}  # type: ignore[index]


def row(database_url: str, message_id: uuid.UUID) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("select to_jsonb(q) from message_queue q where id = %s", (message_id,))
        found = cur.fetchone()
        assert found is not None, f"no message_queue row {message_id}"
        return dict(found[0])


def budget(database_url: str, user_id: uuid.UUID) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select date::text, messages_sent from user_message_budget where user_id = %s", (user_id,)
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def sql(database_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute(query, args)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []
