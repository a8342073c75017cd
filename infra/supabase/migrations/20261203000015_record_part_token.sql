-- mq_record_part checks the claim token (issue 16, item 5). A sequence's sender records each part
-- as Twilio takes it. If its lease lapsed and the sweep's reconciler took the claim, both used to
-- carry on: the sender sending the next parts, the reconciler settling the message. Now a part
-- recorded under a token that is no longer the claim's is still recorded (it went out: it must never
-- be sent again), but the answer says the claim is lost, and the sender stops (shared/service/send.py).
-- Same signature; the previous release stops at the same answer (recorded = false).

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
    if v_row.claim_token is distinct from p_token then
        -- The part went out and is recorded (so it is never sent again), but the claim is someone
        -- else's now (the sweep's reconciler, after a lapsed lease): the sender must stop here.
        return jsonb_build_object('recorded', false, 'reason', 'claim_lost');
    end if;
    return jsonb_build_object('recorded', true);
end;
$$;

call close_public_api();
