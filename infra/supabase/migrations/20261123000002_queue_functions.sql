-- The atomic steps of scheduling and delivery. Each function is one transaction, so the psycopg
-- store (DATABASE_URL) and the supabase store (PostgREST rpc) call the same code and behave the same.
-- Every function takes the current time as p_now: the database clock decides nothing, so tests and
-- soak runs can drive a virtual clock. Results are jsonb so both stores decode one shape.

-- The orchestrator's decisions, for agents and operators (agent_actions_log is the seed's table).
create or replace function mq_log_action(
    p_action_type text, p_user_id uuid, p_message_id uuid, p_input jsonb, p_output jsonb,
    p_error text, p_now timestamptz)
returns void
language sql as $$
    insert into agent_actions_log (agent_type, action_type, user_id, message_id, input_data, output_data,
                                   error, created_at)
    values ('message_orchestrator', p_action_type, p_user_id, p_message_id, p_input, p_output, p_error, p_now);
$$;

-- The seed's budget counter, keyed by the user's local date. p_at is when the message went out; the
-- default keeps the seed's two-argument call working for existing callers.
create or replace function increment_message_budget(p_user_id uuid, p_date date, p_at timestamptz default now())
returns void
language plpgsql as $$
begin
    insert into user_message_budget (user_id, date, messages_sent, last_message_at, created_at, updated_at)
    values (p_user_id, p_date, 1, p_at, p_at, p_at)
    on conflict (user_id, date) do update set
        messages_sent   = user_message_budget.messages_sent + 1,
        last_message_at = greatest(user_message_budget.last_message_at, excluded.last_message_at),
        updated_at      = excluded.updated_at;
end;
$$;

-- What the policy needs to know about a user at p_now: settings, the slot times of messages sent or
-- being sent in the last 26 h (a local day is at most 25 h long), queued reservations, last inbound.
create or replace function mq_user_context(p_user_id uuid, p_now timestamptz, p_exclude uuid default null)
returns jsonb
language sql stable as $$
    select case when u.id is null then null else jsonb_build_object(
        'user', to_jsonb(u),
        'sends', coalesce((
            select jsonb_agg(q.slot_at order by q.slot_at)
            from message_queue q
            where q.user_id = u.id and q.status in ('sending', 'sent')
              and q.slot_at > p_now - interval '26 hours'), '[]'::jsonb),
        'reservations', coalesce((
            select jsonb_agg(jsonb_build_object('at', r.scheduled_for, 'priority', r.priority)
                             order by r.scheduled_for)
            from (select q.scheduled_for, q.priority from message_queue q
                  where q.user_id = u.id and q.status = 'queued'
                    and (p_exclude is null or q.id <> p_exclude)
                  order by q.scheduled_for limit 500) r), '[]'::jsonb),
        'last_inbound_at', (
            select max(m.created_at) from messages m
            where m.user_id = u.id and m.direction = 'inbound' and m.created_at <= p_now)
    ) end
    from (select 1) one
    left join users u on u.id = p_user_id;
$$;

-- Insert a queued message. With an idempotency key already used by this agent, return the earlier
-- row instead (created = false) so the caller can compare request hashes.
create or replace function mq_enqueue(
    p_user_id uuid,
    p_agent_id text,
    p_message_data jsonb,
    p_final_message text,
    p_scheduled_for timestamptz,
    p_priority text,
    p_can_delay boolean,
    p_requires_fresh_context boolean,
    p_conversation_id uuid,
    p_idempotency_key text,
    p_request_hash text,
    p_expires_at timestamptz,
    p_reason text,
    p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
begin
    if p_idempotency_key is not null then
        select * into v_row from message_queue
        where agent_id = p_agent_id and idempotency_key = p_idempotency_key;
        if found then
            return jsonb_build_object('created', false, 'message', to_jsonb(v_row));
        end if;
    end if;
    perform 1 from users where id = p_user_id;
    if not found then
        return jsonb_build_object('error', 'unknown_user');
    end if;
    if p_conversation_id is not null then
        perform 1 from conversations where id = p_conversation_id and user_id = p_user_id;
        if not found then
            return jsonb_build_object('error', 'unknown_conversation');
        end if;
    end if;
    insert into message_queue (
        user_id, agent_id, message_data, final_message, scheduled_for, priority, can_delay,
        requires_fresh_context, conversation_context_id, idempotency_key, request_hash, expires_at,
        reason, created_at, updated_at)
    values (
        p_user_id, p_agent_id, p_message_data, p_final_message, p_scheduled_for, p_priority, p_can_delay,
        p_requires_fresh_context, p_conversation_id, p_idempotency_key, p_request_hash, p_expires_at,
        p_reason, p_now, p_now)
    on conflict (agent_id, idempotency_key) where idempotency_key is not null do nothing
    returning * into v_row;
    if not found then
        -- A concurrent request with the same key won the race: answer with its row.
        select * into v_row from message_queue
        where agent_id = p_agent_id and idempotency_key = p_idempotency_key;
        return jsonb_build_object('created', false, 'message', to_jsonb(v_row));
    end if;
    perform mq_log_action('scheduled', p_user_id, v_row.id,
        jsonb_build_object('agentId', p_agent_id, 'priority', p_priority, 'canDelay', p_can_delay),
        jsonb_build_object('scheduledFor', p_scheduled_for, 'reason', p_reason), null, p_now);
    return jsonb_build_object('created', true, 'message', to_jsonb(v_row));
end;
$$;

create or replace function mq_get(p_message_id uuid)
returns jsonb
language sql stable as $$
    select to_jsonb(q) from message_queue q where q.id = p_message_id;
$$;

create or replace function mq_delivery_context(p_message_id uuid, p_now timestamptz)
returns jsonb
language sql stable as $$
    select jsonb_build_object('message', to_jsonb(q), 'context', mq_user_context(q.user_id, p_now, q.id))
    from message_queue q where q.id = p_message_id;
$$;

-- Claim a queued message for sending. Under the user's row lock it re-counts everything that was
-- sent or is being sent, so two deliveries racing for one user can never both pass a limit; the
-- claim itself (slot_at = p_now) counts as a send for every limit from here on.
create or replace function mq_claim(
    p_message_id uuid,
    p_generation integer,
    p_now timestamptz,
    p_lease_seconds integer,
    p_cooldown_seconds integer,
    p_hourly_limit integer,
    p_daily_cap integer,
    p_day_start timestamptz,
    p_day_end timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
    v_opted_out timestamptz;
    v_row message_queue;
    v_token uuid;
    v_count integer;
begin
    select user_id into v_user_id from message_queue where id = p_message_id;
    if not found then
        return jsonb_build_object('claimed', false, 'reason', 'not_found');
    end if;
    -- Lock order everywhere: the user row, then the message rows. NO KEY UPDATE, not UPDATE: it
    -- still serialises claims per user, but does not block the KEY SHARE locks that foreign-key
    -- checks take (mq_record_sent holds the message row and inserts rows referencing the user).
    select coalesce(opted_out_at, undeliverable_at) into v_opted_out from users where id = v_user_id
    for no key update;
    select * into v_row from message_queue where id = p_message_id for update;
    if v_row.status <> 'queued' then
        return jsonb_build_object('claimed', false, 'reason', 'not_queued', 'status', v_row.status);
    end if;
    if v_row.task_generation <> p_generation then
        return jsonb_build_object('claimed', false, 'reason', 'stale_task', 'status', v_row.status);
    end if;
    if v_opted_out is not null then
        -- Opted out (STOP) or undeliverable (Twilio 30005/30006/21610/21614): never send.
        return jsonb_build_object('claimed', false, 'reason', 'opted_out', 'status', v_row.status);
    end if;
    if v_row.expires_at is not null and v_row.expires_at <= p_now then
        return jsonb_build_object('claimed', false, 'reason', 'expired', 'status', v_row.status);
    end if;
    -- One unresolved send per user: a 'sending' row whose lease ran out may still have reached
    -- Twilio, and until it is reconciled (the sweep, within a minute or two) nothing else goes out,
    -- so reconciliation never has to tell two in-doubt messages with the same text apart.
    perform 1 from message_queue
    where user_id = v_user_id and status = 'sending' and id <> p_message_id;
    if found then
        return jsonb_build_object('claimed', false, 'reason', 'in_flight', 'status', v_row.status);
    end if;
    perform 1 from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at > p_now - make_interval(secs => p_cooldown_seconds) and slot_at <= p_now;
    if found then
        return jsonb_build_object('claimed', false, 'reason', 'cooldown', 'status', v_row.status);
    end if;
    select count(*) into v_count from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at > p_now - interval '1 hour' and slot_at <= p_now;
    if v_count >= p_hourly_limit then
        return jsonb_build_object('claimed', false, 'reason', 'hourly_limit', 'status', v_row.status);
    end if;
    select count(*) into v_count from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at >= p_day_start and slot_at < p_day_end;
    if v_count >= p_daily_cap then
        return jsonb_build_object('claimed', false, 'reason', 'daily_limit', 'status', v_row.status);
    end if;
    v_token := gen_random_uuid();
    update message_queue set
        status = 'sending',
        claim_token = v_token,
        lease_expires_at = p_now + make_interval(secs => p_lease_seconds),
        slot_at = p_now,
        attempts = attempts + 1,
        reason = 'sending',
        updated_at = p_now
    where id = p_message_id;
    return jsonb_build_object('claimed', true, 'reason', 'ok', 'status', 'sending',
                              'token', v_token, 'attempts', v_row.attempts + 1);
end;
$$;

-- Re-plan a queued message for p_at. The generation bump retires every task made for the old plan:
-- an old task that still fires is recognised as stale and sends nothing.
create or replace function mq_reschedule(
    p_message_id uuid, p_generation integer, p_at timestamptz, p_reason text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
    v_generation integer;
begin
    update message_queue set
        scheduled_for = p_at,
        reason = p_reason,
        task_generation = task_generation + 1,
        updated_at = p_now
    where id = p_message_id and status = 'queued' and task_generation = p_generation
    returning user_id, task_generation into v_user_id, v_generation;
    if not found then
        return null;
    end if;
    perform mq_log_action('deferred', v_user_id, p_message_id, null,
        jsonb_build_object('scheduledFor', p_at, 'reason', p_reason, 'generation', v_generation), null, p_now);
    return to_jsonb(v_generation);
end;
$$;

-- Twilio accepted the message: mark it sent, write the outbound history row and count the budget,
-- all in one transaction. It records whatever claim is current: once Twilio has the message, the
-- send happened, and losing that fact would be worse than any race on the claim token.
create or replace function mq_record_sent(
    p_message_id uuid, p_token uuid, p_sid text, p_body text, p_now timestamptz, p_local_date date,
    p_reconciled boolean default false)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
    v_conversation uuid;
    v_message_id uuid;
begin
    select * into v_row from message_queue where id = p_message_id for update;
    if not found or v_row.status not in ('sending', 'queued') then
        return jsonb_build_object('recorded', false, 'status', v_row.status);
    end if;
    -- A sid is one send: if another message owns it, this is not that message's send (reconciling
    -- matches Twilio's records by recipient and text, which two messages can share).
    perform 1 from messages
    where twilio_message_sid = p_sid and message_queue_id is distinct from p_message_id;
    if found then
        return jsonb_build_object('recorded', false, 'reason', 'sid_taken', 'status', v_row.status);
    end if;
    v_conversation := v_row.conversation_context_id;
    if v_conversation is null then
        select id into v_conversation from conversations
        where user_id = v_row.user_id and status = 'active'
        order by created_at desc limit 1;
        if not found then
            insert into conversations (user_id, status, created_at, updated_at)
            values (v_row.user_id, 'active', p_now, p_now)
            returning id into v_conversation;
        end if;
    end if;
    insert into messages (conversation_id, user_id, direction, content, status, twilio_message_sid,
                          message_queue_id, sent_at, created_at)
    values (v_conversation, v_row.user_id, 'outbound', p_body, 'sent', p_sid, v_row.id, p_now, p_now)
    on conflict (twilio_message_sid) do update set message_queue_id = excluded.message_queue_id
    returning id into v_message_id;
    update conversations set last_message_at = p_now, updated_at = p_now where id = v_conversation;
    update message_queue set
        status = 'sent',
        sent_at = p_now,
        slot_at = greatest(coalesce(slot_at, p_now), p_now),
        twilio_message_sid = p_sid,
        final_message = p_body,
        delivered_message_id = v_message_id,
        conversation_context_id = v_conversation,
        claim_token = null,
        lease_expires_at = null,
        reason = 'sent',
        last_error = null,
        updated_at = p_now
    where id = p_message_id;
    perform increment_message_budget(v_row.user_id, p_local_date, p_now);
    -- Events for agents (events_outbox is created by a later migration; plpgsql resolves at run time).
    perform mq_emit('events', 'message.sent',
        jsonb_build_object('messageId', p_message_id, 'userId', v_row.user_id, 'agentId', v_row.agent_id,
                           'twilioMessageSid', p_sid, 'sentAt', p_now),
        jsonb_build_object('userId', v_row.user_id::text, 'agentId', v_row.agent_id), p_now);
    perform mq_log_action(case when p_reconciled then 'reconciled' else 'sent' end, v_row.user_id, p_message_id,
        null, jsonb_build_object('outcome', 'sent', 'twilioMessageSid', p_sid, 'attempts', v_row.attempts,
                                 'tokenMatched', v_row.claim_token is not distinct from p_token), null, p_now);
    return jsonb_build_object('recorded', true, 'status', 'sent',
                              'token_matched', v_row.claim_token is not distinct from p_token);
end;
$$;

-- A transient failure: give the claim back (the slot no longer counts) unless the attempts are spent.
create or replace function mq_release(
    p_message_id uuid, p_token uuid, p_error text, p_now timestamptz, p_max_attempts integer)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
    v_status text;
begin
    update message_queue set
        status = case when attempts >= p_max_attempts then 'failed' else 'queued' end,
        reason = case when attempts >= p_max_attempts then 'attempts_exhausted' else 'retry' end,
        last_error = p_error,
        claim_token = null,
        lease_expires_at = null,
        slot_at = null,
        updated_at = p_now
    where id = p_message_id and status = 'sending' and claim_token = p_token
    returning user_id, status into v_user_id, v_status;
    if not found then
        return (select to_jsonb(status) from message_queue where id = p_message_id);
    end if;
    if v_status = 'failed' then
        perform mq_emit('events', 'message.failed',
            jsonb_build_object('messageId', p_message_id, 'userId', v_user_id, 'reason', 'attempts_exhausted',
                               'error', p_error, 'at', p_now),
            jsonb_build_object('userId', v_user_id::text), p_now);
    end if;
    perform mq_log_action(case when v_status = 'failed' then 'failed' else 'retry' end, v_user_id, p_message_id,
        null, jsonb_build_object('status', v_status), p_error, p_now);
    return to_jsonb(v_status);
end;
$$;

create or replace function mq_fail(p_message_id uuid, p_error text, p_reason text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    update message_queue set
        status = 'failed',
        reason = p_reason,
        last_error = p_error,
        claim_token = null,
        lease_expires_at = null,
        slot_at = null,
        updated_at = p_now
    where id = p_message_id and status in ('queued', 'sending')
    returning user_id into v_user_id;
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_emit('events', 'message.failed',
        jsonb_build_object('messageId', p_message_id, 'userId', v_user_id, 'reason', p_reason, 'error', p_error,
                           'at', p_now),
        jsonb_build_object('userId', v_user_id::text), p_now);
    perform mq_log_action('failed', v_user_id, p_message_id, null, jsonb_build_object('reason', p_reason),
        p_error, p_now);
    return to_jsonb(true);
end;
$$;

create or replace function mq_expire(p_message_id uuid, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    update message_queue set status = 'expired', reason = 'expired', updated_at = p_now
    -- The caller has established that the message cannot go out before expires_at.
    where id = p_message_id and status = 'queued' and expires_at is not null
    returning user_id into v_user_id;
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_log_action('expired', v_user_id, p_message_id, null, null, null, p_now);
    return to_jsonb(true);
end;
$$;

-- An inbound SMS from a user (the Twilio webhook records these; tests and the demo use it to make a
-- user "active"). Deduplicated by Twilio's MessageSid.
create or replace function mq_record_inbound(p_user_id uuid, p_body text, p_sid text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_conversation uuid;
    v_id uuid;
begin
    select id into v_conversation from conversations
    where user_id = p_user_id and status = 'active' order by created_at desc limit 1;
    if not found then
        insert into conversations (user_id, status, created_at, updated_at)
        values (p_user_id, 'active', p_now, p_now) returning id into v_conversation;
    end if;
    insert into messages (conversation_id, user_id, direction, content, status, twilio_message_sid, created_at)
    values (v_conversation, p_user_id, 'inbound', coalesce(p_body, ''), 'received', p_sid, p_now)
    on conflict (twilio_message_sid) do nothing
    returning id into v_id;
    update conversations set last_message_at = p_now, updated_at = p_now where id = v_conversation;
    return jsonb_build_object('recorded', v_id is not null, 'messageId', v_id, 'conversationId', v_conversation);
end;
$$;

-- An operator's or the demo's way to add a user; also used by tests. Returns the user row.
create or replace function mq_upsert_user(
    p_phone_number text,
    p_timezone text,
    p_quiet_hours_start time default null,
    p_quiet_hours_end time default null,
    p_quiet_hours_enabled boolean default true,
    p_daily_limit integer default null,
    p_hourly_limit integer default null,
    p_poc_agent_type text default null,
    p_id uuid default null)
returns jsonb
language sql as $$
    insert into users (id, phone_number, timezone, quiet_hours_start, quiet_hours_end, quiet_hours_enabled,
                       daily_limit, hourly_limit, poc_agent_type)
    values (coalesce(p_id, gen_random_uuid()), p_phone_number, p_timezone, p_quiet_hours_start,
            p_quiet_hours_end, p_quiet_hours_enabled, p_daily_limit, p_hourly_limit, p_poc_agent_type)
    on conflict (phone_number) do update set
        timezone = excluded.timezone,
        quiet_hours_start = excluded.quiet_hours_start,
        quiet_hours_end = excluded.quiet_hours_end,
        quiet_hours_enabled = excluded.quiet_hours_enabled,
        daily_limit = excluded.daily_limit,
        hourly_limit = excluded.hourly_limit,
        poc_agent_type = excluded.poc_agent_type,
        updated_at = now()
    returning to_jsonb(users.*);
$$;
