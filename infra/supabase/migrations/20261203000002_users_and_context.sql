-- Users, and what the policy and delivery read about a user and a message. Every function takes
-- the current time as p_now (the database clock decides nothing, so tests and soak runs can drive a
-- virtual clock), and answers jsonb so the psycopg store and the supabase store (PostgREST rpc)
-- decode one shape.
--
-- The functions on the schedule and delivery paths are plpgsql, not sql: a SQL-language function
-- that cannot be inlined is planned afresh on every call, while plpgsql keeps its statements' plans
-- for the session (tests/integration/test_query_plans.py holds them to it).

-- An operator's or the demo's way to add a user; also used by tests. Returns the user row.
create or replace function mq_upsert_user(
    p_phone_number text,
    p_timezone text,
    p_quiet_hours_start time default null,
    p_quiet_hours_end time default null,
    p_quiet_hours_enabled boolean default true,
    p_daily_limit integer default null,
    p_hourly_limit integer default null,
    p_poc_agent_type text default null,
    p_id uuid default null,
    p_notifications_enabled boolean default true,
    p_preferred_days integer[] default null,
    p_preferred_window_start time default null,
    p_preferred_window_end time default null,
    p_weekly_limit integer default null)
returns jsonb
language sql as $$
    insert into users (id, phone_number, timezone, quiet_hours_start, quiet_hours_end, quiet_hours_enabled,
                       daily_limit, hourly_limit, poc_agent_type, notifications_enabled, preferred_days,
                       preferred_window_start, preferred_window_end, weekly_limit)
    values (coalesce(p_id, gen_random_uuid()), p_phone_number, p_timezone, p_quiet_hours_start,
            p_quiet_hours_end, p_quiet_hours_enabled, p_daily_limit, p_hourly_limit, p_poc_agent_type,
            p_notifications_enabled, p_preferred_days::smallint[], p_preferred_window_start, p_preferred_window_end,
            p_weekly_limit)
    on conflict (phone_number) do update set
        timezone = excluded.timezone,
        quiet_hours_start = excluded.quiet_hours_start,
        quiet_hours_end = excluded.quiet_hours_end,
        quiet_hours_enabled = excluded.quiet_hours_enabled,
        daily_limit = excluded.daily_limit,
        hourly_limit = excluded.hourly_limit,
        poc_agent_type = excluded.poc_agent_type,
        notifications_enabled = excluded.notifications_enabled,
        preferred_days = excluded.preferred_days,
        preferred_window_start = excluded.preferred_window_start,
        preferred_window_end = excluded.preferred_window_end,
        weekly_limit = excluded.weekly_limit,
        updated_at = now()
    returning to_jsonb(users.*);
$$;

-- A message as the application reads it: the row, and for a sequence its parts in position order.
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
                      'data', p.part_data)
                      order by p.position), '[]'::jsonb)
                  from message_parts p where p.message_id = p_row.id));
end;
$$;

create or replace function mq_get(p_message_id uuid)
returns jsonb
language plpgsql stable as $$
declare
    v_row message_queue;
begin
    select * into v_row from message_queue where id = p_message_id;
    if not found then
        return null;
    end if;
    return mq_message_doc(v_row);
end;
$$;

-- What the policy needs to know about a user at p_now: settings, the slot times of messages sent or
-- being sent in the last 8 days (the weekly cap needs a week of history, and a local week is at
-- most 7 days and 1 hour long), queued reservations, the last inbound message. With
-- p_idempotency_key, the agent's message already stored under that key instead ('replay'): a
-- retried request is answered with it before anything is planned or rendered again (planned
-- afresh, the first message's own reservation could leave the retry no allowed time at all).
create or replace function mq_user_context(
    p_user_id uuid, p_now timestamptz, p_exclude uuid default null,
    p_agent_id text default null, p_idempotency_key text default null)
returns jsonb
language plpgsql stable as $$
declare
    v_user users;
    v_sends jsonb;
    v_reservations jsonb;
    v_last_inbound timestamptz;
    v_replay message_queue;
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
    select coalesce(jsonb_agg(q.slot_at order by q.slot_at), '[]'::jsonb) into v_sends
    from message_queue q
    where q.user_id = p_user_id and q.status in ('sending', 'sent')
      and q.slot_at > p_now - interval '8 days';
    select coalesce(jsonb_agg(jsonb_build_object('at', r.scheduled_for, 'priority', r.priority)
                              order by r.scheduled_for), '[]'::jsonb) into v_reservations
    from (select q.scheduled_for, q.priority from message_queue q
          where q.user_id = p_user_id and q.status = 'queued'
            and (p_exclude is null or q.id <> p_exclude)
          order by q.scheduled_for limit 500) r;
    select max(m.created_at) into v_last_inbound from messages m
    where m.user_id = p_user_id and m.direction = 'inbound' and m.created_at <= p_now;
    return jsonb_build_object('user', to_jsonb(v_user), 'sends', v_sends, 'reservations', v_reservations,
                              'last_inbound_at', v_last_inbound);
end;
$$;

-- A message and its user's context, for delivery (the message's own reservation left out).
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
                              'context', mq_user_context(v_row.user_id, p_now, v_row.id));
end;
$$;
