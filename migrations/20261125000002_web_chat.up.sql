-- The web channel: a portal user's conversation with one agent, its messages, and the open
-- WebSocket connections that show it.
--
-- Two more narrow keys beside the tenant (see the first migration for the mechanism). They exist
-- because the WebSocket routes learn a tenant only from the rows themselves:
--
--   app.current_conversation  makes exactly that one conversation row readable, so the auth
--                             route can learn its tenant and owner before checking them. It
--                             reveals nothing to a caller who does not already hold the id.
--   app.current_connection    makes exactly that one ws_connections row readable and writable.
--                             API Gateway issues the id and passes it to the route Lambdas, which
--                             must find the row before they know its tenant ($connect, message,
--                             $disconnect).

create function app_current_conversation() returns uuid
    language sql stable
    as $$ select nullif(current_setting('app.current_conversation', true), '')::uuid $$;

create function app_current_connection() returns text
    language sql stable
    as $$ select nullif(current_setting('app.current_connection', true), '') $$;

create table web_conversations (
    id         uuid primary key default gen_random_uuid(),
    tenant_id  uuid not null references tenants (id) on delete cascade,
    agent_id   uuid not null,
    user_id    uuid not null references portal_users (id) on delete cascade,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    -- One conversation per user and agent: what makes get-or-create safe under concurrency.
    constraint web_conversations_tenant_agent_user_key unique (tenant_id, agent_id, user_id),
    -- The agent must belong to the conversation's tenant.
    constraint web_conversations_agent_fkey foreign key (tenant_id, agent_id)
        references agents (tenant_id, id) on delete cascade,
    unique (tenant_id, id)
);
create index web_conversations_tenant_updated_idx on web_conversations (tenant_id, updated_at desc);
create index web_conversations_user_idx on web_conversations (user_id, updated_at desc);

-- created_at uses clock_timestamp() so that messages written in one transaction still order
-- by time; (created_at, id) is the total order the history cursor pages through.
create table web_conversation_messages (
    id                uuid primary key default gen_random_uuid(),
    conversation_id   uuid not null,
    tenant_id         uuid not null,
    role              text not null check (role in ('user', 'assistant')),
    content           text not null,
    -- The browser's id for a user message: a repeat of the same frame stores nothing new.
    client_message_id uuid,
    -- The user message an assistant message answers: at most one stored reply per user
    -- message, however often the job is redelivered.
    reply_to          uuid,
    created_at        timestamptz not null default clock_timestamp(),
    constraint web_conversation_messages_conversation_fkey foreign key (tenant_id, conversation_id)
        references web_conversations (tenant_id, id) on delete cascade,
    constraint web_conversation_messages_reply_to_fkey foreign key (conversation_id, reply_to)
        references web_conversation_messages (conversation_id, id) on delete cascade,
    constraint web_conversation_messages_client_message_id_key
        unique (conversation_id, client_message_id),
    constraint web_conversation_messages_reply_to_key unique (conversation_id, reply_to),
    constraint web_conversation_messages_role_fields check (
        (role = 'user' and reply_to is null) or (role = 'assistant' and client_message_id is null)
    ),
    unique (conversation_id, id)
);
create index web_conversation_messages_history_idx
    on web_conversation_messages (conversation_id, created_at, id);

-- One row per open WebSocket. Before `auth` a row knows only its conversation (taken from the
-- URL, not yet checked); `auth` binds the user, tenant and role. The composite foreign key is
-- not checked while tenant_id is NULL (MATCH SIMPLE) and cascades once it is set.
create table ws_connections (
    connection_id    text primary key check (char_length(connection_id) between 1 and 128),
    conversation_id  uuid not null,
    tenant_id        uuid,
    user_id          uuid references portal_users (id) on delete cascade,
    role             text check (role in ('platform_admin', 'customer_admin', 'customer_operator')),
    -- The connection-management endpoint that can reach this socket
    -- (https://{api-id}.execute-api.{region}.amazonaws.com/{stage}, or the local gateway).
    endpoint         text not null,
    connected_at     timestamptz not null default now(),
    authenticated_at timestamptz,
    last_seen_at     timestamptz not null default now(),
    -- A fixed-window rate limit per connection, kept here because route Lambdas share nothing
    -- else: the window's start and how many messages it has seen.
    window_started_at timestamptz not null default now(),
    window_messages   integer not null default 0,
    constraint ws_connections_conversation_fkey foreign key (tenant_id, conversation_id)
        references web_conversations (tenant_id, id) on delete cascade,
    constraint ws_connections_binding check (
        (tenant_id is null) = (user_id is null)
        and (user_id is null) = (role is null)
        and (role is null) = (authenticated_at is null)
    )
);
create index ws_connections_conversation_idx on ws_connections (tenant_id, conversation_id)
    where authenticated_at is not null;

alter table web_conversations enable row level security;
alter table web_conversations force row level security;
create policy tenant_isolation on web_conversations
    using (tenant_id = app_current_tenant()) with check (tenant_id = app_current_tenant());
create policy platform_admin_read on web_conversations for select using (app_is_platform_admin());
create policy conversation_key_read on web_conversations for select
    using (id = app_current_conversation());

alter table web_conversation_messages enable row level security;
alter table web_conversation_messages force row level security;
create policy tenant_isolation on web_conversation_messages
    using (tenant_id = app_current_tenant()) with check (tenant_id = app_current_tenant());
create policy platform_admin_read on web_conversation_messages for select
    using (app_is_platform_admin());

alter table ws_connections enable row level security;
alter table ws_connections force row level security;
create policy tenant_isolation on ws_connections
    using (tenant_id = app_current_tenant()) with check (tenant_id = app_current_tenant());
create policy connection_key on ws_connections
    using (connection_id = app_current_connection())
    with check (connection_id = app_current_connection());
