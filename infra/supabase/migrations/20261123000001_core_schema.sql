-- Core schema of the message orchestrator. Names follow the system this replaces (seed documents),
-- with the columns exactly-once delivery needs added. Times are timestamptz; nothing here reads the
-- database clock to decide anything: callers pass the current time in. gen_random_uuid() is built in
-- since PostgreSQL 13 (no pgcrypto needed).


create table if not exists users (
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
    opted_out_at        timestamptz,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now()
);

create table if not exists conversations (
    id              uuid primary key default gen_random_uuid(),
    user_id         uuid not null references users (id) on delete cascade,
    status          text not null default 'active'
                    constraint conversations_status check (status in ('active', 'closed')),
    last_message_at timestamptz,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);
create index if not exists conversations_user_active on conversations (user_id, status, created_at desc);

create table if not exists messages (
    id                 uuid primary key default gen_random_uuid(),
    conversation_id    uuid references conversations (id) on delete set null,
    user_id            uuid not null references users (id) on delete cascade,
    direction          text not null constraint messages_direction check (direction in ('inbound', 'outbound')),
    content            text not null default '',
    status             text not null default 'sent'
                       constraint messages_status check (status in (
                           'pending', 'received', 'queued', 'sending', 'sent', 'delivered',
                           'undelivered', 'failed')),
    twilio_message_sid text unique,
    error_code         text,
    message_queue_id   uuid,
    sent_at            timestamptz,
    delivered_at       timestamptz,
    created_at         timestamptz not null default now()
);
-- The "user is active" exception reads the newest inbound message of a user.
create index if not exists messages_user_direction_created on messages (user_id, direction, created_at desc);

create table if not exists message_queue (
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
    -- added for this design
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
    constraint message_queue_sending_has_claim check (
        status <> 'sending' or (claim_token is not null and lease_expires_at is not null and slot_at is not null)),
    constraint message_queue_sent_has_sid check (status <> 'sent' or sent_at is not null)
);
-- Due scan (the sweep): queued rows by time, priority first among equals.
create index if not exists message_queue_due on message_queue (scheduled_for, priority) where status = 'queued';
-- Per-user history for the limits: what was sent or is being sent, by slot time.
create index if not exists message_queue_user_slots on message_queue (user_id, slot_at)
    where status in ('sending', 'sent');
-- Per-user reservations.
create index if not exists message_queue_user_queued on message_queue (user_id, scheduled_for)
    where status = 'queued';
create index if not exists message_queue_sending_lease on message_queue (lease_expires_at) where status = 'sending';
create unique index if not exists message_queue_idempotency on message_queue (agent_id, idempotency_key)
    where idempotency_key is not null;

create table if not exists user_message_budget (
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

create table if not exists agent_actions_log (
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
create index if not exists agent_actions_log_message on agent_actions_log (message_id, created_at);
