-- Compliance (issue 15): where a user is, and messages the law lets through.
--
-- * users.timezone_source: `user` (set by them or an operator), `phone_number` (derived from the
--   number by shared/compliance.py, which stores it with mq_set_timezone) or `default` (not known:
--   the column's 'UTC' placeholder, which the policy never uses as it is; it plans in every zone of
--   the number, the most restrictive window). A user created by an inbound SMS starts `default`.
--   Existing users keep `user`, except those still on the 'UTC' placeholder, which an inbound SMS
--   created: they become `default`, so their number decides.
-- * message_queue.transactional: the agent marked the message transactional; if the agent is
--   allowed to (URGENT_AGENTS), the legal calling hours do not hold it back.
-- * mq_user_context answers the topic's recent sends and queued messages (topic_sends,
--   topic_reservations), for the states that limit messages per topic, and leaves out of the
--   reservations the asking agent's queued messages on the topic (the new one supersedes them: it
--   takes their place, not the slot after them); mq_delivery_context passes the message's topic.
-- mq_upsert_user takes a null p_timezone to mean "not known" (same parameters as before), and
-- mq_enqueue takes p_transactional (default false, so the previous release's calls keep working).

alter table users add column if not exists timezone_source text not null default 'default'
    constraint users_timezone_source check (timezone_source in ('user', 'phone_number', 'default'));
update users set timezone_source = case when timezone = 'UTC' then 'default' else 'user' end;

alter table message_queue add column if not exists transactional boolean not null default false;

-- A user's timezone as derived from their number (or set by an operator): p_source is
-- 'phone_number' or 'user'. With p_only_if_unknown, only a user whose timezone is not known yet
-- (`default`) is changed: an inbound SMS stores what the number says without a read first.
-- Answers whether a row changed.
create or replace function mq_set_timezone(
    p_user_id uuid, p_timezone text, p_source text, p_now timestamptz, p_only_if_unknown boolean default false)
returns boolean
language plpgsql as $$
begin
    update users set timezone = p_timezone, timezone_source = p_source, updated_at = p_now
    where id = p_user_id and (not p_only_if_unknown or timezone_source = 'default');
    return found;
end;
$$;

-- An operator's or the demo's way to add a user (see 20261203000002): a null p_timezone is "not
-- known" (timezone_source 'default').
create or replace function mq_upsert_user(
    p_phone_number text,
    p_timezone text,
    p_quiet_hours_start time default null,
    p_quiet_hours_end time default null,
    p_quiet_hours_enabled boolean default true,
    p_daily_limit integer default null,
    p_hourly_limit integer default null,
    p_poc_agent_type text default null,
    p_id uuid default null,
    p_notifications_enabled boolean default true,
    p_preferred_days integer[] default null,
    p_preferred_window_start time default null,
    p_preferred_window_end time default null,
    p_weekly_limit integer default null)
returns jsonb
language sql as $$
    insert into users (id, phone_number, timezone, timezone_source, quiet_hours_start, quiet_hours_end, quiet_hours_enabled,
                       daily_limit, hourly_limit, poc_agent_type, notifications_enabled, preferred_days,
                       preferred_window_start, preferred_window_end, weekly_limit)
    values (coalesce(p_id, gen_random_uuid()), p_phone_number, coalesce(p_timezone, 'UTC'),
            case when p_timezone is null then 'default' else 'user' end, p_quiet_hours_start,
            p_quiet_hours_end, p_quiet_hours_enabled, p_daily_limit, p_hourly_limit, p_poc_agent_type,
            p_notifications_enabled, p_preferred_days::smallint[], p_preferred_window_start, p_preferred_window_end,
            p_weekly_limit)
    on conflict (phone_number) do update set
        timezone = excluded.timezone,
        timezone_source = excluded.timezone_source,
        quiet_hours_start = excluded.quiet_hours_start,
        quiet_hours_end = excluded.quiet_hours_end,
        quiet_hours_enabled = excluded.quiet_hours_enabled,
        daily_limit = excluded.daily_limit,
        hourly_limit = excluded.hourly_limit,
        poc_agent_type = excluded.poc_agent_type,
        notifications_enabled = excluded.notifications_enabled,
        preferred_days = excluded.preferred_days,
        preferred_window_start = excluded.preferred_window_start,
        preferred_window_end = excluded.preferred_window_end,
        weekly_limit = excluded.weekly_limit,
        updated_at = now()
    returning to_jsonb(users.*);
$$;

drop function if exists mq_enqueue(uuid, text, jsonb, text, timestamptz, text, boolean, boolean, uuid, text,
                                   text, timestamptz, text, timestamptz, text, jsonb, integer, integer);

-- Insert a queued message (see 20261203000007), now with its transactional mark.
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
    p_parts jsonb default null,
    p_user_queue_limit integer default null,
    p_agent_rate_per_minute integer default null,
    p_transactional boolean default false)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
    v_superseded uuid[];
    v_refused jsonb;
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
    -- The admission limits, exact per user: one enqueue per user at a time counts the queue (a
    -- transaction-scoped advisory lock, not the user row's lock, so claims are not held up). A retry
    -- of a stored request is answered below, whatever the limits say now.
    perform pg_advisory_xact_lock(hashtextextended('mq_enqueue:' || p_user_id::text, 0));
    if p_idempotency_key is null or not exists (
        select 1 from message_queue where agent_id = p_agent_id and idempotency_key = p_idempotency_key)
    then
        v_refused := mq_admission(p_user_id, p_agent_id, p_topic_key, p_now, p_user_queue_limit,
                                  p_agent_rate_per_minute);
        if v_refused is not null then
            return jsonb_build_object('error', 'refused', 'refused', v_refused);
        end if;
    end if;
    insert into message_queue (
        user_id, agent_id, message_data, final_message, scheduled_for, priority, can_delay,
        requires_fresh_context, conversation_context_id, idempotency_key, request_hash, expires_at,
        reason, topic_key, part_count, transactional, created_at, updated_at)
    values (
        p_user_id, p_agent_id, p_message_data, p_final_message, p_scheduled_for, p_priority, p_can_delay,
        p_requires_fresh_context, p_conversation_id, p_idempotency_key, p_request_hash, p_expires_at,
        p_reason, p_topic_key, coalesce(jsonb_array_length(p_parts), 0), coalesce(p_transactional, false),
        p_now, p_now)
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

-- What the policy needs to know about a user (see 20261203000007), now with the message's topic:
-- the slot times of the user's messages on p_topic_key sent in the last 24 h and the scheduled
-- times of those queued (a state's limit of 3 per topic per 24 h). Same parameters as before.
create or replace function mq_user_context(
    p_user_id uuid, p_now timestamptz, p_exclude uuid default null,
    p_agent_id text default null, p_idempotency_key text default null,
    p_topic_key text default null, p_user_queue_limit integer default null,
    p_agent_rate_per_minute integer default null)
returns jsonb
language plpgsql stable as $$
declare
    v_user users;
    v_sends jsonb;
    v_reservations jsonb;
    v_last_inbound timestamptz;
    v_replay message_queue;
    v_refused jsonb;
    v_topic_sends jsonb := '[]'::jsonb;
    v_topic_reservations jsonb := '[]'::jsonb;
begin
    select * into v_user from users where id = p_user_id;
    if not found then
        return null;
    end if;
    if p_idempotency_key is not null then
        select * into v_replay from message_queue
        where agent_id = p_agent_id and idempotency_key = p_idempotency_key;
        if found then
            return jsonb_build_object('user', to_jsonb(v_user), 'replay', mq_message_doc(v_replay));
        end if;
    end if;
    v_refused := mq_admission(p_user_id, p_agent_id, p_topic_key, p_now, p_user_queue_limit,
                              p_agent_rate_per_minute);
    if v_refused is not null then
        return jsonb_build_object('user', to_jsonb(v_user), 'refused', v_refused);
    end if;
    select coalesce(jsonb_agg(q.slot_at order by q.slot_at), '[]'::jsonb) into v_sends
    from message_queue q
    where q.user_id = p_user_id and q.status in ('sending', 'sent')
      and q.slot_at > p_now - interval '8 days';
    select coalesce(jsonb_agg(jsonb_build_object('at', r.scheduled_for, 'priority', r.priority)
                              order by r.scheduled_for), '[]'::jsonb) into v_reservations
    from (select q.scheduled_for, q.priority from message_queue q
          where q.user_id = p_user_id and q.status = 'queued'
            and (p_exclude is null or q.id <> p_exclude)
            -- the agent's queued messages on the topic are superseded by the one being planned:
            -- it takes their place, not the slot after them
            and not coalesce(q.topic_key = p_topic_key and q.agent_id = p_agent_id, false)
          order by q.scheduled_for) r;
    if p_topic_key is not null then
        select coalesce(jsonb_agg(q.slot_at order by q.slot_at), '[]'::jsonb) into v_topic_sends
        from message_queue q
        where q.user_id = p_user_id and q.status in ('sending', 'sent') and q.topic_key = p_topic_key
          and q.slot_at > p_now - interval '24 hours';
        -- The asking agent's own queued messages on the topic are superseded by its new one.
        select coalesce(jsonb_agg(q.scheduled_for order by q.scheduled_for), '[]'::jsonb) into v_topic_reservations
        from message_queue q
        where q.user_id = p_user_id and q.status = 'queued' and q.topic_key = p_topic_key
          and (p_exclude is null or q.id <> p_exclude) and q.agent_id is distinct from p_agent_id;
    end if;
    select max(m.created_at) into v_last_inbound from messages m
    where m.user_id = p_user_id and m.direction = 'inbound' and m.created_at <= p_now;
    return jsonb_build_object('user', to_jsonb(v_user), 'sends', v_sends, 'reservations', v_reservations,
                              'last_inbound_at', v_last_inbound, 'topic_sends', v_topic_sends,
                              'topic_reservations', v_topic_reservations);
end;
$$;

-- A message and its user's context, for delivery (see 20261203000002), with the message's topic.
create or replace function mq_delivery_context(p_message_id uuid, p_now timestamptz)
returns jsonb
language plpgsql stable as $$
declare
    v_row message_queue;
begin
    select * into v_row from message_queue where id = p_message_id;
    if not found then
        return null;
    end if;
    return jsonb_build_object('message', mq_message_doc(v_row),
                              'context', mq_user_context(p_user_id => v_row.user_id, p_now => p_now,
                                                         p_exclude => v_row.id, p_topic_key => v_row.topic_key));
end;
$$;

call close_public_api();
