-- Admission limits (issue 14): no agent may flood a user or the shared queue.
--
-- * A user has at most p_user_queue_limit messages queued at once (USER_QUEUE_LIMIT). A message
--   that supersedes the agent's queued ones on its topic replaces them, so those do not count.
-- * An agent stores at most p_agent_rate_per_minute messages in any 60 s (AGENT_RATE_PER_MINUTE);
--   the refusal says when the oldest of them leaves the window (retryAt). Concurrent requests of one
--   agent for different users are not serialised, so the rate may be passed by the number of
--   requests in flight at the same instant; the per-user limit is exact.
-- * The planner sees every queued reservation of the user (no LIMIT 500 any more): a message planned
--   beside a long queue gets its own slot instead of the instant after the 500th.
--
-- mq_user_context checks the limits before anything is planned or rendered (a refused request
-- costs no model call); mq_enqueue checks them again under a per-user lock, so two concurrent
-- requests cannot both take the last place. Both keep every parameter they had, with the new ones
-- defaulting to null (no limit), so the previous release's calls keep working; the old signatures
-- are dropped because PostgREST cannot choose between overloads.

-- An agent's recent messages by creation time, for its rate.
create index if not exists message_queue_agent_created on message_queue (agent_id, created_at);

-- Why this agent may not add a message for this user now, or null: {error: 'user_queue_full',
-- queued, limit} or {error: 'agent_rate_limited', limit, retryAt, retryAfterSeconds}. A null limit is no limit.
create or replace function mq_admission(
    p_user_id uuid, p_agent_id text, p_topic_key text, p_now timestamptz,
    p_user_queue_limit integer, p_agent_rate_per_minute integer)
returns jsonb
language plpgsql stable as $$
declare
    v_queued integer;
    v_recent integer;
    v_oldest timestamptz;
begin
    if p_user_queue_limit is not null then
        select count(*) into v_queued from message_queue q
        where q.user_id = p_user_id and q.status = 'queued'
          -- coalesce: a row without a topic (null = anything is null) is counted
          and not coalesce(q.topic_key = p_topic_key and q.agent_id = p_agent_id, false);
        if v_queued >= p_user_queue_limit then
            return jsonb_build_object('error', 'user_queue_full', 'queued', v_queued,
                                      'limit', p_user_queue_limit);
        end if;
    end if;
    if p_agent_rate_per_minute is not null and p_agent_id is not null then
        select count(*), min(r.created_at) into v_recent, v_oldest
        from (select q.created_at from message_queue q
              where q.agent_id = p_agent_id and q.created_at > p_now - interval '1 minute'
                and q.created_at <= p_now
              order by q.created_at limit p_agent_rate_per_minute) r;
        if v_recent >= p_agent_rate_per_minute then
            return jsonb_build_object('error', 'agent_rate_limited', 'limit', p_agent_rate_per_minute,
                                      'retryAt', v_oldest + interval '1 minute',
                                      'retryAfterSeconds', greatest(1, ceil(extract(epoch from
                                          v_oldest + interval '1 minute' - p_now))::integer));
        end if;
    end if;
    return null;
end;
$$;

drop function if exists mq_user_context(uuid, timestamptz, uuid, text, text);
drop function if exists mq_enqueue(uuid, text, jsonb, text, timestamptz, text, boolean, boolean, uuid, text,
                                   text, timestamptz, text, timestamptz, text, jsonb);

-- What the policy needs to know about a user (see 20261203000002): now with the admission check
-- ('refused' instead of the history) and every queued reservation.
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
          order by q.scheduled_for) r;
    select max(m.created_at) into v_last_inbound from messages m
    where m.user_id = p_user_id and m.direction = 'inbound' and m.created_at <= p_now;
    return jsonb_build_object('user', to_jsonb(v_user), 'sends', v_sends, 'reservations', v_reservations,
                              'last_inbound_at', v_last_inbound);
end;
$$;

-- Insert a queued message (see 20261203000003), now within the admission limits: a refusal is
-- {error: 'refused', refused: {...}} and stores nothing.
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
    p_agent_rate_per_minute integer default null)
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
