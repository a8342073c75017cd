"""One migration history (issue 16, item 6): the project's runner (shared/store/migrate.py, the deploy
pipeline's migrate step) and the Supabase CLI (`supabase --workdir infra db push`, README) read and
write the same table, the CLI's supabase_migrations.schema_migrations, with the CLI's versions (a
file name's leading digits), so applying with one and then the other applies nothing twice.

Without the CLI: the runner writes that table in that format, a second run is a no-op, and so is a
run after the rows the CLI writes; a database the previous runner migrated (public.schema_migrations)
is adopted; databases migrated before the squash, or missing an older file, are refused unchanged.
With the real CLI (installed from npm by tests/support/supabase_cli.py; skipped with the reason
when it cannot be): the runner then the CLI, and the CLI then the runner, are no-ops, on a server
of its own over TCP (the CLI's only transport)."""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from shared.store.migrate import MIGRATIONS_DIR, MigrationHistoryError, apply_migrations, migrations
from tests.integration.test_api_roles import (
    _CREATE_ROLE,
    API_ROLES,
    ROLES,
    SUPABASE_DEFAULT_PRIVILEGES,
    as_role,
)
from tests.support import supabase_cli
from tests.support.pg import PgCluster

FILES = migrations()
HISTORY = "select version, name from supabase_migrations.schema_migrations order by version"
PRE_SQUASH = "20261123000001"  # a version of a file squashed into the baseline


def expected_rows() -> list[tuple[str, str]]:
    """What the CLI records for this directory: its pattern ^([0-9]+)_(.*)\\.sql$ on each name."""
    return [(path.name.split("_", 1)[0], path.name.split("_", 1)[1].removesuffix(".sql")) for path in _sql()]


def _sql() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


@pytest.fixture
def empty_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A new database with no migration applied."""
    name = "t_empty_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_cluster.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield pg_cluster.url(name)
    finally:
        with psycopg.connect(pg_cluster.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def rows(url: str, query: str = HISTORY) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def public_history_exists(url: str) -> bool:
    found = rows(url, "select to_regclass('public.schema_migrations') is not null")
    return bool(found[0][0])


def migrate_as_the_previous_runner(url: str, upto: int | None = None) -> None:
    """What shared/store/migrate.py did before issue 16: each file, then its stem in
    public.schema_migrations (version text primary key, applied_at)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "create table schema_migrations ("
            " version text primary key, applied_at timestamptz not null default now())"
        )
        for path in _sql()[:upto]:
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute("insert into schema_migrations (version) values (%s)", (path.stem,))


def migrate_as_the_cli(url: str, upto: int | None = None) -> None:
    """What `supabase db push` does (its pkg/migration history.go and file.go): its table, then each
    file with its (version, name, statements) row. The CLI splits a file into statements; one
    element is enough here, since the runner reads only the versions."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create schema if not exists supabase_migrations")
        conn.execute(
            "create table if not exists supabase_migrations.schema_migrations"
            " (version text not null primary key)"
        )
        conn.execute(
            "alter table supabase_migrations.schema_migrations add column if not exists statements text[]"
        )
        conn.execute("alter table supabase_migrations.schema_migrations add column if not exists name text")
        for (version, name), path in list(zip(expected_rows(), _sql(), strict=True))[:upto]:
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute(
                    "insert into supabase_migrations.schema_migrations(version, name, statements)"
                    " values (%s, %s, %s)",
                    (version, name, [path.read_text()]),
                )


# --- the runner, in the CLI's table and format ----------------------------------------------------


def test_the_runner_records_each_file_in_the_clis_table_with_the_clis_version(empty_url: str) -> None:
    assert apply_migrations(empty_url) == [path.stem for path in _sql()]
    assert rows(empty_url) == expected_rows()
    assert [m.version for m in FILES] == [v for v, _ in expected_rows()]
    # The table is the CLI's: version text not null primary key, statements text[], name text.
    columns = rows(
        empty_url,
        "select column_name, data_type, udt_name, is_nullable from information_schema.columns"
        " where table_schema = 'supabase_migrations' and table_name = 'schema_migrations'"
        " order by column_name",
    )
    assert columns == [
        ("name", "text", "text", "YES"),
        ("statements", "ARRAY", "_text", "YES"),
        ("version", "text", "text", "NO"),
    ]
    key = rows(
        empty_url,
        "select a.attname from pg_index i"
        " join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)"
        " where i.indrelid = 'supabase_migrations.schema_migrations'::regclass and i.indisprimary",
    )
    assert key == [("version",)]
    statements = rows(
        empty_url, "select statements from supabase_migrations.schema_migrations order by version"
    )
    assert [s for (s,) in statements] == [[path.read_text()] for path in _sql()]
    assert not public_history_exists(empty_url), "one history: none in public"
    assert apply_migrations(empty_url) == []  # a second run applies nothing
    assert rows(empty_url) == expected_rows()


@pytest.mark.parametrize("upto", [None, 9], ids=["all", "first-nine"])
def test_after_the_rows_the_cli_writes_the_runner_applies_only_the_rest(
    empty_url: str, upto: int | None
) -> None:
    migrate_as_the_cli(empty_url, upto)
    assert apply_migrations(empty_url) == [path.stem for path in _sql()[upto or len(_sql()) :]]
    assert rows(empty_url) == expected_rows()
    assert apply_migrations(empty_url) == []


@pytest.mark.parametrize("upto", [None, 9], ids=["all", "first-nine"])
def test_a_database_the_previous_runner_migrated_is_adopted(empty_url: str, upto: int | None) -> None:
    """Its public.schema_migrations rows go into the CLI's table with the CLI's versions and names, and
    the table is dropped: the files it recorded are not run again ("... is not unique" otherwise)."""
    migrate_as_the_previous_runner(empty_url, upto)
    assert apply_migrations(empty_url) == [path.stem for path in _sql()[upto or len(_sql()) :]]
    assert rows(empty_url) == expected_rows()
    assert not public_history_exists(empty_url)
    assert apply_migrations(empty_url) == []


def test_a_database_migrated_before_the_squash_is_refused_unchanged(empty_url: str) -> None:
    """Either history naming a squashed version is refused with it, and nothing is adopted or dropped."""
    migrate_as_the_previous_runner(empty_url)
    with psycopg.connect(empty_url, autocommit=True) as conn:
        conn.execute("insert into schema_migrations (version) values (%s)", (f"{PRE_SQUASH}_core_schema",))
    with pytest.raises(MigrationHistoryError, match=PRE_SQUASH):
        apply_migrations(empty_url)
    assert public_history_exists(empty_url)
    assert rows(empty_url, "select to_regnamespace('supabase_migrations') is null") == [(True,)]


def test_a_database_the_cli_migrated_before_the_squash_is_refused(empty_url: str) -> None:
    migrate_as_the_cli(empty_url)
    with psycopg.connect(empty_url, autocommit=True) as conn:
        conn.execute(
            "insert into supabase_migrations.schema_migrations (version, name) values (%s, 'core_schema')",
            (PRE_SQUASH,),
        )
    with pytest.raises(MigrationHistoryError, match=PRE_SQUASH):
        apply_migrations(empty_url)


def test_a_file_older_than_the_last_applied_is_refused_as_the_cli_refuses_it(
    empty_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_a.sql").write_text("create table a (id int);")
    (tmp_path / "0003_c.sql").write_text("create table c (id int);")
    assert apply_migrations(empty_url, tmp_path) == ["0001_a", "0003_c"]
    (tmp_path / "0002_b.sql").write_text("create table b (id int);")
    with pytest.raises(MigrationHistoryError, match=r"0002_b\.sql"):
        apply_migrations(empty_url, tmp_path)
    assert rows(empty_url) == [("0001", "a"), ("0003", "c")]


def test_a_file_the_cli_would_skip_is_refused(empty_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("create table a (id int);")
    (tmp_path / "seed.sql").write_text("create table s (id int);")
    with pytest.raises(MigrationHistoryError, match=r"seed\.sql"):
        apply_migrations(empty_url, tmp_path)


# --- with the real Supabase CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli() -> None:
    reason = supabase_cli.install()
    if reason is not None:
        pytest.skip(f"Supabase CLI {supabase_cli.CLI_VERSION} unavailable: {reason}")


@pytest.fixture(scope="module")
def tcp_postgres(cli: None) -> Iterator[supabase_cli.TcpPostgres]:
    server = supabase_cli.TcpPostgres()
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            for role, attributes in ROLES.items():
                conn.execute(_CREATE_ROLE.format(role=role, attributes=attributes))
        yield server
    finally:
        server.stop()


@pytest.fixture
def supabase_like_url(tcp_postgres: supabase_cli.TcpPostgres) -> str:
    """A database set up as a Supabase project's (its API roles and default privileges)."""
    url = tcp_postgres.create_database("t_" + uuid.uuid4().hex[:12])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SUPABASE_DEFAULT_PRIVILEGES)
    return url


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI's --workdir: a copy of infra/ with the migrations (it reads
    <workdir>/supabase/migrations, as README's `--workdir infra`), since the CLI also writes its
    scratch files there (supabase/.temp), which a test must not leave in the repository."""
    root = tmp_path_factory.mktemp("cli-workdir")
    shutil.copytree(MIGRATIONS_DIR, root / "supabase" / "migrations")
    return root


def push(url: str, workdir: Path) -> str:
    done = supabase_cli.db_push(workdir, url)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def assert_history_closed(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for role in API_ROLES:
            refused = as_role(conn, role, "select * from supabase_migrations.schema_migrations")
            assert refused == "permission denied for schema supabase_migrations", role


def test_the_runner_then_the_cli_applies_nothing(supabase_like_url: str, workdir: Path) -> None:
    assert len(apply_migrations(supabase_like_url)) == len(FILES)
    output = push(supabase_like_url, workdir)
    assert "Remote database is up to date" in output, output
    assert "Applying migration" not in output, output
    assert rows(supabase_like_url) == expected_rows()
    assert_history_closed(supabase_like_url)


def test_the_cli_then_the_runner_applies_nothing(supabase_like_url: str, workdir: Path) -> None:
    output = push(supabase_like_url, workdir)
    assert output.count("Applying migration") == len(FILES), output
    assert rows(supabase_like_url) == expected_rows()  # the CLI's rows are the runner's
    assert apply_migrations(supabase_like_url) == []
    assert "Remote database is up to date" in push(supabase_like_url, workdir)
    assert_history_closed(supabase_like_url)


def test_the_previous_runners_database_adopted_then_the_cli_applies_nothing(
    supabase_like_url: str, workdir: Path
) -> None:
    """The deployed databases today: migrated by the previous runner. Once the runner has adopted its
    history, the CLI agrees; before, the CLI would run every file again and fail."""
    migrate_as_the_previous_runner(supabase_like_url)
    assert apply_migrations(supabase_like_url) == []
    assert "Remote database is up to date" in push(supabase_like_url, workdir)
    assert rows(supabase_like_url) == expected_rows()


def test_the_cli_refuses_what_the_runner_refuses(supabase_like_url: str, workdir: Path) -> None:
    """Both refuse a database migrated before the squash (the CLI: "Remote migration versions not
    found in local migrations directory")."""
    apply_migrations(supabase_like_url)
    with psycopg.connect(supabase_like_url, autocommit=True) as conn:
        conn.execute(
            "insert into supabase_migrations.schema_migrations (version, name) values (%s, 'core_schema')",
            (PRE_SQUASH,),
        )
    done = supabase_cli.db_push(workdir, supabase_like_url)
    assert done.returncode != 0
    assert PRE_SQUASH in done.stdout + done.stderr
    with pytest.raises(MigrationHistoryError, match=PRE_SQUASH):
        apply_migrations(supabase_like_url)


README = MIGRATIONS_DIR.parents[2] / "README.md"


def test_readme_pushes_with_the_workdir_the_migrations_are_under() -> None:
    """From the repository root a bare `supabase db push` finds no supabase/migrations and applies
    nothing: README's command names `--workdir infra`, as the tests above run it."""
    text = " ".join(README.read_text().split())  # commands wrapped across lines
    pushes = re.findall(r"`supabase[^`]*db push[^`]*`", text)
    assert pushes, "README shows how to apply the migrations with the CLI"
    for command in pushes:
        assert "--workdir infra db push" in command, command
    assert (MIGRATIONS_DIR.parent.parent / "supabase" / "migrations") == MIGRATIONS_DIR
