-- A request's reply ended `failed` (`message_path::reply::fail_reply`): a reply still streaming
-- keeps its text; when none was written, an empty `failed` one is stored.
-- $1 conversation, $2 the user message, $3 the reply's id, $4 only a reply unwritten since then
-- (the sweeper's; null: the job's own, which may store one).
with locked as (
    select id, tenant_id from web_conversations where id = $1
    for no key update
), ended as (
    update web_conversation_messages m
    set status = 'failed', stop_reason = 'error', producer = null, written_at = now()
    from locked l
    where m.conversation_id = l.id and m.id = $3 and m.status = 'streaming'
      and ($4::timestamptz is null or m.written_at < $4)
    returning m.*
), inserted as (
    insert into web_conversation_messages
        (id, conversation_id, tenant_id, role, content, reply_to, parent_id, status,
         stop_reason)
    select $3, l.id, l.tenant_id, 'assistant', '', $2, $2, 'failed', 'error'
    from locked l
    where $4::timestamptz is null
      and exists (select 1 from web_conversation_messages q
                  where q.conversation_id = l.id and q.id = $2 and q.role = 'user')
      and not exists (select 1 from web_conversation_messages r
                      where r.conversation_id = l.id and r.id = $3)
    on conflict (id) do nothing
    returning *
)
select coalesce((select to_jsonb(e) from ended e),
                (select to_jsonb(i) from inserted i)) as reply,
       (select coalesce(jsonb_agg(jsonb_build_object(
                   'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
        from locked l, authorized_connections_now(l.tenant_id, l.id) w) as recipients
