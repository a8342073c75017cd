"""The database is closed to Supabase's public API roles (issue 14,
infra/supabase/migrations/20261203000009_close_public_api.sql).

On a fresh database set up as a Supabase project is (its roles and its default privileges, which
grant every new table, sequence and function in `public` to anon and authenticated) and then
migrated: anon and authenticated can neither read a table nor execute a function, every table has
row level security with no policy, every function has a fixed search_path, and the stores work as
service_role. Tables, sequences and functions are listed from the catalog, so a later migration that
leaves a new one open fails here. Then the same on a plain PostgreSQL database migrated before those
roles existed: nothing is left to PUBLIC.

The roles are cluster-wide. The embedded server is one per test process and the template every
other test's database is cloned from is migrated before they are created, so they change no other
test; on a shared server (TEST_DATABASE_URL) they are created once, whichever worker comes first.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from shared import service
from shared.dev.sink import SmsSink
from shared.errors import StoreError
from shared.sms import TwilioSender
from shared.store.migrate import MIGRATIONS_DIR, apply_migrations, migration_files
from shared.store.postgres import PostgresStore
from shared.store.supabase import SupabaseStore
from tests.support.constants import POLICY, T0
from tests.support.fakes import RecordingTaskQueue, VirtualClock
from tests.support.pg import PgCluster
from tests.support.postgrest import PostgrestStandIn

CLOSING_MIGRATION = MIGRATIONS_DIR / "20261203000009_close_public_api.sql"
API_ROLES = ("anon", "authenticated")
SERVICE_KEY = "test-service-key"
SEARCH_PATH = ["search_path=public, pg_temp"]
STRANGER = "mq_test_stranger"  # a role nobody grants anything: what PUBLIC leaves to every role

# Supabase's API roles, as its initial schema creates them (supabase/postgres,
# migrations/db/init-scripts/00000000000000-initial-schema.sql). Each in its own block: a block
# that fails stops, and another test process may create the same role at the same moment (a
# concurrent CREATE ROLE fails with unique_violation rather than duplicate_object).
ROLES = {
    "anon": "nologin noinherit",
    "authenticated": "nologin noinherit",
    "service_role": "nologin noinherit bypassrls",
}
_CREATE_ROLE = """
do $$
begin
    create role {role} {attributes};
exception when duplicate_object or unique_violation then
    null;  -- there already, from an earlier module or another test process
end
$$;
"""

# Supabase's grants to those roles, from the same file: `grant usage on schema public` and the
# default privileges of the role that creates the objects (there `postgres`, the role the
# migrations run as; here the test server's superuser, which runs them here). Per database.
SUPABASE_DEFAULT_PRIVILEGES = """
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
"""

_TABLES = """
select c.oid, c.relname, c.relkind, c.relrowsecurity from pg_class c
where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'S')
  and not exists (select from pg_depend d
                  where d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e')
order by c.relname
"""

# Every function in public (test_migrations: the mq_ ones and increment_message_budget), with a call
# of it on NULL arguments. Each argument is a scalar subquery, not a constant: the planner folds a
# call of a STRICT function on a NULL constant into NULL without ever checking EXECUTE.
_FUNCTIONS = """
select p.oid, p.proname, p.oid::regprocedure::text, p.proconfig,
       format(case p.prokind when 'p' then 'call public.%I(%s)' else 'select public.%I(%s)' end, p.proname,
              (select string_agg(format('(select null::%s)', format_type(t.oid, null)), ', ' order by t.n)
               from unnest(p.proargtypes::oid[]) with ordinality as t(oid, n)))
from pg_proc p
where p.pronamespace = 'public'::regnamespace
  and not exists (select from pg_depend d
                  where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
order by p.proname
"""


@dataclass(frozen=True)
class Relation:
    oid: int
    name: str
    kind: str  # 'r' table, 'p' partitioned table, 'S' sequence
    row_security: bool


@dataclass(frozen=True)
class Function:
    oid: int
    name: str
    signature: str
    config: list[str] | None
    call: str

    @property
    def denied(self) -> str:
        """PostgreSQL's refusal to a role without EXECUTE on it."""
        kind = "procedure" if self.call.startswith("call ") else "function"
        return f"permission denied for {kind} {self.name}"


def relations(conn: psycopg.Connection[Any]) -> tuple[list[Relation], list[Relation]]:
    """The tables and the sequences in public (an extension's excepted)."""
    found = [Relation(*row) for row in conn.execute(_TABLES).fetchall()]
    return [r for r in found if r.kind != "S"], [r for r in found if r.kind == "S"]


def functions(conn: psycopg.Connection[Any]) -> list[Function]:
    return [Function(*row) for row in conn.execute(_FUNCTIONS).fetchall()]


def as_role(conn: psycopg.Connection[Any], role: str, statement: str | sql.Composable) -> str | None:
    """Run `statement` as `role`, in a transaction of its own that is then rolled back; the error's
    message when it failed ("permission denied for ..." when refused; a function that may be
    executed runs, and fails on its NULL arguments with another), None when it succeeded."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
            conn.execute(statement)
    except psycopg.Error as exc:
        return exc.diag.message_primary or str(exc)
    return None


def as_role_url(url: str, role: str) -> str:
    """`url`, connecting as its user and then acting as `role` from the first statement on (what
    PostgREST does for a request with the service key, by `set local role service_role`)."""
    return make_conninfo(url, options=f"-c role={role}")


# --- the databases -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def supabase_roles(pg_cluster: PgCluster) -> None:
    # The template first: every other test's database is cloned from it, and it is to be migrated
    # on a server without these roles, as plain PostgreSQL is (test_a_plain_database_...).
    pg_cluster.ensure_template()
    with psycopg.connect(pg_cluster.admin_url, autocommit=True) as conn:
        for role, attributes in {**ROLES, STRANGER: "nologin"}.items():
            conn.execute(_CREATE_ROLE.format(role=role, attributes=attributes))


@pytest.fixture(scope="module")
def supabase_url(pg_cluster: PgCluster, supabase_roles: None) -> Iterator[str]:
    """A database set up as a Supabase project's (roles, default privileges), then migrated. One per
    module: the tests read its catalog, and those that write use rows of their own."""
    name = "t_supabase_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_cluster.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    url = pg_cluster.url(name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SUPABASE_DEFAULT_PRIVILEGES)
        assert CLOSING_MIGRATION.stem in apply_migrations(url)
        yield url
    finally:
        with psycopg.connect(pg_cluster.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture
def supabase_db(supabase_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection as the owner (the migrating role) to the Supabase-like database."""
    with psycopg.connect(supabase_url, autocommit=True) as conn:
        yield conn


# --- anon and authenticated ---------------------------------------------------------------------------


def test_the_catalog_lists_every_product_table_sequence_and_function(
    supabase_db: psycopg.Connection[Any],
) -> None:
    """The lists the other tests walk are the product's, not empty ones."""
    tables, sequences = relations(supabase_db)
    assert {"users", "messages", "message_queue", "events_outbox"} <= {t.name for t in tables}
    # The migration history is not in public (the Supabase CLI's table: see the test below).
    assert "schema_migrations" not in {t.name for t in tables}
    assert {"sweep_runs_id_seq", "events_outbox_id_seq"} <= {s.name for s in sequences}
    names = {f.name for f in functions(supabase_db)}
    assert {"mq_claim", "mq_enqueue", "mq_upsert_user", "increment_message_budget"} <= names
    assert len([n for n in names if n.startswith("mq_")]) > 30


@pytest.mark.parametrize("role", API_ROLES)
def test_an_api_role_can_read_no_table_and_use_no_sequence(
    supabase_db: psycopg.Connection[Any], role: str
) -> None:
    tables, sequences = relations(supabase_db)
    assert tables and sequences
    refused = {
        t.name: as_role(
            supabase_db, role, sql.SQL("select * from public.{} limit 1").format(sql.Identifier(t.name))
        )
        for t in tables
    }
    assert refused == {t.name: f"permission denied for table {t.name}" for t in tables}
    # Nor any other privilege: writing, truncating, a foreign key or a trigger on it.
    granted = supabase_db.execute(
        "select c.relname from pg_class c where c.oid = any(%s)"
        " and has_table_privilege(%s, c.oid,"
        "                         'select, insert, update, delete, truncate, references, trigger')",
        [[t.oid for t in tables], role],
    ).fetchall()
    assert granted == []
    refused = {
        s.name: as_role(
            supabase_db, role, sql.SQL("select nextval({})").format(sql.Literal(f"public.{s.name}"))
        )
        for s in sequences
    }
    assert refused == {s.name: f"permission denied for sequence {s.name}" for s in sequences}
    granted = supabase_db.execute(
        "select c.relname from pg_class c where c.oid = any(%s)"
        " and has_sequence_privilege(%s, c.oid, 'usage, select, update')",
        [[s.oid for s in sequences], role],
    ).fetchall()
    assert granted == []


@pytest.mark.parametrize("role", API_ROLES)
def test_an_api_role_can_execute_no_function(supabase_db: psycopg.Connection[Any], role: str) -> None:
    found = functions(supabase_db)
    assert any(f.name.startswith("mq_") for f in found)
    refused = {f.signature: as_role(supabase_db, role, f.call) for f in found}
    assert refused == {f.signature: f.denied for f in found}
    granted = [f.signature for f in found if _can_execute(supabase_db, role, f)]
    assert granted == []


def _can_execute(conn: psycopg.Connection[Any], role: str, function: Function) -> bool:
    row = conn.execute("select has_function_privilege(%s, %s, 'execute')", [role, function.oid]).fetchone()
    assert row is not None
    return bool(row[0])


def test_every_table_has_row_level_security_and_no_policy_for_the_api_roles(
    supabase_db: psycopg.Connection[Any],
) -> None:
    tables, _ = relations(supabase_db)
    assert [t.name for t in tables if not t.row_security] == []
    # A policy for PUBLIC (role oid 0) applies to anon and authenticated too.
    policies = supabase_db.execute(
        "select p.polrelid::regclass::text, p.polname from pg_policy p"
        " where p.polrelid = any(%s)"
        "   and p.polroles && array[0::oid, 'anon'::regrole::oid, 'authenticated'::regrole::oid]",
        [[t.oid for t in tables]],
    ).fetchall()
    assert policies == []


@pytest.mark.parametrize("role", [*API_ROLES, STRANGER])
def test_an_api_role_cannot_reach_the_migration_history(
    supabase_db: psycopg.Connection[Any], role: str
) -> None:
    """The history is the Supabase CLI's supabase_migrations.schema_migrations (shared/store/migrate.py),
    outside public, which close_public_api() walks. Nothing grants that schema to the API roles or to
    PUBLIC (the runner creates it as the CLI does, with no grant, and Supabase's default privileges
    are for public), so they can neither use the schema nor read its table: every file name and
    every statement of every migration."""
    count = supabase_db.execute("select count(*) from supabase_migrations.schema_migrations").fetchone()
    assert count == (len(migration_files(MIGRATIONS_DIR)),)
    refused = as_role(supabase_db, role, "select * from supabase_migrations.schema_migrations")
    assert refused == "permission denied for schema supabase_migrations"
    granted = supabase_db.execute(
        "select has_schema_privilege(%(role)s, 'supabase_migrations', 'usage, create'),"
        " has_table_privilege(%(role)s, 'supabase_migrations.schema_migrations',"
        "                     'select, insert, update, delete, truncate, references, trigger')",
        {"role": role},
    ).fetchone()
    assert granted == (False, False)


def test_row_level_security_hides_every_row_from_a_role_granted_a_table(
    supabase_db: psycopg.Connection[Any],
) -> None:
    """The second lock: had a later migration granted a table to anon again, anon would still see
    no row of it, while the owner sees them all."""
    with supabase_db.transaction(force_rollback=True):
        supabase_db.execute("select mq_upsert_user(p_phone_number => '+15557770001', p_timezone => 'UTC')")
        supabase_db.execute("grant select on table users to anon")
        owner_sees = supabase_db.execute("select count(*) from users").fetchone()
        supabase_db.execute("set local role anon")
        anon_sees = supabase_db.execute("select count(*) from users").fetchone()
    assert owner_sees is not None and owner_sees[0] >= 1
    assert anon_sees == (0,)


def test_every_function_has_a_fixed_search_path(supabase_db: psycopg.Connection[Any]) -> None:
    found = functions(supabase_db)
    assert found
    assert {f.signature: f.config for f in found if f.config != SEARCH_PATH} == {}


def test_no_function_is_security_definer(supabase_db: psycopg.Connection[Any]) -> None:
    """They run with their caller's rights (see the migration's header): a definer function would
    hand the owner's rights to whoever can execute it."""
    definers = supabase_db.execute(
        "select p.oid::regprocedure::text from pg_proc p"
        " where p.pronamespace = 'public'::regnamespace and p.prosecdef"
    ).fetchall()
    assert definers == []


@pytest.mark.parametrize(
    "closing", [CLOSING_MIGRATION.read_text(), "call close_public_api()"], ids=["migration", "procedure"]
)
def test_the_setup_is_supabases_and_the_migration_closes_what_it_finds(
    supabase_db: psycopg.Connection[Any], closing: str
) -> None:
    """What the tests above would meet without the closing migration: here a table and a function
    created after it are open to anon, as every object was on Supabase. The closing migration, run
    again (it is idempotent), closes them: what a later migration that creates objects can do."""
    with supabase_db.transaction(force_rollback=True):
        supabase_db.execute("create table public.probe (id int)")
        supabase_db.execute(
            "create function public.mq_probe() returns int language sql"
            " as $$ select count(*)::int from probe $$"
        )
        assert as_role(supabase_db, "anon", "select * from public.probe") is None
        assert as_role(supabase_db, "anon", "select public.mq_probe()") is None

        supabase_db.execute(closing)

        assert (
            as_role(supabase_db, "anon", "select * from public.probe") == "permission denied for table probe"
        )
        assert as_role(supabase_db, "anon", "select public.mq_probe()") == (
            "permission denied for function mq_probe"
        )
        probe = supabase_db.execute(
            "select c.relrowsecurity, p.proconfig from pg_class c, pg_proc p"
            " where c.oid = 'public.probe'::regclass and p.oid = 'public.mq_probe()'::regprocedure"
        ).fetchone()
        assert probe == (True, SEARCH_PATH)
        # service_role keeps what Supabase's defaults gave it.
        assert as_role(supabase_db, "service_role", "select public.mq_probe()") is None


# --- service_role: the stores work as before --------------------------------------------------------


@pytest.fixture(params=["psycopg", "supabase"])
def service_store(
    request: pytest.FixtureRequest, supabase_url: str
) -> Iterator[PostgresStore | SupabaseStore]:
    """The real store as service_role: psycopg straight to the database, or supabase-py over HTTP to
    the PostgREST stand-in, which calls the functions on a connection acting as service_role."""
    conninfo = as_role_url(supabase_url, "service_role")
    if request.param == "psycopg":
        pg = PostgresStore(conninfo)
        with pg._pool.connection() as conn:
            assert conn.execute("select current_user").fetchone() == ("service_role",)
        yield pg
        pg.close()
        return
    stand_in = PostgrestStandIn(conninfo, service_key=SERVICE_KEY)
    store = SupabaseStore.connect(stand_in.url, SERVICE_KEY)
    yield store
    store.close()
    stand_in.stop()


def test_as_service_role_a_message_is_scheduled_sent_and_recorded(
    service_store: PostgresStore | SupabaseStore,
    twilio_sender: TwilioSender,
    sms_sink: SmsSink,
    supabase_db: psycopg.Connection[Any],
) -> None:
    """The whole path as the REST store's role: a user, a schedule (admission, plan, enqueue), a
    delivery (claim, Twilio, record sent with the messages row, the budget and the event), an
    inbound reply, a STOP with its consent ledger row, the event outbox (a bigserial: the sequence's
    privilege) and a sweep run."""
    phone = "+1555" + str(uuid.uuid4().int)[:7]
    user = uuid.UUID(service_store.upsert_user(phone, "UTC")["id"])
    tasks = RecordingTaskQueue()
    body = {
        "userId": str(user),
        "agentId": "roles_agent",
        "messageData": {"content": "hello as service_role"},
    }
    scheduled = service.schedule(body, store=service_store, tasks=tasks, config=POLICY, now=T0)
    assert scheduled.created and scheduled.message.scheduled_for == T0

    clock = VirtualClock(T0)
    outcome = service.deliver(
        {"messageId": str(scheduled.message.id), "generation": 0},
        store=service_store,
        tasks=tasks,
        sms=twilio_sender,
        config=POLICY,
        clock=clock,
    )

    assert outcome.action == "sent", outcome
    assert [(m["to"], m["body"]) for m in sms_sink.messages()] == [(phone, "hello as service_role")]
    stored = service_store.get_message(scheduled.message.id)
    assert stored is not None and stored.status == "sent"
    service.inbound(
        {"From": phone, "Body": "thanks", "MessageSid": "SM" + uuid.uuid4().hex}, store=service_store, now=T0
    )
    # An opt-out and its consent ledger row (an identity column: its sequence's privilege), read back.
    service.inbound(
        {"From": phone, "Body": "STOP", "MessageSid": "SM" + uuid.uuid4().hex}, store=service_store, now=T0
    )
    consent = service_store.consent_history(user, 10)
    assert consent is not None and [(e.event, e.source) for e in consent.events] == [("opt_out", "keyword")]
    pending = service_store.events_pending(100, lease_seconds=60, now=T0)
    assert pending, "the sent and inbound events are in the outbox"
    assert service_store.events_published([e.id for e in pending], T0) == len(pending)
    report = service.sweep(
        store=service_store, tasks=tasks, sms=twilio_sender, config=POLICY, clock=clock, trigger="test"
    )
    assert report.task_errors == 0
    # Read back as the owner: what the functions wrote as service_role is there.
    assert supabase_db.execute(
        "select q.status, m.direction, m.content, b.messages_sent from message_queue q"
        " join messages m on m.id = q.delivered_message_id"
        " join user_message_budget b on b.user_id = q.user_id"
        " where q.id = %s",
        [scheduled.message.id],
    ).fetchall() == [("sent", "outbound", "hello as service_role", 1)]
    runs = supabase_db.execute(
        "select count(*) from sweep_runs where trigger = 'test' and error is null"
    ).fetchone()
    assert runs is not None and runs[0] >= 1


@pytest.mark.parametrize("role", API_ROLES)
def test_the_store_as_an_api_role_is_refused(supabase_url: str, role: str) -> None:
    """The same store acting as an API role gets nothing: the role it acts as decides, not the
    connection."""
    store = PostgresStore(as_role_url(supabase_url, role))
    try:
        with pytest.raises(StoreError, match="InsufficientPrivilege"):
            store.upsert_user("+15557770002", "UTC")
    finally:
        store.close()


# --- plain PostgreSQL, migrated without the roles --------------------------------------------------


def test_a_plain_database_leaves_nothing_to_public(supabase_roles: None, database_url: str) -> None:
    """`database_url` is a clone of the template, migrated before the roles above existed (on the
    embedded server: the roles fixture builds the template first), so the migration named none of
    them. PUBLIC, i.e. every role, keeps no privilege: a role nobody granted anything is refused."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables, sequences = relations(conn)
        found = functions(conn)
        assert tables and sequences and any(f.name.startswith("mq_") for f in found)
        owner = conn.execute("select current_user").fetchone()
        assert owner is not None
        # Every grantee of every ACL: the owner's and, where the roles existed when the template was
        # migrated (a shared server), service_role's; never PUBLIC (grantee 0).
        grantees = conn.execute(
            """
            select distinct case e.grantee when 0 then 'PUBLIC' else e.grantee::regrole::text end
            from (select coalesce(c.relacl, acldefault(
                             (case c.relkind when 'S' then 's' else 'r' end)::"char", c.relowner)) as acl
                  from pg_class c where c.oid = any(%(relations)s)
                  union all
                  select coalesce(p.proacl, acldefault('f', p.proowner))
                  from pg_proc p where p.oid = any(%(functions)s)) o,
                 aclexplode(o.acl) e
            """,
            {"relations": [r.oid for r in tables + sequences], "functions": [f.oid for f in found]},
        ).fetchall()
        assert {g for (g,) in grantees} - {"service_role"} == {owner[0]}
        assert [f.signature for f in found if _can_execute(conn, "public", f)] == []
        assert [t.name for t in tables if not t.row_security] == []
        assert {f.signature: f.config for f in found if f.config != SEARCH_PATH} == {}
        refused = {f.signature: as_role(conn, STRANGER, f.call) for f in found}
        assert refused == {f.signature: f.denied for f in found}
        users = as_role(conn, STRANGER, "select * from public.users")
        assert users == "permission denied for table users"


CLOSE_CALL = "call close_public_api();"


def test_every_migration_after_the_closing_one_closes_what_it_creates() -> None:
    """A later migration that creates or replaces anything ends by calling the closing procedure
    (its own objects would otherwise be open to anon on Supabase, or lose their search_path)."""
    later = [p for p in migration_files(MIGRATIONS_DIR) if p.name > CLOSING_MIGRATION.name]
    assert later, "the closing procedure's migration at least"
    for path in later:
        text = re.sub(r"--[^\n]*", "", path.read_text())
        if re.search(r"\b(create|alter\s+table|drop)\b", text, re.IGNORECASE):
            assert text.rstrip().endswith(CLOSE_CALL), f"{path.name} must end with {CLOSE_CALL}"
