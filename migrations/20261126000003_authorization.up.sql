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

-- Whether a user, acting with a role, may see a conversation now: a platform admin always; anyone
-- else only as its owner while still a member of its tenant. Membership alone does not expose
-- another user's conversation. The same rule as `rbac::require_conversation_access`, in SQL so
-- the hot path can check it inside the statement it already runs. It runs as the caller
-- (no SECURITY DEFINER), so row-level security still bounds what it can read: call it in the
-- conversation's tenant scope.
create function conversation_access(conversation uuid, tenant uuid, member uuid, role text)
    returns boolean
    language sql stable
    as $$
        select role = 'platform_admin' or exists (
            select 1
            from web_conversations c
            join user_tenant_roles m on m.tenant_id = c.tenant_id and m.user_id = c.user_id
            where c.id = conversation and c.tenant_id = tenant and c.user_id = member
        )
    $$;

-- The sockets a conversation's frames may go to: authenticated, token not expired, user still
-- allowed. What every delivery lists, once per job.
create function authorized_connections(tenant uuid, conversation uuid)
    returns setof ws_connections
    language sql stable
    as $$
        select w.*
        from ws_connections w
        where w.tenant_id = tenant
          and w.conversation_id = conversation
          and w.expires_at > now()
          and conversation_access(w.conversation_id, w.tenant_id, w.user_id, w.role)
        order by w.connected_at, w.connection_id
    $$;
