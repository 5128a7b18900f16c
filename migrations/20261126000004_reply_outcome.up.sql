-- How a reply ended and what it cost, as the `response` frame reports them: `stop_reason` is
-- `end`, `length` (the output cap), `cancelled` or `error`; the token counts are the
-- provider's, when it reports them. User messages have none of these.
alter table web_conversation_messages
    add column stop_reason text
        check (stop_reason in ('end', 'length', 'cancelled', 'error')),
    add column input_tokens integer check (input_tokens >= 0),
    add column output_tokens integer check (output_tokens >= 0),
    add constraint web_conversation_messages_outcome check (
        role = 'assistant' or (stop_reason is null and input_tokens is null and output_tokens is null)
    );
