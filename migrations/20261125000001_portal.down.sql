drop table channel_connections;
drop table agents;
drop table user_tenant_roles;
drop table portal_users;
drop table tenants;
drop function app_is_platform_admin();
drop function app_current_tenant();
