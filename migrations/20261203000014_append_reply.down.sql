drop function append_reply(uuid, uuid, uuid, bigint, text, text, uuid, text, bigint, bigint);
