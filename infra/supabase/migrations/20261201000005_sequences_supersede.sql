-- Sequences (one agent turn sent as 2 to 5 SMS parts), supersede by topic, and cancel. A part may
-- be structured too (like messageData without content): part_data holds its fields and content
-- is '' until a Renderer writes the text (mq_record_part_render); no part is sent without it.
--
-- A sequence is ONE message_queue row (the head): it is planned, claimed, counted toward every
-- limit and budget once, and finishes 'sent' when its last part went out. Its parts live in
-- message_parts and go out in position order; each part is recorded the moment Twilio accepts it,
-- so a part that went out is never sent again, whatever fails after it.

alter table message_queue add column if not exists topic_key text;
alter table message_queue add column if not exists part_count integer not null default 0
    constraint message_queue_part_count check (part_count = 0 or part_count between 2 and 5);

-- A newer message on the same topic replaces the agent's older queued ones (mq_enqueue).
create index if not exists message_queue_topic on message_queue (user_id, agent_id, topic_key)
    where status = 'queued' and topic_key is not null;

create table if not exists message_parts (
    message_id         uuid not null references message_queue (id) on delete cascade,
    position           integer not null constraint message_parts_position check (position between 1 and 5),
    content            text not null,
    delay_seconds      integer not null default 1
                       constraint message_parts_delay check (delay_seconds between 0 and 10),
    status             text not null default 'pending'
                       constraint message_parts_status check (status in ('pending', 'sent')),
    twilio_message_sid text,
    delivered_message_id uuid references messages (id),
    sent_at            timestamptz,
    part_data          jsonb,  -- a structured part's fields; content is '' until it is rendered
    primary key (message_id, position),
    constraint message_parts_sent_has_sid check (status <> 'sent' or twilio_message_sid is not null)
);

-- A message as the application reads it: the row, and for a sequence its parts in position order.
create or replace function mq_message_doc(p_row message_queue)
returns jsonb
language sql stable as $$
    select case when p_row.part_count = 0 then to_jsonb(p_row) else to_jsonb(p_row) || jsonb_build_object(
        'parts', (select coalesce(jsonb_agg(jsonb_build_object(
                      'position', p.position, 'content', p.content, 'delay_seconds', p.delay_seconds,
                      'status', p.status, 'twilio_message_sid', p.twilio_message_sid, 'sent_at', p.sent_at,
                      'data', p.part_data)
                      order by p.position), '[]'::jsonb)
                  from message_parts p where p.message_id = p_row.id)) end;
$$;

create or replace function mq_get(p_message_id uuid)
returns jsonb
language sql stable as $$
    select mq_message_doc(q) from message_queue q where q.id = p_message_id;
$$;

create or replace function mq_delivery_context(p_message_id uuid, p_now timestamptz)
returns jsonb
language sql stable as $$
    select jsonb_build_object('message', mq_message_doc(q), 'context', mq_user_context(q.user_id, p_now, q.id))
    from message_queue q where q.id = p_message_id;
$$;

-- The stale claims the sweep reconciles, with the parts of a sequence (which of them went out).
create or replace function mq_take_stale_claims(
    p_now timestamptz, p_lease_seconds integer, p_limit integer, p_message_id uuid default null)
returns jsonb
language sql as $$
    with picked as (
        select id from message_queue
        where status = 'sending' and lease_expires_at <= p_now
          and (p_message_id is null or id = p_message_id)
        order by lease_expires_at
        limit p_limit
        for update skip locked),
    taken as (
        update message_queue q set
            claim_token = gen_random_uuid(),
            lease_expires_at = p_now + make_interval(secs => p_lease_seconds),
            updated_at = p_now
        from picked where q.id = picked.id
        returning q.*)
    select coalesce(jsonb_agg(jsonb_build_object(
        'message', mq_message_doc(t::message_queue),
        'phone_number', u.phone_number,
        'timezone', u.timezone)), '[]'::jsonb)
    from taken t join users u on u.id = t.user_id;
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

-- mq_enqueue gains the topic and the parts; the old signature goes, so PostgREST sees one function.
drop function if exists mq_enqueue(uuid, text, jsonb, text, timestamptz, text, boolean, boolean, uuid, text,
                                   text, timestamptz, text, timestamptz);

-- Insert a queued message (with its parts, p_parts = [{content, delay_seconds}, ...] in order, or
-- null). With an idempotency key already used by this agent, return the earlier row instead
-- (created = false). With a topic, the agent's older queued messages to this user on that topic
-- are superseded by this one, in the same transaction.
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
    if p_idempotency_key is not null then
        select * into v_row from message_queue
        where agent_id = p_agent_id and idempotency_key = p_idempotency_key;
        if found then
            return jsonb_build_object('created', false, 'message', mq_message_doc(v_row));
        end if;
    end if;
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
        -- A concurrent request with the same key won the race: answer with its row.
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
    -- This commit need not wait for the WAL flush (bench: the claim path 1.1x): if a database crash
    -- lost it, the row is still 'sending' from its claim (which was flushed), so the sweep
    -- reconciles it with Twilio and records it again. The claim itself is never asynchronous: a
    -- lost claim could let a retried task send twice.
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

-- The rendered text of one structured part of a queued sequence (logged with the call's usage).
create or replace function mq_record_part_render(
    p_message_id uuid, p_position integer, p_text text, p_usage jsonb, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    select user_id into v_user_id from message_queue where id = p_message_id and status = 'queued' for update;
    if not found then
        return to_jsonb(false);
    end if;
    update message_parts set content = p_text
    where message_id = p_message_id and position = p_position and status = 'pending';
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_log_model_call(v_user_id, p_message_id, 'rendered', p_usage,
        jsonb_build_object('length', char_length(p_text), 'part', p_position), null, p_now);
    return to_jsonb(true);
end;
$$;
