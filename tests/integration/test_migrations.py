"""The migrations, applied from empty, yield exactly the functions and tables the code uses, and the
SQL files define each function once: the file that defines a function is its one source of truth.

The baseline (20261203000001..6) was squashed once; since then migrations only go forward, so a
change to a function is a new file that redefines it. Each such function is listed in REDEFINED
with the file that now defines it (its live definition), and no other function is defined twice."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest

from shared.store.migrate import MIGRATIONS_DIR, MigrationHistoryError, apply_migrations, migration_files

SHARED = Path(__file__).resolve().parents[2] / "shared"

# mq_ functions no Python code calls by name, each called from other functions' bodies.
CALLED_FROM_SQL_ONLY = {
    "mq_log_action": "the decision log (agent_actions_log) that every step writes",
    "mq_emit": "an event in events_outbox, in the transaction of the change it describes",
    "mq_message_doc": "a message row with its parts, the jsonb every read answers",
    "mq_insert_parts": "a sequence's parts, inserted by mq_enqueue",
    "mq_conversation_of": "the conversation of an outbound message (mq_record_sent, mq_record_part)",
    "mq_account_window_free_at": "the retry_at of a full account-wide window (mq_claim)",
    "mq_account_used": "the account's messages or segments in a rolling window (mq_claim)",
    "mq_admission": "the user's queue limit and the agent's rate (mq_user_context, mq_enqueue)",
    "mq_sequence_segments": "a sequence's total segments from its parts (mq_enqueue, mq_record_part_render)",
}

# Public functions outside the mq_ namespace.
OTHER_FUNCTIONS = {
    "increment_message_budget": "the seed's budget counter, for the seed's callers (rpc); mq_record_sent too",
    "close_public_api": "a procedure each migration calls last: closes what it created to the API roles",
}

# Functions a forward migration redefined: name -> the file with the live definition (the last).
REDEFINED = {
    "mq_user_context": "20261203000019_due_delivery_context.sql",
    "mq_delivery_context": "20261203000019_due_delivery_context.sql",
    "mq_upsert_user": "20261203000011_compliance.sql",
    "mq_emit": "20261203000008_event_agent_attribute.sql",
    "mq_inbound": "20261203000012_consent.sql",
    "mq_record_part": "20261203000015_record_part_token.sql",
    "mq_get": "20261203000016_message_delivery.sql",
    "mq_enqueue": "20261203000018_replay_plan.sql",
    "mq_message_doc": "20261203000013_segments.sql",
    "mq_insert_parts": "20261203000013_segments.sql",
    "mq_record_render": "20261203000013_segments.sql",
    "mq_record_part_render": "20261203000013_segments.sql",
    "mq_claim": "20261203000013_segments.sql",
    "mq_account_window_free_at": "20261203000013_segments.sql",
}

TABLES = {
    "users",
    "conversations",
    "messages",
    "message_queue",
    "message_parts",
    "user_message_budget",
    "agent_actions_log",
    "sweep_runs",
    "events_outbox",
    "consent_events",
}

# Tables no function reads or writes. None since the migration history moved out of public, into
# the Supabase CLI's supabase_migrations.schema_migrations (shared/store/migrate.py, issue 16).
TABLES_WITHOUT_FUNCTIONS: dict[str, str] = {}

_IDENTIFIER = re.compile(r"mq_[a-z0-9_]+")
_CALL_IN_SQL = re.compile(r"\b(mq_[a-z0-9_]+)\s*\(")
_DEFINITION = re.compile(
    r"\bcreate\s+(?:or\s+replace\s+)?(?:function|procedure)\s+(?:public\.)?\"?([a-z_][a-z0-9_]*)\"?\s*\(",
    re.IGNORECASE,
)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose, not names)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def python_function_names(root: Path = SHARED) -> set[str]:
    """The mq_ functions the Python code calls: string literals that are a function's name (an rpc
    call) or that call one in SQL text ("select mq_x(...)", f-string parts included)."""
    names: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        prose = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                if _IDENTIFIER.fullmatch(node.value):
                    names.add(node.value)
                names.update(_CALL_IN_SQL.findall(node.value))
    return names


def _without_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def definitions(directory: Path = MIGRATIONS_DIR) -> dict[str, list[str]]:
    """Every `create [or replace] function` in the migration files: name -> the files, once per
    definition."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in migration_files(directory):
        for name in _DEFINITION.findall(_without_comments(path.read_text())):
            found[name.lower()].append(path.name)
    return dict(found)


def _functions(database_url: str) -> dict[str, list[str]]:
    """The public schema's functions (not an extension's): name -> the body of each overload."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """
            select p.proname, p.prosrc from pg_proc p
            where p.pronamespace = 'public'::regnamespace
              and not exists (select 1 from pg_depend d
                              where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
            """
        ).fetchall()
    found: dict[str, list[str]] = defaultdict(list)
    for name, body in rows:
        found[name].append(body)
    return dict(found)


def _tables(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select c.relname from pg_class c where c.relnamespace = 'public'::regnamespace"
            " and c.relkind in ('r', 'p')"
            " and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass"
            "                 and d.objid = c.oid and d.deptype = 'e')"
        ).fetchall()
    return {name for (name,) in rows}


def test_the_functions_are_those_the_code_calls_one_per_name(database_url: str) -> None:
    functions = _functions(database_url)
    called = python_function_names()
    assert len(called) > 20, called  # the scan found the stores' calls
    assert called.isdisjoint(CALLED_FROM_SQL_ONLY), called & CALLED_FROM_SQL_ONLY.keys()
    mq = {name for name in functions if name.startswith("mq_")}
    assert mq - called - CALLED_FROM_SQL_ONLY.keys() == set(), "defined, called by nothing"
    assert called - mq == set(), "called, not defined"
    assert CALLED_FROM_SQL_ONLY.keys() - mq == set(), "listed, not defined"
    assert set(functions) - mq == OTHER_FUNCTIONS.keys()
    # PostgREST resolves an rpc by name and parameter names: an overload makes calls ambiguous.
    assert {name: len(bodies) for name, bodies in functions.items() if len(bodies) > 1} == {}
    for name in CALLED_FROM_SQL_ONLY:
        callers = [
            other
            for other, bodies in functions.items()
            if other != name and any(re.search(rf"\b{name}\s*\(", _without_comments(b)) for b in bodies)
        ]
        assert callers, f"{name} is called neither from Python nor from another function"


def test_the_tables_are_the_expected_ones_each_used_by_a_function(database_url: str) -> None:
    assert _tables(database_url) == TABLES
    bodies = [_without_comments(b) for bs in _functions(database_url).values() for b in bs]
    for table in TABLES - TABLES_WITHOUT_FUNCTIONS.keys():
        use = re.compile(rf"\b(from|into|update|join)\s+{table}\b", re.IGNORECASE)
        assert any(use.search(body) for body in bodies), f"no function reads or writes {table}"
    for table in TABLES_WITHOUT_FUNCTIONS:
        use = re.compile(rf"\b{table}\b")
        assert not any(use.search(body) for body in bodies), f"{table} is used: drop it from the exemptions"


def test_each_function_is_defined_once_in_the_migration_files(database_url: str) -> None:
    defined = definitions()
    twice = {name: files for name, files in defined.items() if len(files) > 1}
    assert twice.keys() == REDEFINED.keys(), "redefined but not listed, or listed but defined once"
    assert {name: files[-1] for name, files in twice.items()} == REDEFINED
    # and what the files define is what the database has (no definition dropped again later)
    assert set(defined) == set(_functions(database_url))


def test_a_second_definition_is_found(tmp_path: Path) -> None:
    """The check above can fail: a later file's redefinition counts (whatever its case, schema or
    signature); a definition in a comment does not."""
    (tmp_path / "0001_a.sql").write_text("create function mq_a(p_x int) returns int as $$ select 1 $$;")
    (tmp_path / "0002_b.sql").write_text(
        "-- create function mq_b() is not a definition\n"
        "CREATE OR REPLACE FUNCTION public.mq_a(p_x int, p_y int default 0)\n"
        "returns int language sql as $$ select 2 $$;"
    )
    assert definitions(tmp_path) == {"mq_a": ["0001_a.sql", "0002_b.sql"]}


def test_a_database_migrated_before_the_squash_is_refused(database_url: str) -> None:
    """A database that recorded a version the files no longer have (one of the files squashed into
    the baseline) is refused with its name, not met with "relation users already exists"."""
    assert apply_migrations(database_url) == []  # every file applied already: nothing to do
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "insert into supabase_migrations.schema_migrations (version, name)"
            " values ('20261123000001', 'core_schema')"
        )
    with pytest.raises(MigrationHistoryError, match="20261123000001"):
        apply_migrations(database_url)
