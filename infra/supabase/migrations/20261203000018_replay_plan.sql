-- A replay answers the original (issue 18): an idempotent retry of a schedule request answered the
-- stored message, but with `blockedBy: []` and `superseded: []`, where the first answer said e.g.
-- ["cooldown"] and the ids it replaced: the plan and the superseding happen once, at enqueue, and
-- neither was stored. Both are now columns of the message, written by mq_enqueue, so every read of
-- the row (the replay in mq_user_context, the race's replay here) answers them:
-- * blocked_by: the plan's rules met on the way, in order (p_blocked_by; null from the previous
--   release, which does not pass it, and on rows written before this migration: answered as []);
-- * superseded_ids: the queued messages this one superseded on its topic (null when none, so the
--   common insert writes nothing more).
-- The scheduled entry of the decision log records blockedBy too. Nullable columns without a
-- default: adding them rewrites nothing.
--
-- mq_enqueue gains a parameter: the old signature is dropped first (PostgREST cannot choose
-- between overloads); the previous release's calls, without it, still resolve.

alter table message_queue
    add column blocked_by text[],
    add column superseded_ids uuid[];

drop function if exists mq_enqueue(uuid, text, jsonb, text, timestamptz, text, boolean, boolean, uuid, text,
                                   text, timestamptz, text, timestamptz, text, jsonb, integer, integer, boolean,
                                   text, integer);

-- Insert a queued message (see 20261203000013 and before), now with the plan's blockedBy and the
-- ids it superseded.
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
    p_transactional boolean default false,
    p_encoding text default null,
    p_segments integer default null,
    p_blocked_by text[] default null)
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
        reason, topic_key, part_count, transactional, encoding, segments, blocked_by, created_at, updated_at)
    values (
        p_user_id, p_agent_id, p_message_data, p_final_message, p_scheduled_for, p_priority, p_can_delay,
        p_requires_fresh_context, p_conversation_id, p_idempotency_key, p_request_hash, p_expires_at,
        p_reason, p_topic_key, coalesce(jsonb_array_length(p_parts), 0), coalesce(p_transactional, false),
        case when p_parts is null then p_encoding end, case when p_parts is null then p_segments end,
        p_blocked_by, p_now, p_now)
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
        v_row := mq_sequence_segments(v_row.id);
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
            update message_queue set superseded_ids = v_superseded where id = v_row.id
            returning * into v_row;
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
                           'parts', v_row.part_count, 'topicKey', p_topic_key,
                           'encoding', v_row.encoding, 'segments', v_row.segments),
        jsonb_build_object('scheduledFor', p_scheduled_for, 'reason', p_reason,
                           'blockedBy', to_jsonb(coalesce(p_blocked_by, '{}')),
                           'superseded', to_jsonb(coalesce(v_superseded, '{}'))), null, p_now);
    return jsonb_build_object('created', true, 'message', mq_message_doc(v_row),
                              'superseded', to_jsonb(coalesce(v_superseded, '{}')));
end;
$$;

call close_public_api();
