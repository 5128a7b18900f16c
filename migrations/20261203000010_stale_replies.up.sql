-- No reply stays `streaming` once its producer is gone (invariant 9). Each write of a reply
-- records when it happened; the sweeper (a scheduled function, in its `app.sweep` scope) finds
-- replies still streaming whose producer has not written for longer than a job can run, and
-- ends them `failed`.
alter table web_conversation_messages add column written_at timestamptz not null default now();

create index web_conversation_messages_streaming_idx on web_conversation_messages (written_at)
    where status = 'streaming';

create policy stale_reply_sweep_read on web_conversation_messages for select
    using (status = 'streaming' and current_setting('app.sweep', true) = 'on');
