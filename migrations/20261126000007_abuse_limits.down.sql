drop policy unauthenticated_sweep_delete on ws_connections;
drop policy unauthenticated_sweep_read on ws_connections;
drop index ws_connections_unauthenticated_idx;
drop index ws_connections_user_idx;
drop index web_conversation_messages_author_idx;
alter table web_conversation_messages
    drop constraint web_conversation_messages_author,
    drop column author_id;
