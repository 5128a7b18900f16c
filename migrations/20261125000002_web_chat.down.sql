drop table ws_connections;
drop table web_conversation_messages;
drop table web_conversations;
drop function app_current_connection();
drop function app_current_conversation();
