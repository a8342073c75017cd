-- A delivery's context no longer grows with its user's queue (issue 17, fairness): mq_delivery_context
-- answered every queued reservation of the user, which the delivery-time check never reads
-- (policy.check_now counts the sends made; reservations were spread at planning time), so each
-- firing of a user with a long backlog aggregated, sent and decoded all of it: a backlog's
-- firings cost O(n^2). Measured (scratch run, embedded PostgreSQL, 200 calls): with 1,200 queued,
-- 5.5 ms a call and 2.1 ms of the caller's CPU, now 0.50 and 0.15 ms; with 50 (USER_QUEUE_LIMIT's
-- default), 0.57 and 0.27 ms, now 0.31 and 0.17 ms. A delivery reads only the reservations already
-- due (the one rule that uses them: a due message of a more important lane takes the slot,
-- rules.yields_to) and no topic reservations (check_now ignores them too).
--
-- mq_user_context gains p_due_only (default false: planning still sees every reservation). Its old
-- signature is dropped first (PostgREST cannot choose between overloads); the previous release's
-- calls, without it, still resolve, and its mq_delivery_context calls answer what it reads.

drop function if exists mq_user_context(uuid, timestamptz, uuid, text, text, text, integer, integer);

-- What the policy needs to know about a user (see 20261203000011); with p_due_only, only the
-- reservations due by p_now and no topic reservations (what a delivery's check reads).
create or replace function mq_user_context(
    p_user_id uuid, p_now timestamptz, p_exclude uuid default null,
    p_agent_id text default null, p_idempotency_key text default null,
    p_topic_key text default null, p_user_queue_limit integer default null,
    p_agent_rate_per_minute integer default null, p_due_only boolean default false)
returns jsonb
language plpgsql stable as $$
declare
    v_user users;
    v_sends jsonb;
    v_reservations jsonb;
    v_last_inbound timestamptz;
    v_replay message_queue;
    v_refused jsonb;
    v_topic_sends jsonb := '[]'::jsonb;
    v_topic_reservations jsonb := '[]'::jsonb;
begin
    select * into v_user from users where id = p_user_id;
    if not found then
        return null;
    end if;
    if p_idempotency_key is not null then
        select * into v_replay from message_queue
        where agent_id = p_agent_id and idempotency_key = p_idempotency_key;
        if found then
            return jsonb_build_object('user', to_jsonb(v_user), 'replay', mq_message_doc(v_replay));
        end if;
    end if;
    v_refused := mq_admission(p_user_id, p_agent_id, p_topic_key, p_now, p_user_queue_limit,
                              p_agent_rate_per_minute);
    if v_refused is not null then
        return jsonb_build_object('user', to_jsonb(v_user), 'refused', v_refused);
    end if;
    select coalesce(jsonb_agg(q.slot_at order by q.slot_at), '[]'::jsonb) into v_sends
    from message_queue q
    where q.user_id = p_user_id and q.status in ('sending', 'sent')
      and q.slot_at > p_now - interval '8 days';
    select coalesce(jsonb_agg(jsonb_build_object('at', r.scheduled_for, 'priority', r.priority)
                              order by r.scheduled_for), '[]'::jsonb) into v_reservations
    from (select q.scheduled_for, q.priority from message_queue q
          where q.user_id = p_user_id and q.status = 'queued'
            and (p_exclude is null or q.id <> p_exclude)
            and (not p_due_only or q.scheduled_for <= p_now)
            -- the agent's queued messages on the topic are superseded by the one being planned:
            -- it takes their place, not the slot after them
            and not coalesce(q.topic_key = p_topic_key and q.agent_id = p_agent_id, false)
          order by q.scheduled_for) r;
    if p_topic_key is not null then
        select coalesce(jsonb_agg(q.slot_at order by q.slot_at), '[]'::jsonb) into v_topic_sends
        from message_queue q
        where q.user_id = p_user_id and q.status in ('sending', 'sent') and q.topic_key = p_topic_key
          and q.slot_at > p_now - interval '24 hours';
        if not p_due_only then
            -- The asking agent's own queued messages on the topic are superseded by its new one.
            select coalesce(jsonb_agg(q.scheduled_for order by q.scheduled_for), '[]'::jsonb)
            into v_topic_reservations
            from message_queue q
            where q.user_id = p_user_id and q.status = 'queued' and q.topic_key = p_topic_key
              and (p_exclude is null or q.id <> p_exclude) and q.agent_id is distinct from p_agent_id;
        end if;
    end if;
    select max(m.created_at) into v_last_inbound from messages m
    where m.user_id = p_user_id and m.direction = 'inbound' and m.created_at <= p_now;
    return jsonb_build_object('user', to_jsonb(v_user), 'sends', v_sends, 'reservations', v_reservations,
                              'last_inbound_at', v_last_inbound, 'topic_sends', v_topic_sends,
                              'topic_reservations', v_topic_reservations);
end;
$$;

-- The message and its user's context for a delivery (see 20261203000011): only what is due.
create or replace function mq_delivery_context(p_message_id uuid, p_now timestamptz)
returns jsonb
language plpgsql stable as $$
declare
    v_row message_queue;
begin
    select * into v_row from message_queue where id = p_message_id;
    if not found then
        return null;
    end if;
    return jsonb_build_object('message', mq_message_doc(v_row),
                              'context', mq_user_context(p_user_id => v_row.user_id, p_now => p_now,
                                                         p_exclude => v_row.id, p_topic_key => v_row.topic_key,
                                                         p_due_only => true));
end;
$$;

call close_public_api();
