"""The Store on PostgreSQL through psycopg (DATABASE_URL; Supabase's transaction pooler included).

Every call is one `select mq_...(p_a => %s, ...)` in autocommit mode: one round trip, one
transaction. Named notation, so the SQL function's parameter order is nowhere in Python.
`prepare_threshold=None` because Supabase's transaction pooler (PgBouncer/Supavisor in transaction
mode) cannot keep server-side prepared statements across transactions.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from shared.errors import StoreError, StoreUnavailable
from shared.store.driver import Json
from shared.store.store import SqlStore


@lru_cache(maxsize=256)
def _query(function: str, names: tuple[str, ...]) -> str:
    # Cached: the same few shapes on every call, and the bench counts this process's CPU per request.
    # $n placeholders for a RawCursor: psycopg then sends the text as it is instead of rewriting %s
    # on every execute (5-15 µs of CPU a call in the bench; the server binds the values either way).
    return f"select {function}({', '.join(f'p_{name} => ${k}' for k, name in enumerate(names, 1))})"


def _param(value: Any) -> Any:
    # A plain list stays a list, which psycopg sends as an array (the bigint[] event ids).
    return Jsonb(value.value) if isinstance(value, Json) else value


class PsycopgDriver:
    def __init__(self, conninfo: str, *, max_size: int, timeout: float) -> None:
        # No connection check on checkout: it costs a round trip per call (bench: 6 instead of 3 per
        # delivery). A connection that died (database or pooler restart) fails its one call with
        # StoreUnavailable (503: Cloud Tasks and Pub/Sub retry), and the pool discards it.
        self.pool = ConnectionPool(
            conninfo,
            min_size=0,
            max_size=max_size,
            timeout=timeout,
            open=True,
            kwargs={"autocommit": True, "prepare_threshold": None, "connect_timeout": max(1, int(timeout))},
            name="message-orchestrator",
        )

    def call(self, function: str, /, **args: Any) -> Any:
        """Database errors are translated here, so nothing above sees psycopg types."""
        query = _query(function, tuple(args))
        try:
            with self.pool.connection() as conn:
                row = psycopg.RawCursor(conn).execute(query, [_param(v) for v in args.values()]).fetchone()
        except (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StoreUnavailable() from exc
        except psycopg.Error as exc:
            raise StoreError(f"database error in {function}: {type(exc).__name__}") from exc
        return None if row is None else row[0]

    def close(self) -> None:
        self.pool.close()


class PostgresStore(SqlStore):
    def __init__(self, conninfo: str, *, max_size: int = 4, timeout: float = 5.0) -> None:
        driver = PsycopgDriver(conninfo, max_size=max_size, timeout=timeout)
        super().__init__(driver)
        self._pool = driver.pool  # for the tests and the bench that look at its checkout check
