create or replace function authorized_connections_now(tenant uuid, conversation uuid)
    returns setof ws_connections
    language sql volatile
    as $$ select * from authorized_connections(tenant, conversation) $$;

drop function live_connections(uuid, uuid);
alter table ws_connections drop column catching_up_since;
