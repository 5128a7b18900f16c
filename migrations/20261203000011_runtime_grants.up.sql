-- The runtime role gets, per table and per operation, what the functions do, no more
-- (`shared/src/db/grants.rs` lists it; a test compares). The portal's own tables (tenants,
-- users, memberships, agents, channel connections) are the portal's to write: the functions only read them, and
-- `portal_users`, which has no row-level security, can then not be changed through a bug here.
-- Conversations are created and touched, never deleted by the functions.
revoke insert, update, delete
    on tenants, portal_users, user_tenant_roles, agents, channel_connections
    from konstruct_runtime;
revoke delete on web_conversations from konstruct_runtime;
-- Tables of later migrations grant what they need themselves.
alter default privileges in schema public
    revoke insert, update, delete on tables from konstruct_runtime;
