alter table web_conversation_messages
    drop constraint web_conversation_messages_outcome,
    drop column output_tokens,
    drop column input_tokens,
    drop column stop_reason;
