"""Real PostgreSQL for tests: one embedded server (pgserver) per test process, a template database
with the migrations applied once, and a fresh clone of it for every test (procrastinate style)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from shared.store.migrate import apply_migrations

TEMPLATE = "mq_template"


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


class PgCluster:
    """A server to make test databases on: DATABASE_URL's server when TEST_DATABASE_URL is set,
    otherwise an embedded one in `datadir`."""

    def __init__(self, datadir: Path) -> None:
        explicit = os.environ.get("TEST_DATABASE_URL")
        if explicit:
            self.admin_url = explicit
            self._server = None
        else:
            import pgserver

            self._server = pgserver.get_server(str(datadir), cleanup_mode="stop")
            self.admin_url = self._server.get_uri("postgres")
        self._template_ready = False

    def url(self, database: str) -> str:
        return with_database(self.admin_url, database)

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def ensure_template(self) -> None:
        if self._template_ready:
            return
        with self._admin() as conn:
            conn.execute(f"drop database if exists {TEMPLATE}")
            conn.execute(f"create database {TEMPLATE}")
        apply_migrations(self.url(TEMPLATE))
        self._template_ready = True

    @contextmanager
    def fresh_database(self) -> Iterator[str]:
        self.ensure_template()
        name = "t_" + uuid.uuid4().hex[:16]
        with self._admin() as conn:
            conn.execute(f"create database {name} template {TEMPLATE}")
        try:
            yield self.url(name)
        finally:
            with self._admin() as conn:
                conn.execute(f"drop database if exists {name} with (force)")

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
