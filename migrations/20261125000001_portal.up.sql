-- The portal's data model, carried over from the original system: tenants, the portal's users,
-- their roles per tenant, the tenants' agents and their channel connections.
--
-- Tenant isolation is enforced here, not only in application code. Every tenant-scoped table has
-- row-level security ENABLEd and FORCEd (the application role owns these tables, and owners skip
-- RLS unless it is forced). Policies read transaction-local settings that the application sets
-- with `select set_config(name, value, true)` at the start of each transaction, never with a
-- session-level SET, which would leak between pooled uses of one connection:
--
--   app.current_tenant   the tenant a transaction works in; unset means nothing is visible.
--   app.platform_admin   'on' only in a transaction opened for a verified platform_admin caller;
--                        it widens SELECT (never INSERT, UPDATE or DELETE) to every tenant, which
--                        is what the cross-tenant conversation list needs and nothing more.
--
-- A setting that was set once in a session reads as '' (not NULL) after its transaction ends,
-- hence the nullif before the cast.

create function app_current_tenant() returns uuid
    language sql stable
    as $$ select nullif(current_setting('app.current_tenant', true), '')::uuid $$;

create function app_is_platform_admin() returns boolean
    language sql stable
    as $$ select coalesce(current_setting('app.platform_admin', true), '') = 'on' $$;

create table tenants (
    id         uuid primary key default gen_random_uuid(),
    name       text not null check (char_length(name) between 1 and 200),
    created_at timestamptz not null default now()
);

-- Portal users exist across tenants (one login, several memberships), so this table is global;
-- what a user may see in a tenant is decided by user_tenant_roles, which is tenant-scoped.
create table portal_users (
    id         uuid primary key default gen_random_uuid(),
    email      text not null check (char_length(email) between 3 and 320),
    name       text not null default '',
    created_at timestamptz not null default now()
);
create unique index portal_users_email_key on portal_users (lower(email));

create table user_tenant_roles (
    user_id    uuid not null references portal_users (id) on delete cascade,
    tenant_id  uuid not null references tenants (id) on delete cascade,
    role       text not null check (role in ('customer_admin', 'customer_operator')),
    created_at timestamptz not null default now(),
    primary key (tenant_id, user_id)
);
create index user_tenant_roles_user_id_idx on user_tenant_roles (user_id);

create table agents (
    id            uuid primary key default gen_random_uuid(),
    tenant_id     uuid not null references tenants (id) on delete cascade,
    name          text not null check (char_length(name) between 1 and 200),
    system_prompt text not null default '',
    provider      text not null default 'echo' check (provider in ('echo', 'openai', 'bedrock')),
    model         text not null default '',
    settings      jsonb not null default '{}'::jsonb check (jsonb_typeof(settings) = 'object'),
    is_active     boolean not null default true,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    -- Lets other tables reference (tenant_id, id), so a row can only point at an agent of its
    -- own tenant.
    unique (tenant_id, id)
);

create table channel_connections (
    id           uuid primary key default gen_random_uuid(),
    tenant_id    uuid not null references tenants (id) on delete cascade,
    channel_type text not null check (channel_type in
        ('slack', 'whatsapp', 'mattermost', 'rocketchat', 'teams', 'telegram', 'signal', 'web')),
    workspace_id text not null,
    config       jsonb not null default '{}'::jsonb,
    created_at   timestamptz not null default now(),
    unique (channel_type, workspace_id)
);
create index channel_connections_tenant_id_idx on channel_connections (tenant_id);

alter table tenants enable row level security;
alter table tenants force row level security;
create policy tenant_isolation on tenants
    using (id = app_current_tenant()) with check (id = app_current_tenant());
create policy platform_admin_read on tenants for select using (app_is_platform_admin());

alter table user_tenant_roles enable row level security;
alter table user_tenant_roles force row level security;
create policy tenant_isolation on user_tenant_roles
    using (tenant_id = app_current_tenant()) with check (tenant_id = app_current_tenant());
create policy platform_admin_read on user_tenant_roles for select using (app_is_platform_admin());

alter table agents enable row level security;
alter table agents force row level security;
create policy tenant_isolation on agents
    using (tenant_id = app_current_tenant()) with check (tenant_id = app_current_tenant());
create policy platform_admin_read on agents for select using (app_is_platform_admin());

alter table channel_connections enable row level security;
alter table channel_connections force row level security;
create policy tenant_isolation on channel_connections
    using (tenant_id = app_current_tenant()) with check (tenant_id = app_current_tenant());
create policy platform_admin_read on channel_connections for select using (app_is_platform_admin());
