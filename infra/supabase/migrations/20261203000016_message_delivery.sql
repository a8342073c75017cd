-- GET /messages/<id> shows what Twilio said of the delivery (issue 18): a status callback updates
-- the outbound `messages` row (status delivered/undelivered/failed, delivered_at, error_code), which
-- no read answered, so a message reported undelivered still read as plain `sent`. mq_get adds that
-- row's outcome as `delivery` (for a sequence: its last part's, the sid the queue row keeps). Only
-- mq_get: the delivery path's reads do not need it. Same signature.
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
    return mq_message_doc(v_row) || jsonb_build_object('delivery', v_delivery);
end;
$$;

call close_public_api();
