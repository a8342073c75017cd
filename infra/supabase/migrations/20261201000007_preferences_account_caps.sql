-- User notification preferences (the fitness seed's notification_preferences, generalised) and
-- account-wide caps for the whole sending account (Twilio plan and carrier limits).
--
-- users.notifications_enabled   false: only urgent messages go out (schedule answers 409
--                               notifications_disabled for the other lanes; queued ones fail so)
-- users.preferred_days          ISO weekdays 1 (Mon) .. 7 (Sun) in the user's timezone; NULL: any day
-- users.preferred_window_start  local time range [start, end) where medium and low messages land;
-- users.preferred_window_end    both NULL: no window; start > end wraps midnight; start = end: all day
-- users.weekly_limit            messages per local calendar week (Monday 00:00); NULL: the default

alter table users add column if not exists notifications_enabled boolean not null default true;
alter table users add column if not exists preferred_days smallint[]
    constraint users_preferred_days_iso check (preferred_days <@ array[1, 2, 3, 4, 5, 6, 7]::smallint[]);
alter table users add column if not exists preferred_window_start time;
alter table users add column if not exists preferred_window_end time;
alter table users add column if not exists weekly_limit integer
    constraint users_weekly_limit_positive check (weekly_limit >= 1);

-- Every send of the account by slot time, for the account-wide caps.
create index if not exists message_queue_account_slots on message_queue (slot_at)
    where status in ('sending', 'sent');
-- Due messages by lane, for "a more important message is due" (one index probe).
create index if not exists message_queue_due_by_lane on message_queue (priority, scheduled_for)
    where status = 'queued';

-- The weekly cap needs a week of history (a local week is at most 7 days and 1 hour long).
create or replace function mq_user_context(p_user_id uuid, p_now timestamptz, p_exclude uuid default null)
returns jsonb
language sql stable as $$
    select case when u.id is null then null else jsonb_build_object(
        'user', to_jsonb(u),
        'sends', coalesce((
            select jsonb_agg(q.slot_at order by q.slot_at)
            from message_queue q
            where q.user_id = u.id and q.status in ('sending', 'sent')
              and q.slot_at > p_now - interval '8 days'), '[]'::jsonb),
        'reservations', coalesce((
            select jsonb_agg(jsonb_build_object('at', r.scheduled_for, 'priority', r.priority)
                             order by r.scheduled_for)
            from (select q.scheduled_for, q.priority from message_queue q
                  where q.user_id = u.id and q.status = 'queued'
                    and (p_exclude is null or q.id <> p_exclude)
                  order by q.scheduled_for limit 500) r), '[]'::jsonb),
        'last_inbound_at', (
            select max(m.created_at) from messages m
            where m.user_id = u.id and m.direction = 'inbound' and m.created_at <= p_now)
    ) end
    from (select 1) one
    left join users u on u.id = p_user_id;
$$;

drop function if exists mq_upsert_user(text, text, time, time, boolean, integer, integer, text, uuid);

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

-- The earliest instant after which a rolling window of p_window ending then holds fewer than p_cap
-- sends of the account (the caller found it full at p_now).
create or replace function mq_account_window_free_at(p_now timestamptz, p_window interval, p_cap integer)
returns timestamptz
language sql stable as $$
    select coalesce(max(s.slot_at), p_now) + p_window
    from (select slot_at from message_queue
          where status in ('sending', 'sent') and slot_at > p_now - p_window and slot_at <= p_now
          order by slot_at
          limit greatest(
              (select count(*) from message_queue
               where status in ('sending', 'sent') and slot_at > p_now - p_window and slot_at <= p_now)
              - p_cap + 1, 1)) s;
$$;

drop function if exists mq_claim(uuid, integer, timestamptz, integer, integer, integer, integer, timestamptz,
                                 timestamptz);

-- Claim a queued message for sending. Under the user's row lock it re-counts everything that was
-- sent or is being sent, so two deliveries racing for one user can never both pass a limit; the
-- claim itself (slot_at = p_now) counts as a send for every limit from here on.
--
-- p_account: the account-wide caps, {"per_second": n, "hourly": n, "daily": n} (each optional; null
-- or {} for none), counted over rolling windows of every send of the account under one advisory
-- lock. When a cap is reached the answer carries retry_at, the earliest instant it can allow, spread
-- by the number of due messages ahead of this one, so a burst (08:00 when quiet hours end) drains
-- at the configured rate; while the account is throttled, a more important due message goes first.
create or replace function mq_claim(
    p_message_id uuid,
    p_generation integer,
    p_now timestamptz,
    p_lease_seconds integer,
    p_cooldown_seconds integer,
    p_hourly_limit integer,
    p_daily_cap integer,
    p_day_start timestamptz,
    p_day_end timestamptz,
    p_weekly_cap integer default null,
    p_week_start timestamptz default null,
    p_week_end timestamptz default null,
    p_account jsonb default null)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
    v_blocked timestamptz;
    v_enabled boolean;
    v_row message_queue;
    v_token uuid;
    v_count integer;
    v_rank integer;
    v_ahead integer;
    v_higher integer;
    v_per_second integer := nullif(p_account ->> 'per_second', '')::integer;
    v_hourly integer := nullif(p_account ->> 'hourly', '')::integer;
    v_daily integer := nullif(p_account ->> 'daily', '')::integer;
    v_retry timestamptz;
begin
    select user_id into v_user_id from message_queue where id = p_message_id;
    if not found then
        return jsonb_build_object('claimed', false, 'reason', 'not_found');
    end if;
    -- Lock order everywhere: the user row, then the message rows. NO KEY UPDATE, not UPDATE: it
    -- still serialises claims per user, but does not block the KEY SHARE locks that foreign-key
    -- checks take (mq_record_sent holds the message row and inserts rows referencing the user).
    select coalesce(opted_out_at, undeliverable_at), notifications_enabled into v_blocked, v_enabled
    from users where id = v_user_id
    for no key update;
    select * into v_row from message_queue where id = p_message_id for update;
    if v_row.status <> 'queued' then
        return jsonb_build_object('claimed', false, 'reason', 'not_queued', 'status', v_row.status);
    end if;
    if v_row.task_generation <> p_generation then
        return jsonb_build_object('claimed', false, 'reason', 'stale_task', 'status', v_row.status);
    end if;
    if v_blocked is not null then
        -- Opted out (STOP) or undeliverable (Twilio 30005/30006/21610/21614): never send.
        return jsonb_build_object('claimed', false, 'reason', 'opted_out', 'status', v_row.status);
    end if;
    if not v_enabled and v_row.priority <> 'urgent' then
        return jsonb_build_object('claimed', false, 'reason', 'notifications_disabled', 'status', v_row.status);
    end if;
    if v_row.expires_at is not null and v_row.expires_at <= p_now then
        return jsonb_build_object('claimed', false, 'reason', 'expired', 'status', v_row.status);
    end if;
    -- One unresolved send per user: a 'sending' row whose lease ran out may still have reached
    -- Twilio, and until it is reconciled (the sweep, within a minute or two) nothing else goes out,
    -- so reconciliation never has to tell two in-doubt messages with the same text apart.
    perform 1 from message_queue
    where user_id = v_user_id and status = 'sending' and id <> p_message_id;
    if found then
        return jsonb_build_object('claimed', false, 'reason', 'in_flight', 'status', v_row.status);
    end if;
    perform 1 from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at > p_now - make_interval(secs => p_cooldown_seconds) and slot_at <= p_now;
    if found then
        return jsonb_build_object('claimed', false, 'reason', 'cooldown', 'status', v_row.status);
    end if;
    select count(*) into v_count from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at > p_now - interval '1 hour' and slot_at <= p_now;
    if v_count >= p_hourly_limit then
        return jsonb_build_object('claimed', false, 'reason', 'hourly_limit', 'status', v_row.status);
    end if;
    select count(*) into v_count from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at >= p_day_start and slot_at < p_day_end;
    if v_count >= p_daily_cap then
        return jsonb_build_object('claimed', false, 'reason', 'daily_limit', 'status', v_row.status);
    end if;
    if p_weekly_cap is not null then
        select count(*) into v_count from message_queue
        where user_id = v_user_id and status in ('sending', 'sent')
          and slot_at >= p_week_start and slot_at < p_week_end;
        if v_count >= p_weekly_cap then
            return jsonb_build_object('claimed', false, 'reason', 'weekly_limit', 'status', v_row.status);
        end if;
    end if;
    if v_per_second is not null or v_hourly is not null or v_daily is not null then
        -- One account: its counts are only true while no other claim is counting.
        perform pg_advisory_xact_lock(727347002);
        v_rank := array_position(array['urgent', 'high', 'medium', 'low'], v_row.priority::text);
        if v_daily is not null then
            select count(*) into v_count from message_queue
            where status in ('sending', 'sent') and slot_at > p_now - interval '1 day' and slot_at <= p_now;
            if v_count >= v_daily then
                return jsonb_build_object('claimed', false, 'reason', 'account_daily_limit', 'status', v_row.status,
                    'retry_at', mq_account_window_free_at(p_now, interval '1 day', v_daily));
            end if;
        end if;
        if v_hourly is not null then
            select count(*) into v_count from message_queue
            where status in ('sending', 'sent') and slot_at > p_now - interval '1 hour' and slot_at <= p_now;
            if v_count >= v_hourly then
                return jsonb_build_object('claimed', false, 'reason', 'account_hourly_limit', 'status', v_row.status,
                    'retry_at', mq_account_window_free_at(p_now, interval '1 hour', v_hourly));
            end if;
        end if;
        if v_per_second is not null then
            -- Due messages ahead of this one: more important, or as important and due earlier. Capped:
            -- beyond a few thousand the spread is only an estimate anyway.
            select count(*) into v_ahead from (
                select 1 from message_queue q
                where q.status = 'queued' and q.scheduled_for <= p_now and q.id <> p_message_id
                  and q.scheduled_for > p_now - interval '10 minutes'
                  and (array_position(array['urgent', 'high', 'medium', 'low'], q.priority::text) < v_rank
                       or (q.priority = v_row.priority
                           and (q.scheduled_for, q.created_at, q.id)
                               < (v_row.scheduled_for, v_row.created_at, v_row.id)))
                limit 10000) a;
            select count(*) into v_count from message_queue
            where status in ('sending', 'sent') and slot_at > p_now - interval '1 second' and slot_at <= p_now;
            -- While the account's throughput is contended, more important due messages take the
            -- remaining slots first (only then: a due message that is itself held up elsewhere must
            -- not hold back a quiet account).
            select count(*) into v_higher from (
                select 1 from message_queue q
                where q.status = 'queued' and q.scheduled_for <= p_now
                  and q.scheduled_for > p_now - interval '10 minutes'
                  and q.priority = any ((array['urgent', 'high', 'medium', 'low'])[1:v_rank - 1])
                limit v_per_second) h;
            if v_higher > 0 and v_count + v_higher >= v_per_second then
                return jsonb_build_object('claimed', false, 'reason', 'account_priority', 'status', v_row.status,
                    'retry_at', p_now + make_interval(secs => greatest(1, ceil(v_ahead::numeric / v_per_second))));
            end if;
            if v_count >= v_per_second then
                v_retry := mq_account_window_free_at(p_now, interval '1 second', v_per_second)
                           + make_interval(secs => floor(v_ahead::numeric / v_per_second));
                return jsonb_build_object('claimed', false, 'reason', 'account_throughput', 'status', v_row.status,
                    'retry_at', v_retry);
            end if;
        end if;
    end if;
    v_token := gen_random_uuid();
    update message_queue set
        status = 'sending',
        claim_token = v_token,
        lease_expires_at = p_now + make_interval(secs => p_lease_seconds),
        slot_at = p_now,
        attempts = attempts + 1,
        reason = 'sending',
        updated_at = p_now
    where id = p_message_id;
    return jsonb_build_object('claimed', true, 'reason', 'ok', 'status', 'sending',
                              'token', v_token, 'attempts', v_row.attempts + 1);
end;
$$;
