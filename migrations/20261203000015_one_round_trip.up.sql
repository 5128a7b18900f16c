-- The message path's other steps as PL/pgSQL functions, as append_reply (migration 14) made of
-- the stream's flush: each keeps one generic plan per server connection (behind a pooler a
-- statement is prepared unnamed and was planned again at every call), and each step is now one
-- function call, which the functions send with the scope's settings as one simple query: one
-- round trip and one transaction (db::Db::call). Their bodies are the statements they replace,
-- word for word; they run as the caller, so row-level security holds as before.

-- The message route's step: counts the message in the socket's rate window and the user's,
-- checks the socket and its user, and stores the message (see message_path::accept).
create function accept_message(
    p_connection text, p_window_seconds float8, p_text text, p_client_message_id uuid,
    p_connection_limit bigint, p_user_limit bigint, p_user_window_seconds float8)
    returns table (conversation_id uuid, tenant_id uuid, user_id uuid, fresh boolean,
                   conversation_exists boolean, permitted boolean, window_messages integer,
                   user_messages bigint, message_id uuid, created_at timestamptz, seq bigint,
                   created boolean, others jsonb)
    language plpgsql volatile
    set plan_cache_mode = force_generic_plan
    as $$
    #variable_conflict use_column
    begin
        return query
        with connection as (
            update ws_connections set
                window_messages = case when window_started_at > now() - make_interval(secs => $2)
                                       then window_messages + 1 else 1 end,
                window_started_at = case when window_started_at > now() - make_interval(secs => $2)
                                         then window_started_at else now() end,
                last_seen_at = now()
            where connection_id = $1
            returning conversation_id, tenant_id, user_id, role, expires_at, window_messages
        ), checked as (
            select c.conversation_id, c.tenant_id, c.user_id, c.window_messages,
                   coalesce(c.expires_at > now(), false) as fresh,
                   exists (select 1 from web_conversations v
                           where v.id = c.conversation_id and v.tenant_id = c.tenant_id)
                       as conversation_exists,
                   exists (select 1 from authorized_connections(c.tenant_id, c.conversation_id) a
                           where a.connection_id = $1) as permitted,
                   (select count(*) from web_conversation_messages m
                    where m.tenant_id = c.tenant_id and m.author_id = c.user_id
                      and m.role = 'user'
                      and m.created_at > now() - make_interval(secs => $7)) as user_messages
            from connection c
        ), locked as (
            select v.id, v.last_seq
            from web_conversations v join checked k on v.id = k.conversation_id
            where k.conversation_exists and k.permitted and k.window_messages <= $5
              and k.user_messages < $6
            for no key update of v
        ), inserted as (
            insert into web_conversation_messages
                (conversation_id, tenant_id, role, content, client_message_id, seq, author_id)
            select k.conversation_id, k.tenant_id, 'user', $3, $4, l.last_seq + 1, k.user_id
            from checked k join locked l on l.id = k.conversation_id
            on conflict (conversation_id, client_message_id) do nothing
            returning id, conversation_id, tenant_id, created_at, seq
        ), touched as (
            update web_conversations v set updated_at = i.created_at, last_seq = i.seq
            from inserted i where v.id = i.conversation_id
        ), earlier as (
            select m.id, m.created_at, m.seq
            from web_conversation_messages m join checked k using (conversation_id)
            where $4::uuid is not null and m.client_message_id = $4
        )
        select k.conversation_id, k.tenant_id, k.user_id, k.fresh, k.conversation_exists,
               k.permitted, k.window_messages, k.user_messages,
               coalesce(i.id, e.id) as message_id,
               coalesce(i.created_at, e.created_at) as created_at,
               coalesce(i.seq, e.seq) as seq,
               i.id is not null as created,
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from inserted n, authorized_connections_now(n.tenant_id, n.conversation_id) w
                where w.connection_id <> $1) as others
        from checked k
        left join inserted i on true
        left join earlier e on i.id is null;
    end
    $$;

-- The orchestrator's read of everything one job needs (see message_path::load_job).
create function job_context(
    p_conversation uuid, p_message uuid, p_limit bigint, p_earlier_window bigint)
    returns table (conversation jsonb, agent jsonb, reply jsonb, history jsonb, recipients jsonb,
                   cancel_requested boolean, deferrals integer, earlier jsonb)
    language plpgsql stable
    set plan_cache_mode = force_generic_plan
    as $$
    #variable_conflict use_column
    begin
        return query
        select to_jsonb(c) as conversation,
               (select to_jsonb(a) from agents a
                where a.tenant_id = c.tenant_id and a.id = c.agent_id) as agent,
               (select to_jsonb(r) from web_conversation_messages r
                where r.conversation_id = c.id and r.reply_to = $2) as reply,
               (select coalesce(jsonb_agg(jsonb_build_object(
                               'id', h.id, 'role', h.role, 'content', h.content,
                               'by_someone_else', h.author_id is not null
                                                  and h.author_id <> c.user_id)
                           order by h.anchor_at, h.anchor_id, (h.role = 'assistant')), '[]')
                from (
                    select a.* from (
                        select m.*,
                               case when m.reply_to is null then m.created_at
                                    else (select q.created_at from web_conversation_messages q
                                          where q.id = m.reply_to)
                               end as anchor_at,
                               coalesce(m.reply_to, m.id) as anchor_id
                        from (
                            (select m.* from web_conversation_messages m
                             where m.conversation_id = $1
                               and (m.created_at, m.id) <= (upto.created_at, upto.id)
                             order by m.created_at desc, m.id desc
                             limit $3 * 2)
                            union all
                            (select m.* from web_conversation_messages m
                             where m.conversation_id = $1
                               and (m.created_at, m.id) > (upto.created_at, upto.id)
                               and m.reply_to is not null)
                        ) m
                        where m.reply_to is distinct from upto.id
                    ) a
                    where (a.anchor_at, a.anchor_id) <= (upto.created_at, upto.id)
                    order by a.anchor_at desc, a.anchor_id desc, (a.role = 'assistant') desc
                    limit $3
                ) h) as history,
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from live_connections(c.tenant_id, c.id) w) as recipients,
               coalesce(upto.cancel_requested, false) as cancel_requested,
               coalesce(upto.job_deferrals, 0) as deferrals,
               (select coalesce(jsonb_agg(e.id order by e.seq), '[]')
                from web_conversation_messages e
                where e.conversation_id = c.id and e.role = 'user'
                  and e.seq < upto.seq and e.seq >= upto.seq - $4
                  and not exists (select 1 from web_conversation_messages r
                                  where r.conversation_id = c.id and r.reply_to = e.id))
                   as earlier
        from web_conversations c
        left join web_conversation_messages upto on upto.conversation_id = c.id and upto.id = $2
        where c.id = $1;
    end
    $$;

-- A reply's first write (see message_path::write_reply).
create function write_reply(
    p_conversation uuid, p_tenant uuid, p_text text, p_reply_to uuid, p_id uuid, p_status text,
    p_producer uuid, p_stop_reason text, p_input_tokens bigint, p_output_tokens bigint)
    returns table (reply jsonb, created boolean, taken_over boolean, cancel_requested boolean,
                   recipients jsonb)
    language plpgsql volatile
    set plan_cache_mode = force_generic_plan
    as $$
    #variable_conflict use_column
    begin
        return query
        with locked as (
            select id, tenant_id, last_seq from web_conversations where id = $1
            for no key update
        ), existing as (
            select m.id from web_conversation_messages m
            where m.conversation_id = $1 and m.reply_to = $4
        ), taken as (
            update web_conversation_messages m
            set content = $3, status = $6, producer = $7, stop_reason = $8,
                input_tokens = $9, output_tokens = $10, written_at = now()
            from existing e, locked l
            where m.id = e.id and m.status = 'streaming'
            returning m.*
        ), inserted as (
            insert into web_conversation_messages
                (id, conversation_id, tenant_id, role, content, reply_to, seq, status, producer,
                 stop_reason, input_tokens, output_tokens)
            select $5, $1, $2, 'assistant', $3, $4, l.last_seq + 1, $6, $7, $8, $9, $10
            from locked l
            where not exists (select 1 from existing)
            on conflict (conversation_id, reply_to) do nothing
            returning *
        ), touched as (
            update web_conversations v set updated_at = i.created_at, last_seq = i.seq
            from inserted i where v.id = i.conversation_id
        )
        select coalesce((select to_jsonb(i) from inserted i),
                        (select to_jsonb(t) from taken t),
                        (select to_jsonb(m) from web_conversation_messages m
                         where m.conversation_id = $1 and m.reply_to = $4)) as reply,
               exists (select 1 from inserted) as created,
               exists (select 1 from taken) as taken_over,
               coalesce((select q.cancel_requested from web_conversation_messages q
                         where q.conversation_id = $1 and q.id = $4), false) as cancel_requested,
               (select coalesce(jsonb_agg(jsonb_build_object(
             'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
         from locked l, authorized_connections_now(l.tenant_id, l.id) w) as recipients;
    end
    $$;
