-- The sweep on a large backlog (bench: 100,000 overdue rows). As a SQL-language function the
-- re-tasking update was planned generically (a hash join over the whole table: 69 ms a batch of
-- 200 instead of 11 ms), and scanning the due index by scheduled_for walked past every row an
-- earlier batch had just re-tasked (50,000 rows filtered out half way through). In plpgsql the ids
-- are picked first and updated by primary key; they are picked by updated_at, the rows untouched
-- the longest first, from an index on which a re-tasked row (updated_at = now) is out of range.

create index if not exists message_queue_queued_touched on message_queue (updated_at) where status = 'queued';

create or replace function mq_sweep_overdue(p_now timestamptz, p_grace_seconds integer, p_limit integer)
returns jsonb
language plpgsql as $$
declare
    v_cutoff timestamptz := p_now - make_interval(secs => p_grace_seconds);
    v_ids uuid[];
    v_result jsonb;
begin
    select array_agg(id) into v_ids from (
        select id from message_queue
        where status = 'queued' and updated_at < v_cutoff and scheduled_for < v_cutoff
        order by updated_at
        limit p_limit
        for update skip locked) picked;
    if v_ids is null then
        return '[]'::jsonb;
    end if;
    with bumped as (
        update message_queue q set task_generation = q.task_generation + 1, updated_at = p_now
        where q.id = any (v_ids)
        returning q.id, q.user_id, q.task_generation, q.scheduled_for),
    logged as (
        insert into agent_actions_log (agent_type, action_type, user_id, message_id, output_data, created_at)
        select 'message_orchestrator', 'task_recreated', b.user_id, b.id,
               jsonb_build_object('generation', b.task_generation, 'scheduledFor', b.scheduled_for), p_now
        from bumped b)
    select coalesce(jsonb_agg(jsonb_build_object('id', id, 'generation', task_generation,
                                                 'scheduled_for', scheduled_for)), '[]'::jsonb)
    into v_result
    from bumped;
    return v_result;
end;
$$;

-- The other sweep steps the same way: ids first (by an index), then the update by primary key.
create index if not exists message_queue_queued_expiry on message_queue (expires_at)
    where status = 'queued' and expires_at is not null;

create or replace function mq_sweep_expire(p_now timestamptz, p_limit integer)
returns jsonb
language plpgsql as $$
declare
    v_ids uuid[];
    v_count integer;
begin
    select array_agg(id) into v_ids from (
        select id from message_queue
        where status = 'queued' and expires_at is not null and expires_at <= p_now
        order by expires_at
        limit p_limit
        for update skip locked) picked;
    if v_ids is null then
        return to_jsonb(0);
    end if;
    with expired as (
        update message_queue q set status = 'expired', reason = 'expired', updated_at = p_now
        where q.id = any (v_ids)
        returning q.id, q.user_id),
    logged as (
        insert into agent_actions_log (agent_type, action_type, user_id, message_id, created_at)
        select 'message_orchestrator', 'expired', e.user_id, e.id, p_now from expired e)
    select count(*) into v_count from expired;
    return to_jsonb(v_count);
end;
$$;

create or replace function mq_sweep_horizon(p_now timestamptz, p_horizon_seconds integer, p_limit integer)
returns jsonb
language plpgsql as $$
declare
    v_ids uuid[];
    v_result jsonb;
begin
    select array_agg(id) into v_ids from (
        select id from message_queue
        where status = 'queued'
          and scheduled_for >= p_now
          and scheduled_for <= p_now + make_interval(secs => p_horizon_seconds)
          and scheduled_for - updated_at > make_interval(secs => p_horizon_seconds)
        order by scheduled_for
        limit p_limit
        for update skip locked) picked;
    if v_ids is null then
        return '[]'::jsonb;
    end if;
    with touched as (
        update message_queue q set updated_at = p_now
        where q.id = any (v_ids)
        returning q.id, q.task_generation, q.scheduled_for)
    select coalesce(jsonb_agg(jsonb_build_object('id', id, 'generation', task_generation,
                                                 'scheduled_for', scheduled_for)), '[]'::jsonb)
    into v_result
    from touched;
    return v_result;
end;
$$;

create or replace function mq_take_stale_claims(
    p_now timestamptz, p_lease_seconds integer, p_limit integer, p_message_id uuid default null)
returns jsonb
language plpgsql as $$
declare
    v_ids uuid[];
    v_result jsonb;
begin
    select array_agg(id) into v_ids from (
        select id from message_queue
        where status = 'sending' and lease_expires_at <= p_now
          and (p_message_id is null or id = p_message_id)
        order by lease_expires_at
        limit p_limit
        for update skip locked) picked;
    if v_ids is null then
        return '[]'::jsonb;
    end if;
    with taken as (
        update message_queue q set
            claim_token = gen_random_uuid(),
            lease_expires_at = p_now + make_interval(secs => p_lease_seconds),
            updated_at = p_now
        where q.id = any (v_ids)
        returning q.*)
    select coalesce(jsonb_agg(jsonb_build_object(
        'message', mq_message_doc(t::message_queue),
        'phone_number', u.phone_number,
        'timezone', u.timezone)), '[]'::jsonb)
    into v_result
    from taken t join users u on u.id = t.user_id;
    return v_result;
end;
$$;
