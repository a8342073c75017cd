-- The atomic steps of scheduling and delivery. Each function is one transaction, so the psycopg
-- store (DATABASE_URL) and the supabase store (PostgREST rpc) call the same code and behave the
-- same. Lock order everywhere: the user row, then the message rows.

-- The orchestrator's decisions, for agents and operators (agent_actions_log is the seed's table).
create or replace function mq_log_action(
    p_action_type text, p_user_id uuid, p_message_id uuid, p_input jsonb, p_output jsonb,
    p_error text, p_now timestamptz)
returns void
language plpgsql as $$
begin
    insert into agent_actions_log (agent_type, action_type, user_id, message_id, input_data, output_data,
                                   error, created_at)
    values ('message_orchestrator', p_action_type, p_user_id, p_message_id, p_input, p_output, p_error, p_now);
end;
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

-- A sequence's parts, in order: p_parts = [{content, delay_seconds, data?}, ...].
create or replace function mq_insert_parts(p_message_id uuid, p_parts jsonb)
returns void
language sql as $$
    insert into message_parts (message_id, position, content, delay_seconds, part_data)
    select p_message_id, e.ord::integer, coalesce(e.part ->> 'content', ''),
           coalesce((e.part ->> 'delay_seconds')::integer, 1), e.part -> 'data'
    from jsonb_array_elements(p_parts) with ordinality as e(part, ord);
$$;

-- Insert a queued message (with its parts, p_parts = [{content, delay_seconds, data?}, ...] in
-- order, or null). With an idempotency key already used by this agent, the earlier row is answered
-- instead (created = false) so the caller can compare request hashes: mq_user_context answers a
-- replay before planning, and a request that raced past it with the same key meets the insert's
-- ON CONFLICT. With a topic, the agent's older queued messages to this user on that topic are
-- superseded by this one, in the same transaction.
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
    p_now timestamptz,
    p_topic_key text default null,
    p_parts jsonb default null)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
    v_superseded uuid[];
begin
    -- No user lock: superseding older rows takes their row locks, which a claim in progress holds
    -- until it commits (a row being claimed is then no longer queued and is left alone).
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
        reason, topic_key, part_count, created_at, updated_at)
    values (
        p_user_id, p_agent_id, p_message_data, p_final_message, p_scheduled_for, p_priority, p_can_delay,
        p_requires_fresh_context, p_conversation_id, p_idempotency_key, p_request_hash, p_expires_at,
        p_reason, p_topic_key, coalesce(jsonb_array_length(p_parts), 0), p_now, p_now)
    on conflict (agent_id, idempotency_key) where idempotency_key is not null do nothing
    returning * into v_row;
    if not found then
        -- The key is taken (a retry, or a concurrent request that won the race): answer its row.
        select * into v_row from message_queue
        where agent_id = p_agent_id and idempotency_key = p_idempotency_key;
        return jsonb_build_object('created', false, 'message', mq_message_doc(v_row));
    end if;
    if p_parts is not null then
        perform mq_insert_parts(v_row.id, p_parts);
    end if;
    if p_topic_key is not null then
        with older as (
            update message_queue set
                status = 'superseded',
                superseded_by_message_id = v_row.id,
                superseded_reason = 'replaced by a newer message on topic ' || left(p_topic_key, 80),
                reason = 'superseded',
                updated_at = p_now
            where user_id = p_user_id and agent_id = p_agent_id and topic_key = p_topic_key
              and status = 'queued' and id <> v_row.id
            returning id)
        select coalesce(array_agg(id), '{}') into v_superseded from older;
        if cardinality(v_superseded) > 0 then
            perform mq_emit('events', 'message.superseded',
                jsonb_build_object('messageId', s, 'userId', p_user_id, 'agentId', p_agent_id,
                                   'supersededBy', v_row.id, 'reason', 'topic', 'topicKey', p_topic_key,
                                   'at', p_now),
                jsonb_build_object('userId', p_user_id::text, 'agentId', p_agent_id), p_now)
            from unnest(v_superseded) s;
            perform mq_log_action('superseded', p_user_id, s, null,
                jsonb_build_object('supersededBy', v_row.id, 'reason', 'topic', 'topicKey', p_topic_key),
                null, p_now)
            from unnest(v_superseded) s;
        end if;
    end if;
    perform mq_log_action('scheduled', p_user_id, v_row.id,
        jsonb_build_object('agentId', p_agent_id, 'priority', p_priority, 'canDelay', p_can_delay,
                           'parts', v_row.part_count, 'topicKey', p_topic_key),
        jsonb_build_object('scheduledFor', p_scheduled_for, 'reason', p_reason,
                           'superseded', to_jsonb(coalesce(v_superseded, '{}'))), null, p_now);
    return jsonb_build_object('created', true, 'message', mq_message_doc(v_row),
                              'superseded', to_jsonb(coalesce(v_superseded, '{}')));
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

-- An agent withdraws a message it scheduled. Only a queued message can be withdrawn: one being
-- sent may already be at Twilio, and a final one is final. Cancelling twice answers the same.
create or replace function mq_cancel(p_message_id uuid, p_agent_id text, p_reason text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
begin
    select * into v_row from message_queue where id = p_message_id;
    if not found then
        return jsonb_build_object('cancelled', false, 'error', 'not_found');
    end if;
    if p_agent_id is not null and v_row.agent_id <> p_agent_id then
        return jsonb_build_object('cancelled', false, 'error', 'not_owner', 'status', v_row.status);
    end if;
    -- The user's lock first, as everywhere: a claim in progress finishes before this looks.
    perform 1 from users where id = v_row.user_id for no key update;
    select * into v_row from message_queue where id = p_message_id for update;
    if v_row.status = 'cancelled' then
        return jsonb_build_object('cancelled', true, 'already', true, 'message', mq_message_doc(v_row));
    end if;
    if v_row.status <> 'queued' then
        return jsonb_build_object('cancelled', false, 'error', 'not_queued', 'status', v_row.status,
                                  'message', mq_message_doc(v_row));
    end if;
    update message_queue set status = 'cancelled', reason = 'cancelled', last_error = p_reason,
                             updated_at = p_now
    where id = p_message_id
    returning * into v_row;
    perform mq_emit('events', 'message.cancelled',
        jsonb_build_object('messageId', p_message_id, 'userId', v_row.user_id, 'agentId', v_row.agent_id,
                           'reason', coalesce(p_reason, 'cancelled by the agent'), 'at', p_now),
        jsonb_build_object('userId', v_row.user_id::text, 'agentId', v_row.agent_id), p_now);
    perform mq_log_action('cancelled', v_row.user_id, p_message_id, jsonb_build_object('agentId', p_agent_id),
        jsonb_build_object('reason', p_reason), null, p_now);
    return jsonb_build_object('cancelled', true, 'already', false, 'message', mq_message_doc(v_row));
end;
$$;

-- The earliest instant after which a rolling window of p_window ending then holds fewer than p_cap
-- sends of the account (the caller found it full at p_now).
create or replace function mq_account_window_free_at(p_now timestamptz, p_window interval, p_cap integer)
returns timestamptz
language sql stable as $$
    select coalesce(max(s.slot_at), p_now) + p_window
    from (select slot_at from message_queue
          where status in ('sending', 'sent') and slot_at > p_now - p_window and slot_at <= p_now
          order by slot_at
          limit greatest(
              (select count(*) from message_queue
               where status in ('sending', 'sent') and slot_at > p_now - p_window and slot_at <= p_now)
              - p_cap + 1, 1)) s;
$$;

-- Claim a queued message for sending. Under the user's row lock it re-counts everything that was
-- sent or is being sent, so two deliveries racing for one user can never both pass a limit; the
-- claim itself (slot_at = p_now) counts as a send for every limit from here on. The user's limits
-- are counted in one statement; the checks and their reasons come in a fixed order.
--
-- p_account: the account-wide caps, {"per_second": n, "hourly": n, "daily": n} (each optional; null
-- or {} for none), counted over rolling windows of every send of the account under one advisory
-- lock. When a cap is reached the answer carries retry_at, the earliest instant it can allow, spread
-- by the number of due messages ahead of this one, so a burst (08:00 when quiet hours end) drains
-- at the configured rate; while the account is throttled, a more important due message goes first.
create or replace function mq_claim(
    p_message_id uuid,
    p_generation integer,
    p_now timestamptz,
    p_lease_seconds integer,
    p_cooldown_seconds integer,
    p_hourly_limit integer,
    p_daily_cap integer,
    p_day_start timestamptz,
    p_day_end timestamptz,
    p_weekly_cap integer default null,
    p_week_start timestamptz default null,
    p_week_end timestamptz default null,
    p_account jsonb default null)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
    v_blocked timestamptz;
    v_enabled boolean;
    v_row message_queue;
    v_token uuid;
    v_in_flight boolean;
    v_cooling boolean;
    v_hour integer;
    v_day integer;
    v_week integer;
    v_count integer;
    v_rank integer;
    v_ahead integer;
    v_higher integer;
    v_per_second integer;
    v_hourly integer;
    v_daily integer;
    v_retry timestamptz;
begin
    -- Lock order everywhere: the user row, then the message rows. NO KEY UPDATE, not UPDATE: it
    -- still serialises claims per user, but does not block the KEY SHARE locks that foreign-key
    -- checks take (mq_record_sent holds the message row and inserts rows referencing the user).
    select u.id, coalesce(u.opted_out_at, u.undeliverable_at), u.notifications_enabled
    into v_user_id, v_blocked, v_enabled
    from message_queue q join users u on u.id = q.user_id
    where q.id = p_message_id
    for no key update of u;
    if not found then
        return jsonb_build_object('claimed', false, 'reason', 'not_found');
    end if;
    select * into v_row from message_queue where id = p_message_id for update;
    if v_row.status <> 'queued' then
        return jsonb_build_object('claimed', false, 'reason', 'not_queued', 'status', v_row.status);
    end if;
    if v_row.task_generation <> p_generation then
        return jsonb_build_object('claimed', false, 'reason', 'stale_task', 'status', v_row.status);
    end if;
    if v_blocked is not null then
        -- Opted out (STOP) or undeliverable (Twilio 30005/30006/21610/21614): never send.
        return jsonb_build_object('claimed', false, 'reason', 'opted_out', 'status', v_row.status);
    end if;
    if not v_enabled and v_row.priority <> 'urgent' then
        return jsonb_build_object('claimed', false, 'reason', 'notifications_disabled', 'status', v_row.status);
    end if;
    if v_row.expires_at is not null and v_row.expires_at <= p_now then
        return jsonb_build_object('claimed', false, 'reason', 'expired', 'status', v_row.status);
    end if;
    -- The user's limits in one pass over their slots, from the earliest window's start to the
    -- latest's end; each count keeps its own window. The in-flight check looks at every 'sending'
    -- row, however old: one whose lease ran out may still have reached Twilio, and until it is
    -- reconciled (the sweep, within a minute or two) nothing else goes out, so reconciliation never
    -- has to tell two in-doubt messages with the same text apart.
    select
        exists (select 1 from message_queue
                where user_id = v_user_id and status = 'sending' and id <> p_message_id),
        coalesce(bool_or(slot_at > p_now - make_interval(secs => p_cooldown_seconds) and slot_at <= p_now), false),
        count(*) filter (where slot_at > p_now - interval '1 hour' and slot_at <= p_now),
        count(*) filter (where slot_at >= p_day_start and slot_at < p_day_end),
        count(*) filter (where slot_at >= p_week_start and slot_at < p_week_end)
    into v_in_flight, v_cooling, v_hour, v_day, v_week
    from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at >= least(p_now - make_interval(secs => greatest(p_cooldown_seconds, 3600)),
                           p_day_start, coalesce(p_week_start, p_day_start))
      and slot_at <= greatest(p_now, p_day_end, coalesce(p_week_end, p_day_end));
    if v_in_flight then
        return jsonb_build_object('claimed', false, 'reason', 'in_flight', 'status', v_row.status);
    end if;
    if v_cooling then
        return jsonb_build_object('claimed', false, 'reason', 'cooldown', 'status', v_row.status);
    end if;
    if v_hour >= p_hourly_limit then
        return jsonb_build_object('claimed', false, 'reason', 'hourly_limit', 'status', v_row.status);
    end if;
    if v_day >= p_daily_cap then
        return jsonb_build_object('claimed', false, 'reason', 'daily_limit', 'status', v_row.status);
    end if;
    if p_weekly_cap is not null and v_week >= p_weekly_cap then
        return jsonb_build_object('claimed', false, 'reason', 'weekly_limit', 'status', v_row.status);
    end if;
    if p_account is not null then
        v_per_second := nullif(p_account ->> 'per_second', '')::integer;
        v_hourly := nullif(p_account ->> 'hourly', '')::integer;
        v_daily := nullif(p_account ->> 'daily', '')::integer;
    end if;
    if v_per_second is not null or v_hourly is not null or v_daily is not null then
        -- One account: its counts are only true while no other claim is counting.
        perform pg_advisory_xact_lock(727347002);
        v_rank := array_position(array['urgent', 'high', 'medium', 'low'], v_row.priority::text);
        if v_daily is not null then
            select count(*) into v_count from message_queue
            where status in ('sending', 'sent') and slot_at > p_now - interval '1 day' and slot_at <= p_now;
            if v_count >= v_daily then
                return jsonb_build_object('claimed', false, 'reason', 'account_daily_limit', 'status', v_row.status,
                    'retry_at', mq_account_window_free_at(p_now, interval '1 day', v_daily));
            end if;
        end if;
        if v_hourly is not null then
            select count(*) into v_count from message_queue
            where status in ('sending', 'sent') and slot_at > p_now - interval '1 hour' and slot_at <= p_now;
            if v_count >= v_hourly then
                return jsonb_build_object('claimed', false, 'reason', 'account_hourly_limit', 'status', v_row.status,
                    'retry_at', mq_account_window_free_at(p_now, interval '1 hour', v_hourly));
            end if;
        end if;
        if v_per_second is not null then
            -- Due messages ahead of this one: more important, or as important and due earlier. Capped:
            -- beyond a few thousand the spread is only an estimate anyway.
            select count(*) into v_ahead from (
                select 1 from message_queue q
                where q.status = 'queued' and q.scheduled_for <= p_now and q.id <> p_message_id
                  and q.scheduled_for > p_now - interval '10 minutes'
                  and (array_position(array['urgent', 'high', 'medium', 'low'], q.priority::text) < v_rank
                       or (q.priority = v_row.priority
                           and (q.scheduled_for, q.created_at, q.id)
                               < (v_row.scheduled_for, v_row.created_at, v_row.id)))
                limit 10000) a;
            select count(*) into v_count from message_queue
            where status in ('sending', 'sent') and slot_at > p_now - interval '1 second' and slot_at <= p_now;
            -- While the account's throughput is contended, more important due messages take the
            -- remaining slots first (only then: a due message that is itself held up elsewhere must
            -- not hold back a quiet account).
            select count(*) into v_higher from (
                select 1 from message_queue q
                where q.status = 'queued' and q.scheduled_for <= p_now
                  and q.scheduled_for > p_now - interval '10 minutes'
                  and q.priority = any ((array['urgent', 'high', 'medium', 'low'])[1:v_rank - 1])
                limit v_per_second) h;
            if v_higher > 0 and v_count + v_higher >= v_per_second then
                return jsonb_build_object('claimed', false, 'reason', 'account_priority', 'status', v_row.status,
                    'retry_at', p_now + make_interval(secs => greatest(1, ceil(v_ahead::numeric / v_per_second))));
            end if;
            if v_count >= v_per_second then
                v_retry := mq_account_window_free_at(p_now, interval '1 second', v_per_second)
                           + make_interval(secs => floor(v_ahead::numeric / v_per_second));
                return jsonb_build_object('claimed', false, 'reason', 'account_throughput', 'status', v_row.status,
                    'retry_at', v_retry);
            end if;
        end if;
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

-- The conversation an outbound message belongs to: its own, else the user's active one (created
-- if there is none).
create or replace function mq_conversation_of(p_row message_queue, p_now timestamptz)
returns uuid
language plpgsql as $$
declare
    v_conversation uuid := p_row.conversation_context_id;
begin
    if v_conversation is null then
        select id into v_conversation from conversations
        where user_id = p_row.user_id and status = 'active'
        order by created_at desc limit 1;
        if not found then
            insert into conversations (user_id, status, created_at, updated_at)
            values (p_row.user_id, 'active', p_now, p_now)
            returning id into v_conversation;
        end if;
    end if;
    return v_conversation;
end;
$$;

-- One part of a claimed sequence went out: recorded at once (its outbound messages row too), so it
-- is never sent again. Idempotent per (message, position); a sid another row owns is refused.
create or replace function mq_record_part(
    p_message_id uuid, p_token uuid, p_position integer, p_sid text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
    v_part message_parts;
    v_conversation uuid;
    v_message_id uuid;
begin
    select * into v_row from message_queue where id = p_message_id for update;
    if not found or v_row.status <> 'sending' then
        return jsonb_build_object('recorded', false, 'reason', 'not_sending', 'status', v_row.status);
    end if;
    select * into v_part from message_parts where message_id = p_message_id and position = p_position for update;
    if not found then
        return jsonb_build_object('recorded', false, 'reason', 'no_such_part');
    end if;
    if v_part.status = 'sent' then
        return jsonb_build_object('recorded', v_part.twilio_message_sid = p_sid, 'reason', 'already_sent');
    end if;
    perform 1 from messages where twilio_message_sid = p_sid;
    if found then
        return jsonb_build_object('recorded', false, 'reason', 'sid_taken');
    end if;
    v_conversation := mq_conversation_of(v_row, p_now);
    if v_row.conversation_context_id is null then
        update message_queue set conversation_context_id = v_conversation where id = p_message_id;
    end if;
    insert into messages (conversation_id, user_id, direction, content, status, twilio_message_sid,
                          message_queue_id, sent_at, created_at)
    values (v_conversation, v_row.user_id, 'outbound', v_part.content, 'sent', p_sid, v_row.id, p_now, p_now)
    returning id into v_message_id;
    update conversations set last_message_at = p_now, updated_at = p_now where id = v_conversation;
    update message_parts set status = 'sent', twilio_message_sid = p_sid, sent_at = p_now,
                             delivered_message_id = v_message_id
    where message_id = p_message_id and position = p_position;
    perform mq_log_action('part_sent', v_row.user_id, p_message_id, null,
        jsonb_build_object('position', p_position, 'twilioMessageSid', p_sid,
                           'tokenMatched', v_row.claim_token is not distinct from p_token), null, p_now);
    return jsonb_build_object('recorded', true);
end;
$$;

-- Twilio accepted the message (for a sequence: its last part): mark it sent, write the outbound
-- history row (a sequence's parts have theirs already) and count the budget once, in one transaction.
-- It records whatever claim is current: once Twilio has the message, the send happened, and losing
-- that fact would be worse than any race on the claim token.
create or replace function mq_record_sent(
    p_message_id uuid, p_token uuid, p_sid text, p_body text, p_now timestamptz, p_local_date date,
    p_reconciled boolean default false)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
    v_conversation uuid;
    v_message_id uuid;
    v_sid text := p_sid;
begin
    -- This commit need not wait for the WAL flush: if a database crash lost it, the row is still
    -- 'sending' from its claim (which was flushed), so the sweep reconciles it with Twilio and
    -- records it again. The claim itself is never asynchronous: a lost claim could let a retried
    -- task send twice.
    perform set_config('synchronous_commit', 'off', true);
    select * into v_row from message_queue where id = p_message_id for update;
    if not found or v_row.status not in ('sending', 'queued') then
        return jsonb_build_object('recorded', false, 'status', v_row.status);
    end if;
    if v_row.part_count > 0 then
        perform 1 from message_parts where message_id = p_message_id and status <> 'sent';
        if found then
            return jsonb_build_object('recorded', false, 'reason', 'parts_pending', 'status', v_row.status);
        end if;
        select twilio_message_sid, delivered_message_id into v_sid, v_message_id from message_parts
        where message_id = p_message_id order by position desc limit 1;
        v_conversation := v_row.conversation_context_id;
    else
        -- A sid is one send: if another message owns it, this is not that message's send (reconciling
        -- matches Twilio's records by recipient and text, which two messages can share).
        perform 1 from messages
        where twilio_message_sid = p_sid and message_queue_id is distinct from p_message_id;
        if found then
            return jsonb_build_object('recorded', false, 'reason', 'sid_taken', 'status', v_row.status);
        end if;
        v_conversation := mq_conversation_of(v_row, p_now);
        insert into messages (conversation_id, user_id, direction, content, status, twilio_message_sid,
                              message_queue_id, sent_at, created_at)
        values (v_conversation, v_row.user_id, 'outbound', p_body, 'sent', p_sid, v_row.id, p_now, p_now)
        on conflict (twilio_message_sid) do update set message_queue_id = excluded.message_queue_id
        returning id into v_message_id;
        update conversations set last_message_at = p_now, updated_at = p_now where id = v_conversation;
    end if;
    update message_queue set
        status = 'sent',
        sent_at = p_now,
        slot_at = greatest(coalesce(slot_at, p_now), p_now),
        twilio_message_sid = v_sid,
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
    perform mq_emit('events', 'message.sent',
        jsonb_build_object('messageId', p_message_id, 'userId', v_row.user_id, 'agentId', v_row.agent_id,
                           'twilioMessageSid', v_sid, 'sentAt', p_now, 'parts', v_row.part_count),
        jsonb_build_object('userId', v_row.user_id::text, 'agentId', v_row.agent_id), p_now);
    perform mq_log_action(case when p_reconciled then 'reconciled' else 'sent' end, v_row.user_id, p_message_id,
        null, jsonb_build_object('outcome', 'sent', 'twilioMessageSid', v_sid, 'attempts', v_row.attempts,
                                 'parts', v_row.part_count,
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
