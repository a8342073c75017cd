-- SMS segments (issue 15): every message and every part of a sequence records the encoding its
-- text goes out in (GSM-7 or UCS-2) and the number of SMS segments it is sent and billed as. The
-- application counts them (shared/segments.py, with the gsm0338 codec: the database has no GSM
-- 03.38 codec) and passes them with the text wherever a text is stored: mq_enqueue,
-- mq_record_render, mq_record_part_render. A sequence's own columns hold its parts' total
-- (mq_sequence_segments), so the account caps can count segments from one row: mq_claim counts
-- ACCOUNT_RATE_PER_SECOND, ACCOUNT_HOURLY_LIMIT and ACCOUNT_DAILY_LIMIT in segments when asked
-- (p_account.unit, ACCOUNT_CAPS_UNIT=segments), in messages as before otherwise.
--
-- Null means "not counted": a structured text not rendered yet, or a text stored by the previous
-- release (its calls leave out the new parameters, which default to null, and a render it records
-- sets the count to null rather than leave the old text's). Rows written before this migration
-- keep null; nothing backfills them (it would need the codec). The new columns are nullable
-- without a default, so adding them rewrites nothing.
--
-- Functions that gained parameters are dropped first: PostgREST cannot choose between overloads.

alter table message_queue
    add column encoding text constraint message_queue_encoding check (encoding in ('GSM-7', 'UCS-2')),
    add column segments integer constraint message_queue_segments check (segments >= 1),
    add constraint message_queue_segments_counted check ((encoding is null) = (segments is null));

alter table message_parts
    add column encoding text constraint message_parts_encoding check (encoding in ('GSM-7', 'UCS-2')),
    add column segments integer constraint message_parts_segments check (segments >= 1),
    add constraint message_parts_segments_counted check ((encoding is null) = (segments is null));

-- A message as the application reads it (see 20261203000002): each part now with its encoding and
-- segments (the row's own columns are in to_jsonb already).
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
                      'data', p.part_data, 'encoding', p.encoding, 'segments', p.segments)
                      order by p.position), '[]'::jsonb)
                  from message_parts p where p.message_id = p_row.id));
end;
$$;

-- A sequence's parts, in order: p_parts = [{content, delay_seconds, data?, encoding?, segments?}, ...].
create or replace function mq_insert_parts(p_message_id uuid, p_parts jsonb)
returns void
language sql as $$
    insert into message_parts (message_id, position, content, delay_seconds, part_data, encoding, segments)
    select p_message_id, e.ord::integer, coalesce(e.part ->> 'content', ''),
           coalesce((e.part ->> 'delay_seconds')::integer, 1), e.part -> 'data',
           e.part ->> 'encoding', (e.part ->> 'segments')::integer
    from jsonb_array_elements(p_parts) with ordinality as e(part, ord);
$$;

-- A sequence's encoding and segments from its parts: the segments summed, UCS-2 if any part is;
-- null until every part is counted. Answers the updated row.
create or replace function mq_sequence_segments(p_message_id uuid)
returns message_queue
language sql as $$
    update message_queue q set (encoding, segments) = (
        select case when count(*) = count(p.segments)
                    then case when bool_or(p.encoding = 'UCS-2') then 'UCS-2' else 'GSM-7' end end,
               case when count(*) = count(p.segments) then sum(p.segments)::integer end
        from message_parts p where p.message_id = p_message_id)
    where q.id = p_message_id and q.part_count > 0
    returning q.*;
$$;

drop function if exists mq_enqueue(uuid, text, jsonb, text, timestamptz, text, boolean, boolean, uuid, text,
                                   text, timestamptz, text, timestamptz, text, jsonb, integer, integer, boolean);
drop function if exists mq_record_render(uuid, text, jsonb, timestamptz);
drop function if exists mq_record_part_render(uuid, integer, text, jsonb, timestamptz);

-- Insert a queued message (see 20261203000003, 07 and 11: its transactional mark), now with the SMS encoding and
-- segments of its text (p_encoding, p_segments: null while a structured text is unrendered, and
-- for a sequence, whose parts carry theirs and whose total is summed here).
create or replace function mq_enqueue(
    p_user_id uuid,
    p_agent_id text,
    p_message_data jsonb,
    p_final_message text,
    p_scheduled_for timestamptz,
    p_priority text,
    p_can_delay boolean,
    p_requires_fresh_context boolean,
    p_conversation_id uuid,
    p_idempotency_key text,
    p_request_hash text,
    p_expires_at timestamptz,
    p_reason text,
    p_now timestamptz,
    p_topic_key text default null,
    p_parts jsonb default null,
    p_user_queue_limit integer default null,
    p_agent_rate_per_minute integer default null,
    p_transactional boolean default false,
    p_encoding text default null,
    p_segments integer default null)
returns jsonb
language plpgsql as $$
declare
    v_row message_queue;
    v_superseded uuid[];
    v_refused jsonb;
begin
    -- No user lock: superseding older rows takes their row locks, which a claim in progress holds
    -- until it commits (a row being claimed is then no longer queued and is left alone).
    perform 1 from users where id = p_user_id;
    if not found then
        return jsonb_build_object('error', 'unknown_user');
    end if;
    if p_conversation_id is not null then
        perform 1 from conversations where id = p_conversation_id and user_id = p_user_id;
        if not found then
            return jsonb_build_object('error', 'unknown_conversation');
        end if;
    end if;
    -- The admission limits, exact per user: one enqueue per user at a time counts the queue (a
    -- transaction-scoped advisory lock, not the user row's lock, so claims are not held up). A retry
    -- of a stored request is answered below, whatever the limits say now.
    perform pg_advisory_xact_lock(hashtextextended('mq_enqueue:' || p_user_id::text, 0));
    if p_idempotency_key is null or not exists (
        select 1 from message_queue where agent_id = p_agent_id and idempotency_key = p_idempotency_key)
    then
        v_refused := mq_admission(p_user_id, p_agent_id, p_topic_key, p_now, p_user_queue_limit,
                                  p_agent_rate_per_minute);
        if v_refused is not null then
            return jsonb_build_object('error', 'refused', 'refused', v_refused);
        end if;
    end if;
    insert into message_queue (
        user_id, agent_id, message_data, final_message, scheduled_for, priority, can_delay,
        requires_fresh_context, conversation_context_id, idempotency_key, request_hash, expires_at,
        reason, topic_key, part_count, transactional, encoding, segments, created_at, updated_at)
    values (
        p_user_id, p_agent_id, p_message_data, p_final_message, p_scheduled_for, p_priority, p_can_delay,
        p_requires_fresh_context, p_conversation_id, p_idempotency_key, p_request_hash, p_expires_at,
        p_reason, p_topic_key, coalesce(jsonb_array_length(p_parts), 0), coalesce(p_transactional, false),
        case when p_parts is null then p_encoding end, case when p_parts is null then p_segments end,
        p_now, p_now)
    on conflict (agent_id, idempotency_key) where idempotency_key is not null do nothing
    returning * into v_row;
    if not found then
        -- The key is taken (a retry, or a concurrent request that won the race): answer its row.
        select * into v_row from message_queue
        where agent_id = p_agent_id and idempotency_key = p_idempotency_key;
        return jsonb_build_object('created', false, 'message', mq_message_doc(v_row));
    end if;
    if p_parts is not null then
        perform mq_insert_parts(v_row.id, p_parts);
        v_row := mq_sequence_segments(v_row.id);
    end if;
    if p_topic_key is not null then
        with older as (
            update message_queue set
                status = 'superseded',
                superseded_by_message_id = v_row.id,
                superseded_reason = 'replaced by a newer message on topic ' || left(p_topic_key, 80),
                reason = 'superseded',
                updated_at = p_now
            where user_id = p_user_id and agent_id = p_agent_id and topic_key = p_topic_key
              and status = 'queued' and id <> v_row.id
            returning id)
        select coalesce(array_agg(id), '{}') into v_superseded from older;
        if cardinality(v_superseded) > 0 then
            perform mq_emit('events', 'message.superseded',
                jsonb_build_object('messageId', s, 'userId', p_user_id, 'agentId', p_agent_id,
                                   'supersededBy', v_row.id, 'reason', 'topic', 'topicKey', p_topic_key,
                                   'at', p_now),
                jsonb_build_object('userId', p_user_id::text, 'agentId', p_agent_id), p_now)
            from unnest(v_superseded) s;
            perform mq_log_action('superseded', p_user_id, s, null,
                jsonb_build_object('supersededBy', v_row.id, 'reason', 'topic', 'topicKey', p_topic_key),
                null, p_now)
            from unnest(v_superseded) s;
        end if;
    end if;
    perform mq_log_action('scheduled', p_user_id, v_row.id,
        jsonb_build_object('agentId', p_agent_id, 'priority', p_priority, 'canDelay', p_can_delay,
                           'parts', v_row.part_count, 'topicKey', p_topic_key,
                           'encoding', v_row.encoding, 'segments', v_row.segments),
        jsonb_build_object('scheduledFor', p_scheduled_for, 'reason', p_reason,
                           'superseded', to_jsonb(coalesce(v_superseded, '{}'))), null, p_now);
    return jsonb_build_object('created', true, 'message', mq_message_doc(v_row),
                              'superseded', to_jsonb(coalesce(v_superseded, '{}')));
end;
$$;


-- The rendered text of a queued message (see 20261203000006), with its encoding and segments.
create or replace function mq_record_render(
    p_message_id uuid, p_text text, p_usage jsonb, p_now timestamptz,
    p_encoding text default null, p_segments integer default null)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    update message_queue set final_message = p_text, encoding = p_encoding, segments = p_segments,
                             updated_at = p_now
    where id = p_message_id and status = 'queued'
    returning user_id into v_user_id;
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_log_model_call(v_user_id, p_message_id, 'rendered', p_usage,
        jsonb_build_object('length', char_length(p_text), 'encoding', p_encoding, 'segments', p_segments),
        null, p_now);
    return to_jsonb(true);
end;
$$;

-- The rendered text of one structured part of a queued sequence (see 20261203000006), with its
-- encoding and segments; the sequence's total follows.
create or replace function mq_record_part_render(
    p_message_id uuid, p_position integer, p_text text, p_usage jsonb, p_now timestamptz,
    p_encoding text default null, p_segments integer default null)
returns jsonb
language plpgsql as $$
declare
    v_user_id uuid;
begin
    select user_id into v_user_id from message_queue where id = p_message_id and status = 'queued' for update;
    if not found then
        return to_jsonb(false);
    end if;
    update message_parts set content = p_text, encoding = p_encoding, segments = p_segments
    where message_id = p_message_id and position = p_position and status = 'pending';
    if not found then
        return to_jsonb(false);
    end if;
    perform mq_sequence_segments(p_message_id);
    perform mq_log_model_call(v_user_id, p_message_id, 'rendered', p_usage,
        jsonb_build_object('length', char_length(p_text), 'part', p_position, 'encoding', p_encoding,
                           'segments', p_segments), null, p_now);
    return to_jsonb(true);
end;
$$;


-- What the account sent (or is sending) in the rolling window ending at p_now: messages, or their
-- segments (an uncounted one as 1).
create or replace function mq_account_used(p_now timestamptz, p_window interval, p_by_segments boolean)
returns integer
language sql stable as $$
    select case when p_by_segments then coalesce(sum(coalesce(segments, 1)), 0)::integer
                else count(*)::integer end
    from message_queue
    where status in ('sending', 'sent') and slot_at > p_now - p_window and slot_at <= p_now;
$$;

drop function if exists mq_account_window_free_at(timestamptz, interval, integer);

-- The earliest instant after which a rolling window of p_window ending then leaves room for
-- p_need under p_cap (the caller found it full at p_now; see 20261203000003): in messages as
-- before (p_need 1), or in segments, where sends leave the window oldest first until what stays
-- is at most p_cap - p_need (nothing, for a message larger than the cap).
create or replace function mq_account_window_free_at(
    p_now timestamptz, p_window interval, p_cap integer, p_need integer default 1,
    p_by_segments boolean default false)
returns timestamptz
language plpgsql stable as $$
begin
    if not p_by_segments then
        return (
            select coalesce(max(s.slot_at), p_now) + p_window
            from (select slot_at from message_queue
                  where status in ('sending', 'sent') and slot_at > p_now - p_window and slot_at <= p_now
                  order by slot_at
                  limit greatest(
                      (select count(*) from message_queue
                       where status in ('sending', 'sent') and slot_at > p_now - p_window and slot_at <= p_now)
                      - p_cap + 1, 1)) s);
    end if;
    return (
        select coalesce(min(w.slot_at) filter (where w.left_after <= greatest(p_cap - p_need, 0)), p_now)
               + p_window
        from (select s.slot_at,
                     sum(s.units) over () - sum(s.units) over (order by s.slot_at, s.id rows unbounded preceding)
                         as left_after
              from (select q.slot_at, q.id, coalesce(q.segments, 1) as units from message_queue q
                    where q.status in ('sending', 'sent') and q.slot_at > p_now - p_window
                      and q.slot_at <= p_now) s) w);
end;
$$;

-- Claim a queued message for sending (see 20261203000003), now with the account caps counted in
-- messages or, with p_account.unit = 'segments' (ACCOUNT_CAPS_UNIT), in SMS segments: Twilio
-- meters a sender's throughput in segments per second, and carriers bill segments. A message then
-- needs its segments free under each cap (1 while uncounted: a text the previous release stored);
-- one larger than a cap goes once that window is empty, so it is never held back for good. With
-- 'messages' (the default, and for the previous release's calls) every check is what it was.
--
-- The original description: Under the user's row lock it re-counts everything that was
-- sent or is being sent, so two deliveries racing for one user can never both pass a limit; the
-- claim itself (slot_at = p_now) counts as a send for every limit from here on. The user's limits
-- are counted in one statement; the checks and their reasons come in a fixed order.
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
    v_in_flight boolean;
    v_cooling boolean;
    v_hour integer;
    v_day integer;
    v_week integer;
    v_count integer;
    v_rank integer;
    v_ahead integer;
    v_higher integer;
    v_per_second integer;
    v_hourly integer;
    v_daily integer;
    v_retry timestamptz;
    v_by_segments boolean := false;
    v_need integer := 1;
begin
    -- Lock order everywhere: the user row, then the message rows. NO KEY UPDATE, not UPDATE: it
    -- still serialises claims per user, but does not block the KEY SHARE locks that foreign-key
    -- checks take (mq_record_sent holds the message row and inserts rows referencing the user).
    select u.id, coalesce(u.opted_out_at, u.undeliverable_at), u.notifications_enabled
    into v_user_id, v_blocked, v_enabled
    from message_queue q join users u on u.id = q.user_id
    where q.id = p_message_id
    for no key update of u;
    if not found then
        return jsonb_build_object('claimed', false, 'reason', 'not_found');
    end if;
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
    -- The user's limits in one pass over their slots, from the earliest window's start to the
    -- latest's end; each count keeps its own window. The in-flight check looks at every 'sending'
    -- row, however old: one whose lease ran out may still have reached Twilio, and until it is
    -- reconciled (the sweep, within a minute or two) nothing else goes out, so reconciliation never
    -- has to tell two in-doubt messages with the same text apart.
    select
        exists (select 1 from message_queue
                where user_id = v_user_id and status = 'sending' and id <> p_message_id),
        coalesce(bool_or(slot_at > p_now - make_interval(secs => p_cooldown_seconds) and slot_at <= p_now), false),
        count(*) filter (where slot_at > p_now - interval '1 hour' and slot_at <= p_now),
        count(*) filter (where slot_at >= p_day_start and slot_at < p_day_end),
        count(*) filter (where slot_at >= p_week_start and slot_at < p_week_end)
    into v_in_flight, v_cooling, v_hour, v_day, v_week
    from message_queue
    where user_id = v_user_id and status in ('sending', 'sent')
      and slot_at >= least(p_now - make_interval(secs => greatest(p_cooldown_seconds, 3600)),
                           p_day_start, coalesce(p_week_start, p_day_start))
      and slot_at <= greatest(p_now, p_day_end, coalesce(p_week_end, p_day_end));
    if v_in_flight then
        return jsonb_build_object('claimed', false, 'reason', 'in_flight', 'status', v_row.status);
    end if;
    if v_cooling then
        return jsonb_build_object('claimed', false, 'reason', 'cooldown', 'status', v_row.status);
    end if;
    if v_hour >= p_hourly_limit then
        return jsonb_build_object('claimed', false, 'reason', 'hourly_limit', 'status', v_row.status);
    end if;
    if v_day >= p_daily_cap then
        return jsonb_build_object('claimed', false, 'reason', 'daily_limit', 'status', v_row.status);
    end if;
    if p_weekly_cap is not null and v_week >= p_weekly_cap then
        return jsonb_build_object('claimed', false, 'reason', 'weekly_limit', 'status', v_row.status);
    end if;
    if p_account is not null then
        v_per_second := nullif(p_account ->> 'per_second', '')::integer;
        v_hourly := nullif(p_account ->> 'hourly', '')::integer;
        v_daily := nullif(p_account ->> 'daily', '')::integer;
        v_by_segments := coalesce(p_account ->> 'unit', 'messages') = 'segments';
    end if;
    if v_by_segments then
        v_need := coalesce(v_row.segments, 1);
    end if;
    if v_per_second is not null or v_hourly is not null or v_daily is not null then
        -- One account: its counts are only true while no other claim is counting.
        perform pg_advisory_xact_lock(727347002);
        v_rank := array_position(array['urgent', 'high', 'medium', 'low'], v_row.priority::text);
        if v_daily is not null then
            v_count := mq_account_used(p_now, interval '1 day', v_by_segments);
            if v_count > 0 and v_count + v_need > v_daily then
                return jsonb_build_object('claimed', false, 'reason', 'account_daily_limit', 'status', v_row.status,
                    'retry_at', mq_account_window_free_at(p_now, interval '1 day', v_daily, v_need, v_by_segments));
            end if;
        end if;
        if v_hourly is not null then
            v_count := mq_account_used(p_now, interval '1 hour', v_by_segments);
            if v_count > 0 and v_count + v_need > v_hourly then
                return jsonb_build_object('claimed', false, 'reason', 'account_hourly_limit', 'status', v_row.status,
                    'retry_at', mq_account_window_free_at(p_now, interval '1 hour', v_hourly, v_need, v_by_segments));
            end if;
        end if;
        if v_per_second is not null then
            -- Due messages ahead of this one: more important, or as important and due earlier. Capped:
            -- beyond a few thousand the spread is only an estimate anyway. In segments, by segments.
            select coalesce(sum(case when v_by_segments then coalesce(a.segments, 1) else 1 end), 0)
            into v_ahead from (
                select q.segments from message_queue q
                where q.status = 'queued' and q.scheduled_for <= p_now and q.id <> p_message_id
                  and q.scheduled_for > p_now - interval '10 minutes'
                  and (array_position(array['urgent', 'high', 'medium', 'low'], q.priority::text) < v_rank
                       or (q.priority = v_row.priority
                           and (q.scheduled_for, q.created_at, q.id)
                               < (v_row.scheduled_for, v_row.created_at, v_row.id)))
                limit 10000) a;
            v_count := mq_account_used(p_now, interval '1 second', v_by_segments);
            -- While the account's throughput is contended, more important due messages take the
            -- remaining slots first (only then: a due message that is itself held up elsewhere must
            -- not hold back a quiet account).
            select coalesce(sum(case when v_by_segments then coalesce(h.segments, 1) else 1 end), 0)
            into v_higher from (
                select q.segments from message_queue q
                where q.status = 'queued' and q.scheduled_for <= p_now
                  and q.scheduled_for > p_now - interval '10 minutes'
                  and q.priority = any ((array['urgent', 'high', 'medium', 'low'])[1:v_rank - 1])
                limit v_per_second) h;
            if v_higher > 0 and v_count + v_higher + v_need > v_per_second then
                return jsonb_build_object('claimed', false, 'reason', 'account_priority', 'status', v_row.status,
                    'retry_at', p_now + make_interval(secs => greatest(1, ceil(v_ahead::numeric / v_per_second))));
            end if;
            if v_count > 0 and v_count + v_need > v_per_second then
                v_retry := mq_account_window_free_at(p_now, interval '1 second', v_per_second, v_need, v_by_segments)
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


call close_public_api();
