-- Conversations: Twilio's inbound and status webhooks, STOP/START opt-out, undeliverable numbers,
-- and the outbox of events for agents (Pub/Sub), so a Pub/Sub outage never loses or blocks a change.

-- An event for agents, in the transaction of the change it describes.
create or replace function mq_emit(
    p_topic text, p_event_type text, p_payload jsonb, p_attributes jsonb, p_now timestamptz)
returns void
language plpgsql as $$
begin
    insert into events_outbox (topic, event_type, payload, attributes, created_at)
    values (p_topic, p_event_type, p_payload,
            coalesce(p_attributes, '{}'::jsonb) || jsonb_build_object('eventType', p_event_type), p_now);
end;
$$;

-- An inbound SMS from a user, recorded without keyword handling (tests and the demo use it to make
-- a user "active"). Deduplicated by Twilio's MessageSid.
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

-- An inbound SMS (Twilio's webhook). p_keyword is what the application recognised in the body:
-- 'stop' (STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT), 'start' (START, UNSTOP, YES), 'help' or
-- null. Deduplicated by Twilio's MessageSid: a repeated webhook changes nothing and says so.
create or replace function mq_inbound(
    p_from text, p_body text, p_sid text, p_keyword text, p_num_media integer, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user users;
    v_conversation uuid;
    v_message uuid;
    v_cancelled integer := 0;
begin
    insert into users (phone_number, created_at, updated_at)
    values (p_from, p_now, p_now)
    on conflict (phone_number) do nothing;
    select * into v_user from users where phone_number = p_from for no key update;

    select id into v_conversation from conversations
    where user_id = v_user.id and status = 'active' order by created_at desc limit 1;
    if not found then
        insert into conversations (user_id, status, created_at, updated_at)
        values (v_user.id, 'active', p_now, p_now) returning id into v_conversation;
    end if;

    insert into messages (conversation_id, user_id, direction, content, status, twilio_message_sid, created_at)
    values (v_conversation, v_user.id, 'inbound', coalesce(p_body, ''), 'received', p_sid, p_now)
    on conflict (twilio_message_sid) do nothing
    returning id into v_message;
    if v_message is null then
        return jsonb_build_object('duplicate', true, 'userId', v_user.id, 'conversationId', v_conversation,
                                  'optedOut', v_user.opted_out_at is not null);
    end if;
    update conversations set last_message_at = p_now, updated_at = p_now where id = v_conversation;

    if p_keyword = 'stop' then
        update users set opted_out_at = coalesce(opted_out_at, p_now), updated_at = p_now where id = v_user.id;
        with cancelled as (
            update message_queue set status = 'cancelled', reason = 'opted_out', claim_token = null,
                                     lease_expires_at = null, updated_at = p_now
            where user_id = v_user.id and status = 'queued'
            returning id, agent_id),
        logged as (
            insert into agent_actions_log (agent_type, action_type, user_id, message_id, output_data, created_at)
            select 'message_orchestrator', 'cancelled', v_user.id, c.id,
                   jsonb_build_object('reason', 'opted_out'), p_now from cancelled c),
        emitted as (
            insert into events_outbox (topic, event_type, payload, attributes, created_at)
            select 'events', 'message.cancelled',
                   jsonb_build_object('messageId', c.id, 'userId', v_user.id, 'agentId', c.agent_id,
                                      'reason', 'opted_out', 'at', p_now),
                   jsonb_build_object('eventType', 'message.cancelled', 'userId', v_user.id::text,
                                      'agentId', c.agent_id), p_now
            from cancelled c)
        select count(*) into v_cancelled from cancelled;
        perform mq_log_action('opted_out', v_user.id, null, null,
                              jsonb_build_object('cancelled', v_cancelled), null, p_now);
    elsif p_keyword = 'start' then
        update users set opted_out_at = null, updated_at = p_now where id = v_user.id;
        perform mq_log_action('opted_in', v_user.id, null, null, null, null, p_now);
    end if;

    perform mq_emit('inbound', 'inbound_message',
        jsonb_build_object('messageId', v_message, 'userId', v_user.id, 'conversationId', v_conversation,
                           'from', p_from, 'body', coalesce(p_body, ''), 'numMedia', p_num_media,
                           'twilioMessageSid', p_sid, 'keyword', p_keyword, 'receivedAt', p_now),
        jsonb_build_object('userId', v_user.id::text, 'agentType', coalesce(v_user.poc_agent_type, '')),
        p_now);
    return jsonb_build_object(
        'duplicate', false, 'userId', v_user.id, 'conversationId', v_conversation, 'messageId', v_message,
        'keyword', p_keyword, 'cancelled', v_cancelled,
        'optedOut', case p_keyword when 'stop' then true when 'start' then false
                                   else v_user.opted_out_at is not null end);
end;
$$;

-- Twilio's status callback for an outbound message. Statuses only move forward (a late 'sent'
-- after 'delivered' changes nothing; a repeat is harmless). Error codes that mean the number cannot
-- receive SMS mark the user undeliverable and cancel what is queued for them.
create or replace function mq_status_callback(
    p_sid text, p_status text, p_error_code text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_msg messages;
    v_rank_old integer;
    v_rank_new integer;
    v_queue message_queue;
    v_cancelled integer := 0;
begin
    select * into v_msg from messages where twilio_message_sid = p_sid and direction = 'outbound' for update;
    if not found then
        return jsonb_build_object('known', false);
    end if;
    v_rank_old := case v_msg.status when 'pending' then 0 when 'queued' then 1 when 'sending' then 2
                  when 'sent' then 3 else 4 end;
    v_rank_new := case p_status when 'accepted' then 1 when 'scheduled' then 1 when 'queued' then 1
                  when 'sending' then 2 when 'sent' then 3 when 'delivered' then 4 when 'undelivered' then 4
                  when 'failed' then 4 when 'read' then 4 else -1 end;
    if v_rank_new < 0 then
        return jsonb_build_object('known', true, 'changed', false, 'status', v_msg.status, 'ignored', p_status);
    end if;
    if v_rank_new <= v_rank_old then
        return jsonb_build_object('known', true, 'changed', false, 'status', v_msg.status);
    end if;
    update messages set
        status = case when p_status = 'read' then 'delivered' else p_status end,
        delivered_at = case when p_status in ('delivered', 'read') then p_now else delivered_at end,
        error_code = coalesce(p_error_code, error_code)
    where id = v_msg.id;
    select * into v_queue from message_queue where id = v_msg.message_queue_id;
    if p_status in ('delivered', 'read') then
        perform mq_emit('events', 'message.delivered',
            jsonb_build_object('messageId', v_queue.id, 'userId', v_msg.user_id, 'agentId', v_queue.agent_id,
                               'twilioMessageSid', p_sid, 'at', p_now),
            jsonb_build_object('userId', v_msg.user_id::text, 'agentId', coalesce(v_queue.agent_id, '')), p_now);
    elsif p_status in ('undelivered', 'failed') then
        perform mq_emit('events', 'message.failed',
            jsonb_build_object('messageId', v_queue.id, 'userId', v_msg.user_id, 'agentId', v_queue.agent_id,
                               'twilioMessageSid', p_sid, 'errorCode', p_error_code, 'status', p_status,
                               'at', p_now),
            jsonb_build_object('userId', v_msg.user_id::text, 'agentId', coalesce(v_queue.agent_id, '')), p_now);
        if p_error_code in ('30005', '30006', '21610', '21614') then
            update users set undeliverable_at = coalesce(undeliverable_at, p_now),
                             undeliverable_reason = 'twilio_' || p_error_code, updated_at = p_now
            where id = v_msg.user_id;
            with cancelled as (
                update message_queue set status = 'cancelled', reason = 'undeliverable_' || p_error_code,
                                         updated_at = p_now
                where user_id = v_msg.user_id and status = 'queued'
                returning id, agent_id)
            select count(*) into v_cancelled from cancelled;
        end if;
    end if;
    perform mq_log_action('status_' || p_status, v_msg.user_id, v_queue.id, null,
        jsonb_build_object('twilioMessageSid', p_sid, 'errorCode', p_error_code, 'cancelled', v_cancelled),
        null, p_now);
    return jsonb_build_object('known', true, 'changed', true, 'status', p_status, 'cancelled', v_cancelled);
end;
$$;

-- Lease up to p_limit unpublished events to one drain (SKIP LOCKED and a lease: two drains at once
-- do not publish one event twice); the caller publishes them and marks them mq_events_published.
-- An event whose publish failed is retried once its lease ends (delivery is at least once).
create or replace function mq_events_pending(p_limit integer, p_lease_seconds integer, p_now timestamptz)
returns jsonb
language sql as $$
    with picked as (
        select id from events_outbox
        where published_at is null and (lease_until is null or lease_until <= p_now)
        order by id limit p_limit
        for update skip locked),
    leased as (
        update events_outbox e set lease_until = p_now + make_interval(secs => p_lease_seconds),
                                   attempts = e.attempts + 1
        from picked where e.id = picked.id
        returning e.*)
    select coalesce(jsonb_agg(jsonb_build_object('id', id, 'topic', topic, 'event_type', event_type,
                                                 'payload', payload, 'attributes', attributes)
                              order by id), '[]'::jsonb)
    from leased;
$$;

create or replace function mq_events_published(p_ids bigint[], p_now timestamptz)
returns jsonb
language sql as $$
    with done as (
        update events_outbox set published_at = p_now, lease_until = null
        where id = any(p_ids) and published_at is null returning 1)
    select to_jsonb(count(*)) from done;
$$;

create or replace function mq_events_failed(p_ids bigint[], p_error text, p_now timestamptz)
returns jsonb
language sql as $$
    with failed as (
        update events_outbox set lease_until = null, last_error = p_error
        where id = any(p_ids) and published_at is null returning 1)
    select to_jsonb(count(*)) from failed;
$$;
