"""Apply the SQL migrations in infra/supabase/migrations to a Postgres database, in name order,
each once, recording them where and as the Supabase CLI does.

There is one migration history: the Supabase CLI's table, supabase_migrations.schema_migrations
(version text primary key, statements text[], name text; its pkg/migration/history.go), with the
version and name the CLI derives from a file name (`<digits>_<name>.sql`). So this runner (the
deploy pipeline's migrate step, `make dev`, the tests) and `supabase --workdir infra db push` see
the same applied versions: running one after the other applies nothing twice.

A database migrated by this runner before it kept the CLI's history has its own table,
public.schema_migrations (one row per file stem, e.g. 20261203000001_schema): its rows are adopted
into the CLI's table and it is dropped, in the same transaction."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "infra" / "supabase" / "migrations"
_LOCK_KEY = 727_347_001  # any constant: serialises concurrent runners on one database

# The CLI's file name pattern (pkg/migration/file.go, migrateFilePattern): the version is the
# leading digits, the name the rest. The CLI skips a file that does not match; we refuse it, since
# a file production's `db push` would skip must not be applied here either.
_FILE_NAME = re.compile(r"^([0-9]+)_(.*)\.sql$")
_LEGACY_ROW = re.compile(r"^([0-9]+)_(.*)$")

# The CLI's history table, created as the CLI creates it (CreateMigrationTable), so whichever of
# the two comes first, the other finds the table it expects. No grant: the schema is not public,
# and the CLI grants nothing on it either, so the API roles (anon, authenticated) cannot use it.
_CREATE_HISTORY = (
    "create schema if not exists supabase_migrations",
    "create table if not exists supabase_migrations.schema_migrations (version text not null primary key)",
    "alter table supabase_migrations.schema_migrations add column if not exists statements text[]",
    "alter table supabase_migrations.schema_migrations add column if not exists name text",
)
_INSERT_VERSION = (
    "insert into supabase_migrations.schema_migrations (version, name, statements) values (%s, %s, %s)"
)
# The previous runner's table, in public (before issue 16).
_LEGACY_TABLE = "public.schema_migrations"

log = logging.getLogger(__name__)


class MigrationHistoryError(RuntimeError):
    """The database records migrations that the directory no longer has, or the directory has one
    older than the last applied that was never applied (both refused, as `supabase db push` does)."""


@dataclass(frozen=True)
class Migration:
    path: Path
    version: str  # the file name's leading digits: the CLI's version
    name: str  # the rest of the file name, without .sql: the CLI's name

    @property
    def stem(self) -> str:
        return self.path.stem


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(directory.glob("*.sql"))


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The directory's migrations in the CLI's order (by file name), each with its version."""
    found: list[Migration] = []
    for path in migration_files(directory):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationHistoryError(
                f"{path.name}: a migration's file name must be <digits>_<name>.sql"
                " (supabase db push skips any other)"
            )
        found.append(Migration(path, match.group(1), match.group(2)))
    versions = [m.version for m in found]
    duplicated = sorted({v for v in versions if versions.count(v) > 1})
    if duplicated:
        raise MigrationHistoryError(f"two migration files share a version: {', '.join(duplicated)}")
    return found


def _legacy_versions(conn: psycopg.Connection[Any]) -> dict[str, str] | None:
    """The previous runner's rows (version -> name), or None when there is no such table."""
    row = conn.execute("select to_regclass(%s) is not null", (_LEGACY_TABLE,)).fetchone()
    if row is None or not row[0]:
        return None
    found: dict[str, str] = {}
    for (stem,) in conn.execute(f"select version from {_LEGACY_TABLE}"):
        match = _LEGACY_ROW.match(stem)
        # A row not of our runner's form cannot be a file here: kept whole, it is refused below.
        version, name = (match.group(1), match.group(2)) if match else (stem, "")
        found[version] = name
    return found


def apply_migrations(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every migration not yet applied; returns the file stems applied now. A database that
    records a version the directory lacks (one applied before the files were squashed into a
    baseline, or from another branch) is refused, as `supabase db push` refuses it, and so is a
    pending file older than the last applied one (the CLI's chronological order); either way the
    database is left as it was."""
    files = migrations(directory)
    applied_now: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            done = _history(conn, {m.version: m for m in files}, directory)
            pending = [m for m in files if m.version not in done]
            late = [m.path.name for m in pending if done and m.version < max(done)]
            if late:
                raise MigrationHistoryError(
                    f"{', '.join(late)} older than the last migration applied ({max(done)}):"
                    " rename it with a later timestamp (supabase db push refuses it too)"
                )
            for migration in pending:
                _apply(conn, migration)
                applied_now.append(migration.stem)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def _history(conn: psycopg.Connection[Any], by_version: dict[str, Migration], directory: Path) -> set[str]:
    """The versions applied, from the CLI's history table (created if missing), after adopting the
    previous runner's table. The history, the check and the adoption are one transaction: a
    refused database keeps its tables exactly as they were."""
    with conn.transaction():
        for statement in _CREATE_HISTORY:
            conn.execute(statement)
        done = {row[0] for row in conn.execute("select version from supabase_migrations.schema_migrations")}
        legacy = _legacy_versions(conn)
        unknown = sorted((done | set(legacy or {})) - by_version.keys())
        if unknown:
            raise MigrationHistoryError(
                f"the database has migrations applied that {directory} does not have:"
                f" {', '.join(unknown)}; recreate the database (a local one: remove .dev/pgdata)"
            )
        if legacy is not None:
            for version in sorted(legacy.keys() - done):
                migration = by_version[version]
                conn.execute(_INSERT_VERSION, (version, migration.name, [migration.path.read_text()]))
            conn.execute(f"drop table {_LEGACY_TABLE}")
            log.info("adopted %d version(s) from %s and dropped it", len(legacy), _LEGACY_TABLE)
            done |= legacy.keys()
    return done


def _apply(conn: psycopg.Connection[Any], migration: Migration) -> None:
    # As the CLI does before each file: a file's session settings (set_config(..., false), a
    # `set search_path`) do not leak into the next one.
    conn.execute("reset all")
    with conn.transaction():
        conn.execute(migration.path.read_text())
        # The statements column holds the file as its one statement: the CLI splits it, but reads
        # only the versions to decide what is pending.
        conn.execute(_INSERT_VERSION, (migration.version, migration.name, [migration.path.read_text()]))
    log.info("applied migration %s", migration.stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("database_url")
    args = parser.parse_args(argv)
    applied = apply_migrations(args.database_url)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
