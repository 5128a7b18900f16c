-- `auth` posts what a socket is owed (`auth_ok`, the replay, the text of a reply in progress)
-- after its transaction commits: no transaction stays open across a network call (PROTOCOL §2,
-- costs and limits). Until the socket has caught up, writers leave it out of their recipients,
-- so no live frame overtakes what it is owed; `auth` reads what was stored meanwhile, and
-- marks the socket live in the same transaction that finds nothing more to send.
alter table ws_connections add column catching_up_since timestamptz;

-- The authorized sockets that take live frames. A socket whose `auth` died while catching up
-- is not left deaf: after a minute (longer than the auth route's timeout) it counts as live.
create function live_connections(tenant uuid, conversation uuid)
    returns setof ws_connections
    language sql stable
    as $$
        select * from authorized_connections(tenant, conversation)
        where catching_up_since is null or catching_up_since < now() - interval '1 minute'
    $$;

create or replace function authorized_connections_now(tenant uuid, conversation uuid)
    returns setof ws_connections
    language sql volatile
    as $$ select * from live_connections(tenant, conversation) $$;
