-- A job the orchestrator received but could not start (too little of the invocation left, or
-- an earlier message of its conversation failed first) goes back to the queue at once. SQS
-- still counts that receive; the orchestrator counts it here, so that a deferral never uses up
-- one of a job's attempts: a job's attempt is its receive count less its deferrals.
alter table web_conversation_messages
    add column job_deferrals integer not null default 0;
