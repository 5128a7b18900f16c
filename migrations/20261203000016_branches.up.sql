-- Branches (PROTOCOL §2 "Branches"): a conversation is a tree of messages. Every message names
-- the message it follows (`parent_id`); the conversation's current branch ends at `head_id`.
-- A user message names the reply its current request will store (`reply_id`, chosen when it is
-- stored, chosen again by a regenerate): a message sent before that reply started follows it
-- already, and a job writes exactly that reply, so each request is answered once (a
-- regenerate adds a sibling where "one reply per user message" stood).
--
-- `parent_id` has no foreign key: it may name a reply that has not started yet (its
-- `reply_id`). Deleting a conversation's messages deletes every branch at once.

alter table web_conversation_messages
    add column parent_id uuid,
    add column reply_id uuid,
    add constraint web_conversation_messages_reply_id_key unique (conversation_id, reply_id),
    add constraint web_conversation_messages_reply_id_role check (role = 'user' or reply_id is null);
alter table web_conversations add column head_id uuid;

alter table web_conversation_messages drop constraint web_conversation_messages_reply_to_key;
create index web_conversation_messages_reply_to_idx
    on web_conversation_messages (conversation_id, reply_to) where reply_to is not null;
create index web_conversation_messages_parent_idx
    on web_conversation_messages (conversation_id, parent_id);

-- What is stored is one line: each message follows the one before it, each reply right after
-- its user message (replies are numbered when they start, often after later messages).
alter table web_conversations no force row level security;
alter table web_conversation_messages no force row level security;
update web_conversation_messages m
set reply_id = coalesce((select r.id from web_conversation_messages r
                         where r.conversation_id = m.conversation_id and r.reply_to = m.id
                         order by r.seq limit 1), gen_random_uuid())
where m.role = 'user';
with line as (
    select m.id, m.role, m.reply_to, m.conversation_id,
           row_number() over (partition by m.conversation_id
                              order by coalesce(q.seq, m.seq), m.role = 'assistant', m.seq) as n
    from web_conversation_messages m
    left join web_conversation_messages q on q.id = m.reply_to
), linked as (
    select l.id,
           case when l.role = 'assistant' then l.reply_to
                when p.role = 'user' then p.reply_id
                else p.id end as parent_id
    from line l
    left join line b on b.conversation_id = l.conversation_id and b.n = l.n - 1
    left join web_conversation_messages p on p.id = b.id
)
update web_conversation_messages m set parent_id = k.parent_id from linked k where m.id = k.id;
update web_conversations c set head_id = (
    select m.id from web_conversation_messages m
    left join web_conversation_messages q on q.id = m.reply_to
    where m.conversation_id = c.id
    order by coalesce(q.seq, m.seq) desc, m.role = 'assistant' desc, m.seq desc
    limit 1);
alter table web_conversations force row level security;
alter table web_conversation_messages force row level security;

-- The path from `p_from` back towards the first message, `p_from` first (depth 1), at most
-- `p_limit` messages. A parent not stored yet is a reply that has not started: the path goes
-- on from the user message whose reply it will be.
create function branch_path(p_conversation uuid, p_from uuid, p_limit bigint)
    returns table (id uuid, depth integer)
    language sql stable
    set plan_cache_mode = force_generic_plan
    as $$
    with recursive up (id, parent_id, depth) as (
        select m.id, m.parent_id, 1 from web_conversation_messages m
        where m.conversation_id = p_conversation and m.id = p_from
        union all
        select n.id, n.parent_id, u.depth + 1
        from up u
        cross join lateral (
            select p.id, p.parent_id from web_conversation_messages p
            where p.conversation_id = p_conversation
              and (p.id = u.parent_id or (p.reply_id = u.parent_id and p.role = 'user'))
            order by p.id = u.parent_id desc
            limit 1
        ) n
        where u.parent_id is not null and u.depth < p_limit
    )
    select up.id, up.depth from up
    $$;

-- The newest message (largest seq) of the branches through `p_message`: the message itself
-- when nothing follows it. A head moved to a message shows what followed it.
create function newest_below(p_conversation uuid, p_message uuid)
    returns uuid
    language sql stable
    set plan_cache_mode = force_generic_plan
    as $$
    with recursive below (id, reply_id, seq) as (
        select m.id, m.reply_id, m.seq from web_conversation_messages m
        where m.conversation_id = p_conversation and m.id = p_message
        union
        select c.id, c.reply_id, c.seq
        from below b
        join web_conversation_messages c
          on c.conversation_id = p_conversation
         and (c.parent_id = b.id or c.parent_id = b.reply_id)
    )
    select id from below order by seq desc limit 1
    $$;

-- The conversation's head, and the id its reply will take when the head is a user message
-- whose reply has not started: what a `head` frame carries.
create function head_of(p_conversation uuid)
    returns table (head_id uuid, reply_id uuid)
    language sql stable
    as $$
    select c.head_id,
           (select h.reply_id from web_conversation_messages h
            where h.conversation_id = c.id and h.id = c.head_id and h.role = 'user'
              and not exists (select 1 from web_conversation_messages r
                              where r.conversation_id = c.id and r.id = h.reply_id))
    from web_conversations c where c.id = p_conversation
    $$;

-- Moves the conversation's head to the newest message through `p_message` (see
-- newest_below); null when that message is not in the conversation. Returns the new head and
-- the sockets to tell.
create function move_head(p_conversation uuid, p_message uuid)
    returns table (head_id uuid, reply_id uuid, recipients jsonb)
    language plpgsql volatile
    set plan_cache_mode = force_generic_plan
    as $$
    #variable_conflict use_column
    declare
        target uuid := newest_below(p_conversation, p_message);
    begin
        if target is null then
            return;
        end if;
        update web_conversations set head_id = target where id = p_conversation;
        return query
        select h.head_id, h.reply_id,
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from web_conversations c, authorized_connections_now(c.tenant_id, c.id) w
                where c.id = p_conversation)
        from head_of(p_conversation) h;
    end
    $$;

-- A message-like frame (`message`, `edit`, `regenerate`) from a socket: counts it in the
-- socket's rate window and reads what decides whether it is taken (the token unexpired, the
-- conversation there, the user still allowed, the user's recent messages). One place for what
-- accept_message and regenerate_reply check alike.
create function socket_frame(
    p_connection text, p_window_seconds float8, p_user_window_seconds float8)
    returns table (conversation_id uuid, tenant_id uuid, user_id uuid, fresh boolean,
                   conversation_exists boolean, permitted boolean, window_messages integer,
                   user_messages bigint)
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
            returning conversation_id, tenant_id, user_id, expires_at, window_messages
        )
        select c.conversation_id, c.tenant_id, c.user_id,
               coalesce(c.expires_at > now(), false) as fresh,
               exists (select 1 from web_conversations v
                       where v.id = c.conversation_id and v.tenant_id = c.tenant_id)
                   as conversation_exists,
               exists (select 1 from authorized_connections(c.tenant_id, c.conversation_id) a
                       where a.connection_id = $1) as permitted,
               c.window_messages,
               (select count(*) from web_conversation_messages m
                where m.tenant_id = c.tenant_id and m.author_id = c.user_id
                  and m.role = 'user'
                  and m.created_at > now() - make_interval(secs => $3)) as user_messages
        from connection c;
    end
    $$;

-- What a new message follows when the head is `p_head`: the head, or, while the head is a
-- user message whose reply has not started, that reply (by the id it will take).
create function next_parent(p_conversation uuid, p_head uuid)
    returns uuid
    language sql stable
    as $$
    select case when h.role = 'user' and not exists (
                    select 1 from web_conversation_messages r
                    where r.conversation_id = p_conversation and r.id = h.reply_id)
                then h.reply_id else h.id end
    from web_conversation_messages h
    where h.conversation_id = p_conversation and h.id = p_head
    $$;

-- The message route's step (migration 15's, which it replaces) for `message` and `edit`: a
-- new message follows the head (or, while the head's reply has not started, that reply); an
-- edit (`p_edit_of`) stands beside the message it edits, at most `p_max_siblings` of them. The
-- new message becomes the head.
drop function accept_message(text, float8, text, uuid, bigint, bigint, float8);
create function accept_message(
    p_connection text, p_window_seconds float8, p_text text, p_client_message_id uuid,
    p_connection_limit bigint, p_user_limit bigint, p_user_window_seconds float8,
    p_edit_of uuid, p_max_siblings bigint)
    returns table (conversation_id uuid, tenant_id uuid, user_id uuid, fresh boolean,
                   conversation_exists boolean, permitted boolean, window_messages integer,
                   user_messages bigint, edited_exists boolean, siblings bigint,
                   message_id uuid, created_at timestamptz, seq bigint, created boolean,
                   parent_id uuid, reply_id uuid, others jsonb)
    language plpgsql volatile
    set plan_cache_mode = force_generic_plan
    as $$
    #variable_conflict use_column
    begin
        return query
        with checked as (
            select * from socket_frame($1, $2, $7)
        ), edited as (
            select e.parent_id,
                   (select count(*) from web_conversation_messages s
                    where s.conversation_id = e.conversation_id and s.role = 'user'
                      and s.parent_id is not distinct from e.parent_id) as siblings
            from web_conversation_messages e join checked k using (conversation_id)
            where e.id = $8 and e.role = 'user'
        ), edit as (
            select $8::uuid is null or exists (select 1 from edited) as edited_exists,
                   coalesce((select e.siblings from edited e), 0) as siblings
        ), locked as (
            select v.id, v.last_seq, v.head_id
            from web_conversations v join checked k on v.id = k.conversation_id cross join edit d
            where k.conversation_exists and k.permitted and k.window_messages <= $5
              and k.user_messages < $6 and d.edited_exists and d.siblings < $9
            for no key update of v
        ), inserted as (
            insert into web_conversation_messages
                (conversation_id, tenant_id, role, content, client_message_id, seq, author_id,
                 parent_id, reply_id)
            select k.conversation_id, k.tenant_id, 'user', $3, $4, l.last_seq + 1, k.user_id,
                   case when $8::uuid is not null then (select e.parent_id from edited e)
                        else next_parent(l.id, l.head_id) end,
                   gen_random_uuid()
            from checked k join locked l on l.id = k.conversation_id
            on conflict (conversation_id, client_message_id) do nothing
            returning id, conversation_id, tenant_id, created_at, seq, parent_id, reply_id
        ), touched as (
            update web_conversations v
            set updated_at = i.created_at, last_seq = i.seq, head_id = i.id
            from inserted i where v.id = i.conversation_id
        ), earlier as (
            select m.id, m.created_at, m.seq, m.parent_id, m.reply_id
            from web_conversation_messages m join checked k using (conversation_id)
            where $4::uuid is not null and m.client_message_id = $4
        )
        select k.conversation_id, k.tenant_id, k.user_id, k.fresh, k.conversation_exists,
               k.permitted, k.window_messages, k.user_messages, d.edited_exists, d.siblings,
               coalesce(i.id, e.id) as message_id,
               coalesce(i.created_at, e.created_at) as created_at,
               coalesce(i.seq, e.seq) as seq,
               i.id is not null as created,
               case when i.id is not null then i.parent_id else e.parent_id end as parent_id,
               coalesce(i.reply_id, e.reply_id) as reply_id,
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from inserted n, authorized_connections_now(n.tenant_id, n.conversation_id) w
                where w.connection_id <> $1) as others
        from checked k
        cross join edit d
        left join inserted i on true
        left join earlier e on i.id is null;
    end
    $$;

-- `regenerate`: the socket checked and counted as `accept_message` does, then a new request
-- for user message `p_message`: its reply not started yet is stored empty and `cancelled`
-- (never started), one streaming stops at its next flush (its request is no longer current),
-- and the message takes a new `reply_id`; it becomes the head. At most `p_max_siblings`
-- replies per message.
create function regenerate_reply(
    p_connection text, p_window_seconds float8, p_message uuid, p_connection_limit bigint,
    p_user_limit bigint, p_user_window_seconds float8, p_max_siblings bigint)
    returns table (conversation_id uuid, tenant_id uuid, user_id uuid, fresh boolean,
                   conversation_exists boolean, permitted boolean, window_messages integer,
                   user_messages bigint, found boolean, siblings bigint, content text,
                   created_at timestamptz, reply_id uuid, recipients jsonb)
    language plpgsql volatile
    set plan_cache_mode = force_generic_plan
    as $$
    #variable_conflict use_column
    begin
        return query
        with checked as (
            select * from socket_frame($1, $2, $6)
        ), target as (
            select u.id, u.content, u.created_at, u.reply_id,
                   (select count(*) from web_conversation_messages r
                    where r.conversation_id = u.conversation_id and r.reply_to = u.id)
                       + case when exists (select 1 from web_conversation_messages r
                                           where r.conversation_id = u.conversation_id
                                             and r.id = u.reply_id)
                              then 0 else 1 end as siblings
            from web_conversation_messages u join checked c using (conversation_id)
            where u.id = $3 and u.role = 'user'
        ), asked as (
            select exists (select 1 from target) as found,
                   coalesce((select t.siblings from target t), 0) as siblings
        ), locked as (
            select v.id, v.tenant_id, v.last_seq
            from web_conversations v join checked k on v.id = k.conversation_id cross join asked f
            where k.conversation_exists and k.permitted and k.window_messages <= $4
              and k.user_messages < $5 and f.found and f.siblings < $7
            for no key update of v
        ), never_started as (
            insert into web_conversation_messages
                (id, conversation_id, tenant_id, role, content, reply_to, parent_id, seq,
                 status, stop_reason)
            select t.reply_id, l.id, l.tenant_id, 'assistant', '', t.id, t.id, l.last_seq + 1,
                   'cancelled', 'cancelled'
            from locked l cross join target t
            on conflict (id) do nothing
            returning seq
        ), renewed as (
            update web_conversation_messages u
            set reply_id = gen_random_uuid(), cancel_requested = false
            from locked l
            where u.conversation_id = l.id and u.id = $3
            returning u.reply_id
        ), touched as (
            update web_conversations v
            set head_id = $3,
                last_seq = coalesce((select s.seq from never_started s), v.last_seq)
            from locked l where v.id = l.id
        )
        select k.conversation_id, k.tenant_id, k.user_id, k.fresh, k.conversation_exists,
               k.permitted, k.window_messages, k.user_messages, f.found, f.siblings,
               t.content, t.created_at, (select n.reply_id from renewed n),
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from locked l, authorized_connections_now(l.tenant_id, l.id) w) as recipients
        from checked k
        cross join asked f
        left join target t on true;
    end
    $$;

-- The orchestrator's read (migration 15's): the reply is the job's request's (`p_reply`, or
-- the message's current one for a job queued before branches), and the context is the path
-- from the job's message back (branch_path), not every message by `seq`.
drop function job_context(uuid, uuid, bigint, bigint);
create function job_context(
    p_conversation uuid, p_message uuid, p_limit bigint, p_earlier_window bigint, p_reply uuid)
    returns table (conversation jsonb, agent jsonb, reply jsonb, reply_id uuid, history jsonb,
                   recipients jsonb, cancel_requested boolean, deferrals integer, earlier jsonb)
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
                where r.conversation_id = c.id and r.id = coalesce($5, upto.reply_id)) as reply,
               coalesce($5, upto.reply_id) as reply_id,
               (select coalesce(jsonb_agg(jsonb_build_object(
                               'id', h.id, 'role', h.role, 'content', h.content,
                               'by_someone_else', h.author_id is not null
                                                  and h.author_id <> c.user_id)
                           order by b.depth desc), '[]')
                from branch_path(c.id, upto.id, $3) b
                join web_conversation_messages h on h.conversation_id = c.id and h.id = b.id)
                   as history,
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from live_connections(c.tenant_id, c.id) w) as recipients,
               coalesce(upto.cancel_requested
                        or upto.reply_id is distinct from coalesce($5, upto.reply_id), false)
                   as cancel_requested,
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

-- A reply's first write (migration 15's): the reply is identified by its id (the request's),
-- follows its user message, and becomes the head when its user message is the head.
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
            where m.conversation_id = $1 and m.id = $5
        ), taken as (
            update web_conversation_messages m
            set content = $3, status = $6, producer = $7, stop_reason = $8,
                input_tokens = $9, output_tokens = $10, written_at = now()
            from existing e, locked l
            where m.id = e.id and m.status = 'streaming'
            returning m.*
        ), inserted as (
            insert into web_conversation_messages
                (id, conversation_id, tenant_id, role, content, reply_to, parent_id, seq, status,
                 producer, stop_reason, input_tokens, output_tokens)
            select $5, $1, $2, 'assistant', $3, $4, $4, l.last_seq + 1, $6, $7, $8, $9, $10
            from locked l
            where not exists (select 1 from existing)
            on conflict (id) do nothing
            returning *
        ), touched as (
            update web_conversations v
            set updated_at = i.created_at, last_seq = i.seq,
                head_id = case when v.head_id = i.reply_to then i.id else v.head_id end
            from inserted i where v.id = i.conversation_id
        )
        select coalesce((select to_jsonb(i) from inserted i),
                        (select to_jsonb(t) from taken t),
                        (select to_jsonb(m) from web_conversation_messages m
                         where m.conversation_id = $1 and m.id = $5)) as reply,
               exists (select 1 from inserted) as created,
               exists (select 1 from taken) as taken_over,
               coalesce((select q.cancel_requested or q.reply_id is distinct from $5
                         from web_conversation_messages q
                         where q.conversation_id = $1 and q.id = $4), false) as cancel_requested,
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from locked l, authorized_connections_now(l.tenant_id, l.id) w) as recipients;
    end
    $$;

-- A flush (migration 14's): a reply whose request is no longer its message's current one (a
-- regenerate) reads as cancelled, and stops at this flush.
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
               coalesce((select q.cancel_requested or q.reply_id is distinct from f.id
                         from web_conversation_messages q, flushed f
                         where q.conversation_id = p_conversation and q.id = f.reply_to), false),
               (select coalesce(jsonb_agg(jsonb_build_object(
                           'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                from locked l, authorized_connections_now(l.tenant_id, l.id) w);
    end
    $$;
