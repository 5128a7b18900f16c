grant select, insert, update, delete on all tables in schema public to konstruct_runtime;
revoke all on _sqlx_migrations from konstruct_runtime;
alter default privileges in schema public
    grant select, insert, update, delete on tables to konstruct_runtime;
