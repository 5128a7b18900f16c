drop function authorized_connections(uuid, uuid);
alter table ws_connections drop constraint ws_connections_binding;
alter table ws_connections add constraint ws_connections_binding check (
    (tenant_id is null) = (user_id is null)
    and (user_id is null) = (role is null)
    and (role is null) = (authenticated_at is null)
);
alter table ws_connections drop column expires_at;
