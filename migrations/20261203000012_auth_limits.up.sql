-- `auth` frames count against limits as messages do, with the same numbers (PROTOCOL §2, costs
-- and limits): per connection in a window of its own beside the messages' (a client that sends
-- its limit of messages after authenticating is not refused for it), per user in a fixed window
-- kept here, one row per user and tenant.
alter table ws_connections
    add column auth_window_started_at timestamptz not null default now(),
    add column auth_frames integer not null default 0;

create table user_auth_windows (
    tenant_id         uuid not null references tenants (id) on delete cascade,
    user_id           uuid not null references portal_users (id) on delete cascade,
    window_started_at timestamptz not null default now(),
    auths             integer not null default 0,
    primary key (tenant_id, user_id)
);

alter table user_auth_windows enable row level security;
alter table user_auth_windows force row level security;
create policy tenant_isolation on user_auth_windows
    using (tenant_id = app_current_tenant()) with check (tenant_id = app_current_tenant());

grant select, insert, update on user_auth_windows to konstruct_runtime;
