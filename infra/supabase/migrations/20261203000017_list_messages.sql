-- A user's queue (issue 18): GET /schedule_message/users/<userId>/messages lists a user's messages,
-- newest first, optionally only one status, agent or topic, and only the agents the caller may act
-- as. Paged by keyset on (created_at, id): a page starts strictly after the last row of the one
-- before, so rows scheduled meanwhile never shift a page (as OFFSET would) and nothing is listed
-- twice or skipped.

-- One user's rows newest first; the row comparison in mq_list_messages walks it backwards.
create index message_queue_user_created on message_queue (user_id, created_at, id);

-- p_agent_ids: the agents the caller may act as (null: every agent; an empty array: none, so an
-- empty page). p_before_created_at and p_before_id: the last row of the previous page (both null
-- for the first). At most p_limit rows, each as mq_get answers it without its timeline; null when
-- there is no such user.
create or replace function mq_list_messages(
    p_user_id uuid,
    p_limit integer,
    p_agent_ids text[] default null,
    p_status text default null,
    p_agent_id text default null,
    p_topic_key text default null,
    p_before_created_at timestamptz default null,
    p_before_id uuid default null)
returns jsonb
language plpgsql stable as $$
declare
    v_messages jsonb;
begin
    perform 1 from users where id = p_user_id;
    if not found then
        return null;
    end if;
    -- EXECUTE: planned for this call's arguments. A cached generic plan cannot tell which filters
    -- are null, underestimates the rows, and reads every older row of the user to sort them, where
    -- this plan walks the index back from the cursor and stops after a page.
    execute $q$
        select coalesce(jsonb_agg(mq_message_doc(q.msg) || jsonb_build_object('delivery', (
                   select jsonb_build_object('status', m.status, 'delivered_at', m.delivered_at,
                                             'error_code', m.error_code)
                   from messages m where m.twilio_message_sid = (q.msg).twilio_message_sid))
                   order by q.created_at desc, q.id desc), '[]'::jsonb)
        from (select r as msg, r.created_at, r.id from message_queue r
              where r.user_id = $1
                and ($2::text[] is null or r.agent_id = any ($2))
                and ($3::text is null or r.status = $3)
                and ($4::text is null or r.agent_id = $4)
                and ($5::text is null or r.topic_key = $5)
                -- The first page starts after a row newer than any: one condition for the index.
                and (r.created_at, r.id) < (coalesce($6, 'infinity'::timestamptz),
                                            coalesce($7, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
              order by r.created_at desc, r.id desc
              limit greatest($8, 0)) q
    $q$
    into v_messages
    using p_user_id, p_agent_ids, p_status, p_agent_id, p_topic_key, p_before_created_at, p_before_id,
          p_limit;
    return jsonb_build_object('messages', v_messages);
end;
$$;

call close_public_api();
