"""Apply the SQL migrations in infra/supabase/migrations to a Postgres database, in name order,
each once. Production applies the same files with `supabase db push`; this runner is for local
databases and tests, which have no Supabase CLI."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "infra" / "supabase" / "migrations"
_LOCK_KEY = 727_347_001  # any constant: serialises concurrent runners on one database

log = logging.getLogger(__name__)


class MigrationHistoryError(RuntimeError):
    """The database records migrations that the directory no longer has."""


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(directory.glob("*.sql"))


def apply_migrations(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every migration not yet applied; returns the versions applied now. A database that
    records a version the directory lacks (one applied before the files were squashed into a
    baseline, or from another branch) is refused, as `supabase db push` refuses it."""
    applied_now: list[str] = []
    files = migration_files(directory)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "create table if not exists schema_migrations ("
                " version text primary key, applied_at timestamptz not null default now())"
            )
            done = {row[0] for row in conn.execute("select version from schema_migrations")}
            unknown = sorted(done - {path.stem for path in files})
            if unknown:
                raise MigrationHistoryError(
                    f"the database has migrations applied that {directory} does not have:"
                    f" {', '.join(unknown)}; recreate the database (a local one: remove .dev/pgdata)"
                )
            for path in files:
                version = path.stem
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute("insert into schema_migrations (version) values (%s)", (version,))
                applied_now.append(version)
                log.info("applied migration %s", version)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("database_url")
    args = parser.parse_args(argv)
    applied = apply_migrations(args.database_url)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
