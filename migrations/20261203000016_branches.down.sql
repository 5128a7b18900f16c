-- Back to one line of messages: each user message keeps its newest reply (the others, and
-- what only they lead to, go), and migration 15's steps and 14's flush come back.
drop function regenerate_reply(text, float8, uuid, bigint, bigint, float8, bigint);
drop function move_head(uuid, uuid);
drop function head_of(uuid);
drop function newest_below(uuid, uuid);
drop function accept_message(text, float8, text, uuid, bigint, bigint, float8, uuid, bigint);
drop function next_parent(uuid, uuid);
drop function socket_frame(text, float8, float8);
drop function job_context(uuid, uuid, bigint, bigint, uuid);
drop function branch_path(uuid, uuid, bigint);

alter table web_conversation_messages no force row level security;
delete from web_conversation_messages r
where r.role = 'assistant'
  and exists (select 1 from web_conversation_messages s
              where s.conversation_id = r.conversation_id and s.reply_to = r.reply_to
                and s.seq > r.seq);
alter table web_conversation_messages force row level security;

drop index web_conversation_messages_parent_idx;
drop index web_conversation_messages_reply_to_idx;
alter table web_conversation_messages
    add constraint web_conversation_messages_reply_to_key unique (conversation_id, reply_to),
    drop constraint web_conversation_messages_reply_id_role,
    drop constraint web_conversation_messages_reply_id_key,
    drop column reply_id,
    drop column parent_id;
alter table web_conversations drop column head_id;

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

create or replace function write_reply(
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

create or replace function append_reply(
    p_conversation uuid, p_reply uuid, p_old_producer uuid, p_offset_chars bigint, p_delta text,
    p_status text, p_producer uuid, p_stop_reason text, p_input_tokens bigint,
    p_output_tokens bigint)
    returns table (reply jsonb, cancel_requested boolean, recipients jsonb)
    language plpgsql volatile
    set plan_cache_mode = force_generic_plan
    as $$
    #variable_conflict use_column
    begin
        return query
        with locked as (
            select c.id, c.tenant_id from web_conversations c where c.id = p_conversation
            for no key update
        ), flushed as (
            update web_conversation_messages m
            set content = m.content || p_delta, status = p_status, producer = p_producer,
                stop_reason = p_stop_reason, input_tokens = p_input_tokens,
                output_tokens = p_output_tokens, written_at = now()
            from locked l
            where m.conversation_id = l.id and m.id = p_reply and m.producer = p_old_producer
              and char_length(m.content) = p_offset_chars
            returning m.*
        )
        select (select to_jsonb(f) from flushed f),
               coalesce((select q.cancel_requested from web_conversation_messages q, flushed f
                         where q.conversation_id = p_conversation and q.id = f.reply_to), false),
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from locked l, authorized_connections_now(l.tenant_id, l.id) w);
    end
    $$;
