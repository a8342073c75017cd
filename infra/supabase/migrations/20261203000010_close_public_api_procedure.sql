-- The closing of 20261203000009_close_public_api.sql as a procedure, so that each later migration
-- that creates a table, a sequence or a function (or replaces one: `create or replace` drops its
-- SET search_path) ends with one line instead of a copy of that block:
--
--     call close_public_api();
--
-- It does exactly what 20261203000009 does (row level security on every table in public, nothing
-- to PUBLIC/anon/authenticated, the grants to service_role, search_path fixed on the product's
-- functions), including to itself. tests/integration/test_api_roles.py checks the result after
-- every migration has run.
create or replace procedure close_public_api()
language plpgsql as $$
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
          and (starts_with(p.proname, 'mq_') or p.proname in ('increment_message_budget', 'close_public_api'))
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

call close_public_api();
