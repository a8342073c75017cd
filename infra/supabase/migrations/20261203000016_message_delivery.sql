-- GET /messages/<id> tells a message's whole story (issue 18). mq_get adds:
-- * `delivery`: what Twilio said of it. A status callback updates the outbound `messages` row
--   (status delivered/undelivered/failed, delivered_at, error_code), which no read answered, so a
--   message reported undelivered still read as plain `sent` (for a sequence: its last part's row,
--   the sid the queue row keeps);
-- * `timeline`: every decision about it from agent_actions_log, oldest first (scheduled, deferred
--   and why, sent, failed, reconciled, status receipts...), the last 200.
-- Only mq_get: the delivery path's reads do not need them. Same signature.
create or replace function mq_get(p_message_id uuid)
returns jsonb
language plpgsql stable as $$
declare
    v_row message_queue;
    v_delivery jsonb;
begin
    select * into v_row from message_queue where id = p_message_id;
    if not found then
        return null;
    end if;
    if v_row.twilio_message_sid is not null then
        select jsonb_build_object('status', m.status, 'delivered_at', m.delivered_at, 'error_code', m.error_code)
        into v_delivery
        from messages m where m.twilio_message_sid = v_row.twilio_message_sid;
    end if;
    return mq_message_doc(v_row) || jsonb_build_object('delivery', v_delivery, 'timeline', (
        select coalesce(jsonb_agg(jsonb_build_object(
                   'at', a.created_at, 'action', a.action_type, 'output', a.output_data, 'error', a.error)
                   order by a.created_at, a.id), '[]'::jsonb)
        from (select * from agent_actions_log l where l.message_id = p_message_id
              order by l.created_at desc limit 200) a));
end;
$$;

call close_public_api();
