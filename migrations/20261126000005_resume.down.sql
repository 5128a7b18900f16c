drop function authorized_connections_now(uuid, uuid);
alter table web_conversation_messages
    drop constraint web_conversation_messages_user_status,
    drop constraint web_conversation_messages_streaming,
    drop constraint web_conversation_messages_seq_key,
    drop column cancel_requested,
    drop column producer,
    drop column status,
    drop column seq;
alter table web_conversations drop column last_seq;
