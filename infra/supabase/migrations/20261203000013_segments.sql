-- SMS segments (issue 15): every message and every part of a sequence records the encoding its
-- text goes out in (GSM-7 or UCS-2) and the number of SMS segments it is sent and billed as. The
-- application counts them (shared/segments.py, with the gsm0338 codec: the database has no GSM
-- 03.38 codec) and passes them with the text wherever a text is stored: mq_enqueue,
-- mq_record_render, mq_record_part_render. A sequence's own columns hold its parts' total
-- (mq_sequence_segments), so the account caps can count segments from one row.
--
-- Null means "not counted": a structured text not rendered yet, or a text stored by the previous
-- release (its calls leave out the new parameters, which default to null, and a render it records
-- sets the count to null rather than leave the old text's). Rows written before this migration
-- keep null; nothing backfills them (it would need the codec). The new columns are nullable
-- without a default, so adding them rewrites nothing.
--
-- Functions that gained parameters are dropped first: PostgREST cannot choose between overloads.

alter table message_queue
    add column encoding text constraint message_queue_encoding check (encoding in ('GSM-7', 'UCS-2')),
    add column segments integer constraint message_queue_segments check (segments >= 1),
    add constraint message_queue_segments_counted check ((encoding is null) = (segments is null));

alter table message_parts
    add column encoding text constraint message_parts_encoding check (encoding in ('GSM-7', 'UCS-2')),
    add column segments integer constraint message_parts_segments check (segments >= 1),
    add constraint message_parts_segments_counted check ((encoding is null) = (segments is null));

-- A message as the application reads it (see 20261203000002): each part now with its encoding and
-- segments (the row's own columns are in to_jsonb already).
create or replace function mq_message_doc(p_row message_queue)
returns jsonb
language plpgsql stable as $$
begin
    if p_row.part_count = 0 then
        return to_jsonb(p_row);
    end if;
    return to_jsonb(p_row) || jsonb_build_object(
        'parts', (select coalesce(jsonb_agg(jsonb_build_object(
                      'position', p.position, 'content', p.content, 'delay_seconds', p.delay_seconds,
                      'status', p.status, 'twilio_message_sid', p.twilio_message_sid, 'sent_at', p.sent_at,
                      'data', p.part_data, 'encoding', p.encoding, 'segments', p.segments)
                      order by p.position), '[]'::jsonb)
                  from message_parts p where p.message_id = p_row.id));
end;
$$;

-- A sequence's parts, in order: p_parts = [{content, delay_seconds, data?, encoding?, segments?}, ...].
create or replace function mq_insert_parts(p_message_id uuid, p_parts jsonb)
returns void
language sql as $$
    insert into message_parts (message_id, position, content, delay_seconds, part_data, encoding, segments)
    select p_message_id, e.ord::integer, coalesce(e.part ->> 'content', ''),
           coalesce((e.part ->> 'delay_seconds')::integer, 1), e.part -> 'data',
           e.part ->> 'encoding', (e.part ->> 'segments')::integer
    from jsonb_array_elements(p_parts) with ordinality as e(part, ord);
$$;

-- A sequence's encoding and segments from its parts: the segments summed, UCS-2 if any part is;
-- null until every part is counted. Answers the updated row.
create or replace function mq_sequence_segments(p_message_id uuid)
returns message_queue
language sql as $$
    update message_queue q set (encoding, segments) = (
        select case when count(*) = count(p.segments)
                    then case when bool_or(p.encoding = 'UCS-2') then 'UCS-2' else 'GSM-7' end end,
               case when count(*) = count(p.segments) then sum(p.segments)::integer end
        from message_parts p where p.message_id = p_message_id)
    where q.id = p_message_id and q.part_count > 0
    returning q.*;
$$;

drop function if exists mq_enqueue(uuid, text, jsonb, text, timestamptz, text, boolean, boolean, uuid, text,
                                   text, timestamptz, text, timestamptz, text, jsonb, integer, integer);
drop function if exists mq_record_render(uuid, text, jsonb, timestamptz);
drop function if exists mq_record_part_render(uuid, integer, text, jsonb, timestamptz);

-- Insert a queued message (see 20261203000003 and 20261203000007), now with the SMS encoding and
-- segments of its text (p_encoding, p_segments: null while a structured text is unrendered, and
-- for a sequence, whose parts carry theirs and whose total is summed here).
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
    p_encoding text default null,
    p_segments integer default null)
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
        reason, topic_key, part_count, encoding, segments, created_at, updated_at)
    values (
        p_user_id, p_agent_id, p_message_data, p_final_message, p_scheduled_for, p_priority, p_can_delay,
        p_requires_fresh_context, p_conversation_id, p_idempotency_key, p_request_hash, p_expires_at,
        p_reason, p_topic_key, coalesce(jsonb_array_length(p_parts), 0),
        case when p_parts is null then p_encoding end, case when p_parts is null then p_segments end,
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
                           'superseded', to_jsonb(coalesce(v_superseded, '{}'))), null, p_now);
    return jsonb_build_object('created', true, 'message', mq_message_doc(v_row),
                              'superseded', to_jsonb(coalesce(v_superseded, '{}')));
end;
$$;


-- The rendered text of a queued message (see 20261203000006), with its encoding and segments.
create or replace function mq_record_render(
    p_message_id uuid, p_text text, p_usage jsonb, p_now timestamptz,
    p_encoding text default null, p_segments integer default null)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    update message_queue set final_message = p_text, encoding = p_encoding, segments = p_segments,
                             updated_at = p_now
    where id = p_message_id and status = 'queued'
    returning user_id into v_user_id;
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_log_model_call(v_user_id, p_message_id, 'rendered', p_usage,
        jsonb_build_object('length', char_length(p_text), 'encoding', p_encoding, 'segments', p_segments),
        null, p_now);
    return to_jsonb(true);
end;
$$;

-- The rendered text of one structured part of a queued sequence (see 20261203000006), with its
-- encoding and segments; the sequence's total follows.
create or replace function mq_record_part_render(
    p_message_id uuid, p_position integer, p_text text, p_usage jsonb, p_now timestamptz,
    p_encoding text default null, p_segments integer default null)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    select user_id into v_user_id from message_queue where id = p_message_id and status = 'queued' for update;
    if not found then
        return to_jsonb(false);
    end if;
    update message_parts set content = p_text, encoding = p_encoding, segments = p_segments
    where message_id = p_message_id and position = p_position and status = 'pending';
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_sequence_segments(p_message_id);
    perform mq_log_model_call(v_user_id, p_message_id, 'rendered', p_usage,
        jsonb_build_object('length', char_length(p_text), 'part', p_position, 'encoding', p_encoding,
                           'segments', p_segments), null, p_now);
    return to_jsonb(true);
end;
$$;

call close_public_api();
