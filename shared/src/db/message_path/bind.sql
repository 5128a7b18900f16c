-- `auth`'s one statement (`message_path::socket::bind`): the connection bound to the verified
-- caller when the conversation exists, the caller may see it, the caps on open sockets and the
-- windows of `auth` frames allow; the conversation row then locked `for share`.
-- $1 connection, $2 user, $3 role, $4 token expiry, $5 and $6 socket caps (per user, per
-- conversation), $7 and $8 the connection's window (frames, seconds), $9 and $10 the user's.
with target as (
    select w.connection_id, w.conversation_id, c.tenant_id,
           c.id is not null
           and ($3 = 'platform_admin'
                or (c.user_id = $2
                    and exists (select 1 from user_tenant_roles m
                                where m.tenant_id = c.tenant_id and m.user_id = $2)))
               as permitted
    from ws_connections w
    left join web_conversations c on c.id = w.conversation_id
    where w.connection_id = $1
), user_window as (
    insert into user_auth_windows as u (tenant_id, user_id, auths)
    select t.tenant_id, $2, 1 from target t where t.tenant_id is not null
    on conflict (tenant_id, user_id) do update set
        auths = case when u.window_started_at > now() - make_interval(secs => $10)
                     then u.auths + 1 else 1 end,
        window_started_at = case
            when u.window_started_at > now() - make_interval(secs => $10)
            then u.window_started_at else now() end
    returning u.auths
), counted as (
    -- Sockets open now (authenticated, token unexpired), this one aside.
    select
        (select case when w.auth_window_started_at > now() - make_interval(secs => $8)
                     then w.auth_frames + 1 else 1 end
         from ws_connections w where w.connection_id = $1) as window_frames,
        (select auths from user_window) as user_auths,
        (select count(*) from ws_connections o
         where o.tenant_id = t.tenant_id and o.user_id = $2 and o.connection_id <> $1
           and o.authenticated_at is not null and o.expires_at > now())
            as user_sockets,
        (select count(*) from ws_connections o
         where o.tenant_id = t.tenant_id and o.conversation_id = t.conversation_id
           and o.connection_id <> $1
           and o.authenticated_at is not null and o.expires_at > now())
            as conversation_sockets
    from target t
), bound as (
    update ws_connections w
    set tenant_id = t.tenant_id, user_id = $2, role = $3, expires_at = $4,
        authenticated_at = now(), last_seen_at = now(), catching_up_since = now(),
        auth_frames = n.window_frames,
        auth_window_started_at = case when n.window_frames = 1 then now()
                                      else w.auth_window_started_at end
    from target t, counted n
    where w.connection_id = t.connection_id and t.permitted
      and n.user_sockets < $5 and n.conversation_sockets < $6
      and n.window_frames <= $7::bigint and n.user_auths <= $9::bigint
    returning w.connection_id
), locked as (
    -- Writers of the conversation wait until this transaction ends (see `resume`).
    select v.id from web_conversations v join target t on v.id = t.conversation_id
    where t.permitted
    for share of v
)
select t.conversation_id, t.tenant_id, t.permitted, n.user_sockets,
       n.conversation_sockets, n.window_frames, n.user_auths,
       exists (select 1 from bound) and exists (select 1 from locked) as bound
from target t, counted n
