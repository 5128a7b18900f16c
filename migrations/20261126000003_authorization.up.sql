-- A socket's authorization is not a one-time event (PROTOCOL §1, invariant 6): it lasts while
-- the token it authenticated with has not expired and its user may still see the conversation.
-- `auth` keeps the token's expiry on the connection row; the message route and every delivery
-- check both inside the statements they already run.
--
-- Rows bound before this migration have no expiry to keep: they are treated as expired, so
-- their sockets get `unauthenticated` on their next message and authenticate again.

alter table ws_connections add column expires_at timestamptz;
update ws_connections set expires_at = authenticated_at where authenticated_at is not null;
alter table ws_connections drop constraint ws_connections_binding;
alter table ws_connections add constraint ws_connections_binding check (
    (tenant_id is null) = (user_id is null)
    and (user_id is null) = (role is null)
    and (role is null) = (authenticated_at is null)
    and (authenticated_at is null) = (expires_at is null)
);

-- The sockets a conversation's frames may go to: authenticated, token not expired, and its user
-- still allowed to see the conversation: a platform admin always, anyone else only as its owner
-- while still a member of its tenant (membership alone does not expose another user's
-- conversation; the same rule as `rbac::require_conversation_access`). What every delivery
-- lists, once per job, and what the message route checks its own socket against.
--
-- It runs as the caller (no SECURITY DEFINER), so row-level security still bounds what it reads:
-- call it in the conversation's tenant scope. A single SELECT, so the planner inlines it into
-- the statement that calls it.
create function authorized_connections(tenant uuid, conversation uuid)
    returns setof ws_connections
    language sql stable
    as $$
        select w.*
        from ws_connections w
        join web_conversations c on c.id = w.conversation_id and c.tenant_id = w.tenant_id
        where w.tenant_id = tenant
          and w.conversation_id = conversation
          and w.authenticated_at is not null
          and w.expires_at > now()
          and (w.role = 'platform_admin'
               or (w.user_id = c.user_id
                   and exists (select 1 from user_tenant_roles m
                               where m.tenant_id = w.tenant_id and m.user_id = w.user_id)))
        order by w.connected_at, w.connection_id
    $$;
