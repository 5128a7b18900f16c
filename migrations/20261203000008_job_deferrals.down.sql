alter table web_conversation_messages drop column job_deferrals;
