-- Rendering structured messages with a model, and the relevance check of messages that asked for
-- fresh context. The model calls happen in the application; these functions record what they
-- decided, each in one transaction, with the call's model, tokens, latency and cost in
-- agent_actions_log (input_data/output_data and latency_ms).

-- The latest p_limit messages of the user's conversation history, oldest first (what a model sees).
create or replace function mq_conversation(p_user_id uuid, p_limit integer)
returns jsonb
language sql stable as $$
    select coalesce(jsonb_agg(jsonb_build_object('direction', t.direction, 'content', t.content,
                                                 'at', t.created_at) order by t.created_at, t.id), '[]'::jsonb)
    from (select m.id, m.direction, m.content, m.created_at from messages m
          where m.user_id = p_user_id
          order by m.created_at desc, m.id desc limit p_limit) t;
$$;

-- One model call, for the record (a render at schedule time, a relevance verdict that kept the
-- message). p_usage is {model, inputTokens, outputTokens, ..., latencyMs, costUsd}.
create or replace function mq_log_model_call(
    p_user_id uuid, p_message_id uuid, p_action text, p_usage jsonb, p_output jsonb, p_error text,
    p_now timestamptz)
returns void
language sql as $$
    insert into agent_actions_log (agent_type, action_type, user_id, message_id, input_data, output_data,
                                   error, latency_ms, created_at)
    values ('message_orchestrator', p_action, p_user_id, p_message_id, p_usage, p_output, p_error,
            (p_usage ->> 'latencyMs')::integer, p_now);
$$;

-- The rendered text of a queued message: what will be sent, and what reconciliation looks for at
-- Twilio if the send's outcome is ever unknown.
create or replace function mq_record_render(p_message_id uuid, p_text text, p_usage jsonb, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    update message_queue set final_message = p_text, updated_at = p_now
    where id = p_message_id and status = 'queued'
    returning user_id into v_user_id;
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_log_model_call(v_user_id, p_message_id, 'rendered', p_usage,
        jsonb_build_object('length', char_length(p_text)), null, p_now);
    return to_jsonb(true);
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

-- A render (or relevance check) failed: counted; past p_max_attempts the message fails for good
-- (reason render_failed): raw structured data is never sent instead. Answers {status, attempts}.
create or replace function mq_render_failed(
    p_message_id uuid, p_error text, p_usage jsonb, p_max_attempts integer, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
begin
    update message_queue set
        render_attempts = render_attempts + 1,
        status = case when render_attempts + 1 >= p_max_attempts then 'failed' else status end,
        reason = case when render_attempts + 1 >= p_max_attempts then 'render_failed' else 'render_unavailable' end,
        last_error = p_error,
        updated_at = p_now
    where id = p_message_id and status = 'queued'
    returning * into v_row;
    if not found then
        return jsonb_build_object('status', (select status from message_queue where id = p_message_id),
                                  'attempts', null);
    end if;
    perform mq_log_model_call(v_row.user_id, p_message_id, 'render_failed', p_usage,
        jsonb_build_object('attempts', v_row.render_attempts, 'status', v_row.status), p_error, p_now);
    if v_row.status = 'failed' then
        perform mq_emit('events', 'message.failed',
            jsonb_build_object('messageId', p_message_id, 'userId', v_row.user_id, 'reason', 'render_failed',
                               'error', p_error, 'at', p_now),
            jsonb_build_object('userId', v_row.user_id::text), p_now);
    end if;
    return jsonb_build_object('status', v_row.status, 'attempts', v_row.render_attempts);
end;
$$;

-- The model judged a queued message stale given what the user said since it was queued: it is
-- superseded, with the verdict's reason (at most 200 characters) in superseded_reason; nothing is
-- sent and no budget is used.
create or replace function mq_supersede_stale(p_message_id uuid, p_reason text, p_usage jsonb, p_now timestamptz)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
begin
    update message_queue set
        status = 'superseded',
        reason = 'stale',
        superseded_reason = left(coalesce(nullif(p_reason, ''), 'no longer relevant'), 200),
        updated_at = p_now
    where id = p_message_id and status = 'queued'
    returning * into v_row;
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_emit('events', 'message.superseded',
        jsonb_build_object('messageId', p_message_id, 'userId', v_row.user_id, 'agentId', v_row.agent_id,
                           'reason', 'stale', 'explanation', v_row.superseded_reason, 'at', p_now),
        jsonb_build_object('userId', v_row.user_id::text, 'agentId', v_row.agent_id), p_now);
    perform mq_log_model_call(v_row.user_id, p_message_id, 'superseded', p_usage,
        jsonb_build_object('relevant', false, 'reason', v_row.superseded_reason), null, p_now);
    return to_jsonb(true);
end;
$$;
