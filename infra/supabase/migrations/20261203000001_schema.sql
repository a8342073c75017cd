-- The message orchestrator's tables and indexes. Names follow the system this replaces (the seed
-- documents), with the columns exactly-once delivery needs added. Times are timestamptz; nothing
-- here reads the database clock to decide anything: the functions are told the current time
-- (p_now). gen_random_uuid() is built in since PostgreSQL 13 (no pgcrypto needed).
--
-- The functions are in the files that follow, by area: users and context, the queue (enqueue,
-- claim, record), the sweep, conversations and events, rendering. Each is defined once; a change
-- after the first deploy is a new migration file.


-- Users --------------------------------------------------------------------------------------------

-- Preferences (the fitness seed's notification_preferences, generalised):
--   notifications_enabled   false: only urgent messages go out (schedule answers 409
--                           notifications_disabled for the other lanes; queued ones fail so)
--   preferred_days          ISO weekdays 1 (Mon) .. 7 (Sun) in the user's timezone; NULL: any day
--   preferred_window_start  local time range [start, end) where medium and low messages land;
--   preferred_window_end    both NULL: no window; start > end wraps midnight; start = end: all day
--   weekly_limit            messages per local calendar week (Monday 00:00); NULL: the default
create table users (
    id                  uuid primary key default gen_random_uuid(),
    phone_number        text not null unique
                        constraint users_phone_e164 check (phone_number ~ '^\+[1-9][0-9]{6,14}$'),
    -- IANA name; validated by the application (zoneinfo), which is what computes local times.
    timezone            text not null default 'UTC',
    quiet_hours_start   time,              -- NULL: the global default (22:00)
    quiet_hours_end     time,              -- NULL: the global default (08:00); start = end: none
    quiet_hours_enabled boolean not null default true,
    daily_limit         integer constraint users_daily_limit_positive check (daily_limit >= 1),
    hourly_limit        integer constraint users_hourly_limit_positive check (hourly_limit >= 1),
    poc_agent_type      text,
    opted_out_at        timestamptz,       -- STOP; START clears it
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now(),
    -- Twilio said the number cannot receive SMS (30005/30006/21610/21614): never sent to again.
    undeliverable_at    timestamptz,
    undeliverable_reason text,
    notifications_enabled boolean not null default true,
    preferred_days      smallint[]
                        constraint users_preferred_days_iso check (preferred_days <@ array[1, 2, 3, 4, 5, 6, 7]::smallint[]),
    preferred_window_start time,
    preferred_window_end   time,
    weekly_limit        integer constraint users_weekly_limit_positive check (weekly_limit >= 1)
);


-- Conversations and their messages ------------------------------------------------------------------

create table conversations (
    id              uuid primary key default gen_random_uuid(),
    user_id         uuid not null references users (id) on delete cascade,
    status          text not null default 'active'
                    constraint conversations_status check (status in ('active', 'closed')),
    last_message_at timestamptz,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);
create index conversations_user_active on conversations (user_id, status, created_at desc);

create table messages (
    id                 uuid primary key default gen_random_uuid(),
    conversation_id    uuid references conversations (id) on delete set null,
    user_id            uuid not null references users (id) on delete cascade,
    direction          text not null constraint messages_direction check (direction in ('inbound', 'outbound')),
    content            text not null default '',
    status             text not null default 'sent'
                       constraint messages_status check (status in (
                           'pending', 'received', 'queued', 'sending', 'sent', 'delivered',
                           'undelivered', 'failed')),
    twilio_message_sid text unique,       -- deduplicates Twilio's webhooks; a sid is one send
    error_code         text,
    message_queue_id   uuid,
    sent_at            timestamptz,
    delivered_at       timestamptz,
    created_at         timestamptz not null default now()
);
-- The "user is active" exception reads the newest inbound message of a user.
create index messages_user_direction_created on messages (user_id, direction, created_at desc);


-- The queue ------------------------------------------------------------------------------------------

-- One row per scheduled message. A sequence (one agent turn sent as 2 to 5 SMS parts) is ONE row
-- too: it is planned, claimed, counted toward every limit and budget once, and finishes 'sent' when
-- its last part went out; its parts are in message_parts.
create table message_queue (
    id                       uuid primary key default gen_random_uuid(),
    user_id                  uuid not null references users (id) on delete cascade,
    agent_id                 varchar(100) not null,
    message_data             jsonb not null,
    final_message            text,
    scheduled_for            timestamptz not null,
    priority                 varchar(20) not null default 'medium'
                             constraint message_queue_priority check (priority in ('urgent', 'high', 'medium', 'low')),
    status                   varchar(50) not null default 'queued'
                             constraint message_queue_status check (status in (
                                 'queued', 'sending', 'sent', 'failed', 'superseded', 'cancelled', 'expired')),
    requires_fresh_context   boolean not null default false,
    superseded_by_message_id uuid,
    superseded_reason        text,
    conversation_context_id  uuid,
    sent_at                  timestamptz,
    delivered_message_id     uuid references messages (id),
    created_at               timestamptz not null default now(),
    -- The seed's columns end here; the rest is what this design needs.
    can_delay                boolean not null default true,
    idempotency_key          text,
    request_hash             text,
    attempts                 integer not null default 0,
    last_error               text,
    reason                   text,          -- the last policy or failure reason code
    expires_at               timestamptz,
    task_generation          integer not null default 0,  -- bumps on each re-plan; names the task
    claim_token              uuid,          -- set while 'sending'
    lease_expires_at         timestamptz,   -- a 'sending' claim past this is presumed dead
    slot_at                  timestamptz,   -- the instant this message counts at for every limit
    twilio_message_sid       text,
    updated_at               timestamptz not null default now(),
    topic_key                text,          -- a newer message on the topic supersedes the older queued ones
    part_count               integer not null default 0  -- 0: one SMS; 2..5: a sequence
                             constraint message_queue_part_count check (part_count = 0 or part_count between 2 and 5),
    render_attempts          integer not null default 0,
    constraint message_queue_sending_has_claim check (
        status <> 'sending' or (claim_token is not null and lease_expires_at is not null and slot_at is not null)),
    constraint message_queue_sent_has_sid check (status <> 'sent' or sent_at is not null)
)
-- Statistics kept fresh by row count rather than by share of the table: a busy day on a big table
-- is less than the 10% of changes that would trigger ANALYZE by default.
with (autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 5000);

-- Due scan (the sweep): queued rows by time, priority first among equals.
create index message_queue_due on message_queue (scheduled_for, priority) where status = 'queued';
-- Due messages by lane, for "a more important message is due" (one index probe).
create index message_queue_due_by_lane on message_queue (priority, scheduled_for) where status = 'queued';
-- Per-user history for the limits: what was sent or is being sent, by slot time.
create index message_queue_user_slots on message_queue (user_id, slot_at) where status in ('sending', 'sent');
-- Every row's slot time, for the account-wide caps. Without a predicate on purpose: PostgreSQL
-- reads the real newest value of a column from a btree index whose first column it is, but only
-- from an index without one. A window of the last hours then is estimated from what is really
-- there, not from a histogram that ends at the last ANALYZE, and the planner does not mistake this
-- index for the user's (message_queue_user_slots) when it counts one user's sends of the day.
create index message_queue_slot_at on message_queue (slot_at);
-- Per-user reservations.
create index message_queue_user_queued on message_queue (user_id, scheduled_for) where status = 'queued';
create index message_queue_sending_lease on message_queue (lease_expires_at) where status = 'sending';
create unique index message_queue_idempotency on message_queue (agent_id, idempotency_key)
    where idempotency_key is not null;
-- What went out in the last day (health).
create index message_queue_sent_at on message_queue (sent_at) where status = 'sent';
-- The sweep picks overdue rows untouched the longest first: a row it has just re-tasked
-- (updated_at = now) is out of the scanned range, so a large backlog is not walked again per batch.
create index message_queue_queued_touched on message_queue (updated_at) where status = 'queued';
create index message_queue_queued_expiry on message_queue (expires_at)
    where status = 'queued' and expires_at is not null;
-- A newer message on the same topic replaces the agent's older queued ones (mq_enqueue).
create index message_queue_topic on message_queue (user_id, agent_id, topic_key)
    where status = 'queued' and topic_key is not null;

-- A sequence's parts go out in position order; each is recorded the moment Twilio accepts it, so a
-- part that went out is never sent again, whatever fails after it. A structured part (like
-- messageData without content) keeps its fields in part_data and content '' until a Renderer
-- writes the text (mq_record_part_render); no part is sent without it.
create table message_parts (
    message_id         uuid not null references message_queue (id) on delete cascade,
    position           integer not null constraint message_parts_position check (position between 1 and 5),
    content            text not null,
    delay_seconds      integer not null default 1
                       constraint message_parts_delay check (delay_seconds between 0 and 10),
    status             text not null default 'pending'
                       constraint message_parts_status check (status in ('pending', 'sent')),
    twilio_message_sid text,
    delivered_message_id uuid references messages (id),
    sent_at            timestamptz,
    part_data          jsonb,  -- a structured part's fields; content is '' until it is rendered
    primary key (message_id, position),
    constraint message_parts_sent_has_sid check (status <> 'sent' or twilio_message_sid is not null)
);


-- Records ---------------------------------------------------------------------------------------------

-- The seed's budget counter (increment_message_budget), keyed by the user's local calendar date.
create table user_message_budget (
    id                  uuid primary key default gen_random_uuid(),
    user_id             uuid references users (id) on delete cascade,
    date                date not null,   -- the user's local calendar date
    messages_sent       integer default 0,
    last_message_at     timestamptz,
    daily_limit         integer default 10,
    hourly_limit        integer default 2,
    quiet_hours_enabled boolean default true,
    created_at          timestamptz default now(),
    updated_at          timestamptz default now(),
    unique (user_id, date)
);

-- The orchestrator's decisions and model calls, for agents and operators (the seed's table).
create table agent_actions_log (
    id          uuid primary key default gen_random_uuid(),
    agent_type  text not null,
    action_type text not null,
    user_id     uuid,
    message_id  uuid,
    input_data  jsonb,
    output_data jsonb,
    error       text,
    latency_ms  integer,
    created_at  timestamptz not null default now()
);
create index agent_actions_log_message on agent_actions_log (message_id, created_at);

-- One row per sweep run (the health function reports the last).
create table sweep_runs (
    id          bigserial primary key,
    trigger     text not null,
    started_at  timestamptz not null,
    finished_at timestamptz not null,
    counts      jsonb not null default '{}'::jsonb,
    error       text
);
create index sweep_runs_finished on sweep_runs (finished_at desc);

-- Events for agents, written in the same transaction as the change they describe; published to
-- Pub/Sub after the commit and by the sweep until published (at least once, in order per key), so
-- a Pub/Sub outage never loses or blocks a change.
create table events_outbox (
    id           bigserial primary key,
    topic        text not null constraint events_outbox_topic check (topic in ('events', 'inbound')),
    event_type   text not null,
    payload      jsonb not null,
    attributes   jsonb not null default '{}'::jsonb,
    created_at   timestamptz not null,
    published_at timestamptz,
    attempts     integer not null default 0,
    lease_until  timestamptz,  -- a drain is publishing it; another drain leaves it alone until then
    last_error   text
);
create index events_outbox_pending on events_outbox (id) where published_at is null;
