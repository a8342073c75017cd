-- Close the database to Supabase's public API roles (issue 14).
--
-- Why: on Supabase every table, sequence and function created in `public` is granted to `anon` and
-- `authenticated` by default (the project's initial schema sets those default privileges), and the
-- Data API (PostgREST) serves `public` to anyone holding the project's public anon key. Left as it
-- was, that key could read `users` (phone numbers) and `messages` (texts) and call `rpc/mq_claim`.
-- PostgreSQL itself also grants EXECUTE on every new function to PUBLIC, i.e. to every role.
--
-- What this file does, idempotently (every statement can run again), on Supabase and on plain
-- PostgreSQL, where the roles anon, authenticated and service_role may not exist (each is only
-- named when it does):
--   * row level security on every table in `public` (the product's, and the migration runner's
--     schema_migrations when shared/store/migrate.py created it), with no policy: a role that is
--     neither the owner nor BYPASSRLS sees no row even if it is granted the table some day;
--   * `revoke all` on those tables, on every sequence in `public`, and on every `mq_*` function and
--     increment_message_budget, from PUBLIC, anon and authenticated;
--   * the same privileges granted to service_role explicitly (what Supabase's defaults gave it), so
--     the REST store keeps working whatever the project's default privileges are: ALL on the tables
--     and sequences, EXECUTE on the functions;
--   * a fixed search_path (`public, pg_temp`) on each of those functions, so none resolves names
--     through its caller's search_path (Supabase's linter: function_search_path_mutable). No body
--     names another schema (no `extensions.` function; gen_random_uuid is built in since PG 13).
--
-- Who reaches the data afterwards:
--   * the DATABASE_URL role (the psycopg store): the role that applied the migrations and owns the
--     tables and functions, `postgres` on Supabase. An owner keeps every right and is not subject to
--     row level security (no FORCE ROW LEVEL SECURITY here);
--   * service_role (the REST store, the supabase store's service key): EXECUTE on the functions, the
--     table privileges, and BYPASSRLS (Supabase creates it so);
--   * nobody else: anon, authenticated and any other role get "permission denied".
--
-- No function is SECURITY DEFINER, deliberately: both callers above may touch the tables
-- themselves, so the functions run with their caller's rights (SECURITY INVOKER, the default). A
-- definer function would run with the owner's rights for whoever can execute it, so one forgotten
-- grant would expose the data instead of failing with "permission denied".
--
-- Every later migration that creates a table, a sequence or a function (a `create or replace`
-- that changes a function's signature creates a new one; any `create or replace` drops its SET
-- search_path) must do the same for it: `enable row level security` on a table, `revoke all ...
-- from public, anon, authenticated` (each role named only if it exists, as below) and the grant to
-- service_role, and `set search_path = public, pg_temp` on a function. The simplest way is to
-- run this file's DO block again at the end of that migration. tests/integration/test_api_roles.py
-- enforces it: it lists the tables, sequences and functions from the catalog, on a database with
-- Supabase's roles and default privileges, so a new object that is left open fails it.

do $$
declare
    v_closed text;      -- "public" and the API roles that exist here
    v_service boolean := exists (select from pg_roles where rolname = 'service_role');
    v_object record;
begin
    select string_agg(quote_ident(r), ', ') into v_closed
    from unnest(array['public', 'anon', 'authenticated']) r
    where r = 'public' or exists (select from pg_roles where rolname = r);

    -- Tables (ordinary and partitioned) and sequences in public, an extension's excepted.
    for v_object in
        select c.relname, c.relkind from pg_class c
        where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'S')
          and not exists (select from pg_depend d
                          where d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e')
        order by c.relname
    loop
        if v_object.relkind = 'S' then
            execute format('revoke all on sequence public.%I from %s', v_object.relname, v_closed);
            if v_service then
                execute format('grant all on sequence public.%I to service_role', v_object.relname);
            end if;
        else
            execute format('alter table public.%I enable row level security', v_object.relname);
            execute format('revoke all on table public.%I from %s', v_object.relname, v_closed);
            if v_service then
                execute format('grant all on table public.%I to service_role', v_object.relname);
            end if;
        end if;
    end loop;

    -- The product's functions: the mq_ namespace and the seed's budget counter.
    for v_object in
        select p.proname, pg_get_function_identity_arguments(p.oid) as args from pg_proc p
        where p.pronamespace = 'public'::regnamespace and p.prokind in ('f', 'p')
          and (starts_with(p.proname, 'mq_') or p.proname = 'increment_message_budget')
          and not exists (select from pg_depend d
                          where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
        order by p.proname
    loop
        execute format('revoke all on routine public.%I(%s) from %s', v_object.proname, v_object.args, v_closed);
        if v_service then
            execute format('grant execute on routine public.%I(%s) to service_role', v_object.proname, v_object.args);
        end if;
        execute format('alter routine public.%I(%s) set search_path = public, pg_temp',
                       v_object.proname, v_object.args);
    end loop;
end;
$$;
