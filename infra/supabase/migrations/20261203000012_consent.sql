-- The consent ledger (issue 15): every opt-out, opt-in and help request, when and how it came, written
-- in the same transaction as the change it records, so what an auditor reads is what the system did.
--
-- Sources of a change (consent_events.source):
--   keyword       a Twilio or FCC keyword, the whole message (STOP, OPT OUT, START, HELP, ...)
--   phrase        a revocation in other words ("stop texting me", "unsubscribe me", ...)
--   twilio_21610  Twilio refused a send: "Attempt to send to unsubscribed recipient" (the user
--                 opted out at Twilio, e.g. through Advanced Opt-Out or another number of the
--                 Messaging Service); every later send would fail the same way
--   api, operator allowed for writers to come (an agent relaying a revocation, an operator acting
--                 on one made by phone or email); nothing writes them yet
--
-- What changes here:
--   * consent_events, the ledger;
--   * mq_record_consent: a consent change and its ledger row (opt-out: opted_out_at set, what is
--     queued cancelled; opt-in: opted_out_at cleared; help: the ledger only), called by the two
--     paths that change consent;
--   * mq_inbound (20261203000005) takes the source of the keyword (p_source) and records it through
--     mq_record_consent; its inbound_message event names the source and the user's opt-out state;
--   * mq_fail_opted_out: Twilio's 21610 on a send fails the message and opts the user out at once;
--   * mq_consent_history: a user's ledger, newest first (the operators' API).

create table consent_events (
    id          bigint generated always as identity primary key,
    user_id     uuid not null references users (id) on delete cascade,
    -- When it happened as the service saw it (the functions' p_now: the webhook's or the send's
    -- instant); created_at is the database's own clock when the row was written.
    occurred_at timestamptz not null,
    event       text not null
                constraint consent_events_event check (event in ('opt_in', 'opt_out', 'help')),
    source      text not null
                constraint consent_events_source
                check (source in ('keyword', 'phrase', 'api', 'twilio_21610', 'operator')),
    -- The evidence: the user's message as they wrote it (keyword, phrase), Twilio's error (21610).
    raw_text    text,
    -- Twilio's sid of that message: the inbound SMS; for 21610, none (the send was refused, so it
    -- has no sid).
    message_sid text,
    created_at  timestamptz not null default now()
);
-- A user's history, newest first (mq_consent_history); id breaks ties between rows of one instant.
create index consent_events_user_time on consent_events (user_id, occurred_at, id);


-- A consent change and its ledger row, in the caller's transaction. The caller holds the user's row
-- lock (lock order everywhere: the user row, then the message rows). Returns how many queued
-- messages an opt-out cancelled.
create or replace function mq_record_consent(
    p_user_id uuid, p_event text, p_source text, p_raw_text text, p_message_sid text, p_now timestamptz)
returns integer
language plpgsql as $$
declare
    v_cancelled integer := 0;
begin
    insert into consent_events (user_id, occurred_at, event, source, raw_text, message_sid)
    values (p_user_id, p_now, p_event, p_source, p_raw_text, p_message_sid);
    if p_event = 'opt_out' then
        update users set opted_out_at = coalesce(opted_out_at, p_now), updated_at = p_now where id = p_user_id;
        with cancelled as (
            update message_queue set status = 'cancelled', reason = 'opted_out', claim_token = null,
                                     lease_expires_at = null, updated_at = p_now
            where user_id = p_user_id and status = 'queued'
            returning id, agent_id),
        logged as (
            insert into agent_actions_log (agent_type, action_type, user_id, message_id, output_data, created_at)
            select 'message_orchestrator', 'cancelled', p_user_id, c.id,
                   jsonb_build_object('reason', 'opted_out'), p_now from cancelled c),
        emitted as (
            insert into events_outbox (topic, event_type, payload, attributes, created_at)
            select 'events', 'message.cancelled',
                   jsonb_build_object('messageId', c.id, 'userId', p_user_id, 'agentId', c.agent_id,
                                      'reason', 'opted_out', 'at', p_now),
                   jsonb_build_object('eventType', 'message.cancelled', 'userId', p_user_id::text,
                                      'agentId', c.agent_id), p_now
            from cancelled c)
        select count(*) into v_cancelled from cancelled;
        perform mq_log_action('opted_out', p_user_id, null, null,
                              jsonb_build_object('cancelled', v_cancelled, 'source', p_source), null, p_now);
    elsif p_event = 'opt_in' then
        update users set opted_out_at = null, updated_at = p_now where id = p_user_id;
        perform mq_log_action('opted_in', p_user_id, null, null, jsonb_build_object('source', p_source),
                              null, p_now);
    end if;
    return v_cancelled;
end;
$$;


-- An inbound SMS (Twilio's webhook). p_keyword is what the application recognised in the body:
-- 'stop', 'start', 'help' or null (shared/twilio_forms.py lists the words); p_source how
-- ('keyword' or 'phrase'; null means 'keyword'). Deduplicated by Twilio's MessageSid: a repeated
-- webhook changes nothing, records nothing in the ledger, and says so.
drop function if exists mq_inbound(text, text, text, text, integer, timestamptz);
create or replace function mq_inbound(
    p_from text, p_body text, p_sid text, p_keyword text, p_source text, p_num_media integer,
    p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user users;
    v_conversation uuid;
    v_message uuid;
    v_cancelled integer := 0;
    v_source text := case when p_keyword is not null then coalesce(p_source, 'keyword') end;
    v_opted_out boolean;
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

    if p_keyword in ('stop', 'start', 'help') then
        v_cancelled := mq_record_consent(
            v_user.id, case p_keyword when 'stop' then 'opt_out' when 'start' then 'opt_in' else 'help' end,
            v_source, p_body, p_sid, p_now);
    end if;
    v_opted_out := case p_keyword when 'stop' then true when 'start' then false
                                  else v_user.opted_out_at is not null end;

    -- Agents get every reply, a revocation too: the raw text, what it meant (keyword, source) and
    -- the user's opt-out state after it.
    perform mq_emit('inbound', 'inbound_message',
        jsonb_build_object('messageId', v_message, 'userId', v_user.id, 'conversationId', v_conversation,
                           'from', p_from, 'body', coalesce(p_body, ''), 'numMedia', p_num_media,
                           'twilioMessageSid', p_sid, 'keyword', p_keyword, 'keywordSource', v_source,
                           'optedOut', v_opted_out, 'receivedAt', p_now),
        jsonb_build_object('userId', v_user.id::text, 'agentType', coalesce(v_user.poc_agent_type, '')),
        p_now);
    return jsonb_build_object(
        'duplicate', false, 'userId', v_user.id, 'conversationId', v_conversation, 'messageId', v_message,
        'keyword', p_keyword, 'source', v_source, 'cancelled', v_cancelled, 'optedOut', v_opted_out);
end;
$$;


-- Twilio refused a send with 21610: the recipient unsubscribed (at Twilio). The message fails
-- (reason opted_out, Twilio's error kept) and the user is opted out here too, what is queued for
-- them cancelled, in one transaction; nothing is written unless the message was still queued or
-- sending (a retried task finds it failed and changes nothing). The ledger row has Twilio's error
-- as its text and no sid: a refused create has none.
create or replace function mq_fail_opted_out(p_message_id uuid, p_error text, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    select u.id into v_user_id
    from message_queue q join users u on u.id = q.user_id
    where q.id = p_message_id
    for no key update of u;
    if not found then
        return to_jsonb(false);
    end if;
    if mq_fail(p_message_id, p_error, 'opted_out', p_now) <> to_jsonb(true) then
        return to_jsonb(false);  -- no longer queued or sending: nothing changes
    end if;
    perform mq_record_consent(v_user_id, 'opt_out', 'twilio_21610', p_error, null, p_now);
    return to_jsonb(true);
end;
$$;


-- A user's consent history for operators: the user's current opt-out and the ledger, newest first,
-- at most p_limit rows; null when there is no such user.
create or replace function mq_consent_history(p_user_id uuid, p_limit integer)
returns jsonb
language plpgsql stable as $$
declare
    v_user users;
begin
    select * into v_user from users where id = p_user_id;
    if not found then
        return null;
    end if;
    return jsonb_build_object(
        'user_id', v_user.id,
        'opted_out_at', v_user.opted_out_at,
        'events', coalesce((
            select jsonb_agg(jsonb_build_object(
                       'id', e.id, 'event', e.event, 'source', e.source, 'occurred_at', e.occurred_at,
                       'raw_text', e.raw_text, 'message_sid', e.message_sid, 'created_at', e.created_at)
                   order by e.occurred_at desc, e.id desc)
            from (select * from consent_events
                  where user_id = p_user_id
                  order by occurred_at desc, id desc
                  limit p_limit) e), '[]'::jsonb));
end;
$$;

call close_public_api();
