-- The sweep: what catches everything a Cloud Task missed. Cloud Scheduler publishes to the sweep
-- topic every minute; each step claims work in batches with FOR UPDATE SKIP LOCKED, so two sweeps
-- running at once never take the same row. Like everything else, it is told the time (p_now).
--
-- Each step is plpgsql and picks the ids first (by an index), then updates them by primary key: as
-- a SQL-language function the update is planned generically (a hash join over the whole table).

-- Queued rows overdue by more than the grace period and untouched for as long: their task was lost
-- (or never created). A new generation retires any task still around; the caller creates its task.
-- Picked by updated_at, the rows untouched the longest first (message_queue_queued_touched): a row
-- re-tasked by an earlier batch is out of range, not filtered out again.
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

-- Queued rows planned beyond the Cloud Tasks horizon when last planned (so no task exists) that
-- have come within it: touching updated_at marks them as handed to a task.
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

-- 'sending' rows whose lease ran out: the process that claimed them died or timed out, maybe after
-- Twilio accepted the message. The caller reconciles with Twilio before anything is sent again; it
-- gets a fresh claim (token and lease) so that no other sweep reconciles the same row meanwhile.
-- A sequence comes with its parts (which of them went out).
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

-- Twilio has no record of a stale claim's message: back to queued with a new generation, due now;
-- the normal delivery path (and its limit checks) sends it.
create or replace function mq_requeue_claim(p_message_id uuid, p_token uuid, p_reason text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
    v_generation integer;
begin
    update message_queue set
        status = 'queued',
        reason = p_reason,
        claim_token = null,
        lease_expires_at = null,
        slot_at = null,
        scheduled_for = p_now,
        task_generation = task_generation + 1,
        updated_at = p_now
    where id = p_message_id and status = 'sending' and claim_token = p_token
    returning user_id, task_generation into v_user_id, v_generation;
    if not found then
        return null;
    end if;
    perform mq_log_action('reconciled', v_user_id, p_message_id, null,
        jsonb_build_object('outcome', 'not_sent', 'requeued', true, 'generation', v_generation), null, p_now);
    return to_jsonb(v_generation);
end;
$$;

-- A message whose Twilio call timed out: the outcome is unknown, so the claim stays (its slot keeps
-- counting) until p_reconcile_at, when the sweep or a retried task asks Twilio what happened.
create or replace function mq_hold_for_reconcile(
    p_message_id uuid, p_token uuid, p_error text, p_reconcile_at timestamptz, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    update message_queue set
        lease_expires_at = p_reconcile_at,
        last_error = p_error,
        reason = 'outcome_unknown',
        updated_at = p_now
    where id = p_message_id and status = 'sending' and claim_token = p_token
    returning user_id into v_user_id;
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_log_action('outcome_unknown', v_user_id, p_message_id, null,
        jsonb_build_object('reconcileAt', p_reconcile_at), p_error, p_now);
    return to_jsonb(true);
end;
$$;

-- Queued rows past expires_at: never sent late.
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

create or replace function mq_record_sweep(
    p_trigger text, p_started_at timestamptz, p_finished_at timestamptz, p_counts jsonb, p_error text)
returns jsonb
language sql as $$
    insert into sweep_runs (trigger, started_at, finished_at, counts, error)
    values (p_trigger, p_started_at, p_finished_at, coalesce(p_counts, '{}'::jsonb), p_error)
    returning to_jsonb(id);
$$;

-- For the health function: the queue's depth, what went out, the last sweep, the oldest overdue row.
create or replace function mq_health(p_now timestamptz)
returns jsonb
language sql stable as $$
    select jsonb_build_object(
        'queued', (select count(*) from message_queue where status = 'queued'),
        'sending', (select count(*) from message_queue where status = 'sending'),
        'sent_24h', (select count(*) from message_queue
                     where status = 'sent' and sent_at > p_now - interval '24 hours'),
        'last_sweep', (select to_jsonb(r) from sweep_runs r order by finished_at desc limit 1),
        'oldest_overdue_at', (select min(scheduled_for) from message_queue
                              where status = 'queued' and scheduled_for < p_now));
$$;
