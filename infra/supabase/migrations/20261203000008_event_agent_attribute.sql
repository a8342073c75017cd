-- Every message.* event carries the `agentId` attribute (issue 14). Each agent type now reads its
-- own events subscription, filtered on attributes.agentId (infra/terraform/pubsub.tf); a message.failed
-- written by mq_release (attempts used up), mq_fail or mq_render_failed had only `userId`, so it
-- matched no filter and reached no agent. Rather than redefine every emitter, the outbox writer
-- fills the attribute in from the message the payload names, for these and for any later emitter.
-- An event about no message (inbound_message, routed on agentType) is left as it was.
create or replace function mq_emit(
    p_topic text, p_event_type text, p_payload jsonb, p_attributes jsonb, p_now timestamptz)
returns void
language plpgsql as $$
declare
    v_attributes jsonb := coalesce(p_attributes, '{}'::jsonb) || jsonb_build_object('eventType', p_event_type);
    v_agent_id text;
begin
    if not v_attributes ? 'agentId' and p_payload ? 'messageId' then
        select q.agent_id into v_agent_id from message_queue q where q.id = (p_payload ->> 'messageId')::uuid;
        if found then
            v_attributes := v_attributes || jsonb_build_object('agentId', coalesce(v_agent_id, ''));
        end if;
    end if;
    insert into events_outbox (topic, event_type, payload, attributes, created_at)
    values (p_topic, p_event_type, p_payload, v_attributes, p_now);
end;
$$;
