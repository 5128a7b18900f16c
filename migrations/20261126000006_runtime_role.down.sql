alter default privileges in schema public
    revoke usage, select on sequences from konstruct_runtime;
alter default privileges in schema public
    revoke select, insert, update, delete on tables from konstruct_runtime;
revoke all on all sequences in schema public from konstruct_runtime;
revoke all on all tables in schema public from konstruct_runtime;
revoke usage on schema public from konstruct_runtime;
