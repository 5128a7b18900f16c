-- Two database roles (PROTOCOL §4). The role that runs these migrations owns the schema; the
-- functions connect as a role that owns nothing and holds data privileges only, through the
-- group role `konstruct_runtime`. An owner could switch row-level security off
-- (`alter table … no force row level security`, `drop policy`); a role that owns nothing cannot.
--
-- The group role is created once per cluster by whoever creates the database (infra/README.md):
-- a migrator that may create roles could grant itself anything.
do $$
begin
    if not exists (select from pg_roles where rolname = 'konstruct_runtime') then
        raise exception 'role konstruct_runtime does not exist'
            using hint = 'create it first: create role konstruct_runtime nologin; '
                         'then grant it to the functions'' login role (infra/README.md)';
    end if;
end
$$;

grant usage on schema public to konstruct_runtime;
grant select, insert, update, delete on all tables in schema public to konstruct_runtime;
grant usage, select on all sequences in schema public to konstruct_runtime;
-- The migrations' own ledger is the migrator's alone.
revoke all on _sqlx_migrations from konstruct_runtime;
-- Tables and sequences later migrations create get the same grants.
alter default privileges in schema public
    grant select, insert, update, delete on tables to konstruct_runtime;
alter default privileges in schema public
    grant usage, select on sequences to konstruct_runtime;
-- Nobody but the owner creates objects here (the default from Postgres 15 on; older servers
-- let every role create in `public`).
revoke create on schema public from public;
