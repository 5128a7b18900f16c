create or replace function authorized_connections_now(tenant uuid, conversation uuid)
    returns setof ws_connections
    language sql volatile
    as $$ select * from live_connections(tenant, conversation) $$;
