drop function write_reply(uuid, uuid, text, uuid, uuid, text, uuid, text, bigint, bigint);
drop function job_context(uuid, uuid, bigint, bigint);
drop function accept_message(text, float8, text, uuid, bigint, bigint, float8);
