-- The numbering in one place (PROTOCOL §2 "Resume"), and what storing a message does to its
-- conversation: the table does both, and no statement that stores a message names a number or
-- touches the conversation for it. `seq` is a message's place in its conversation, strictly
-- increasing and gap-free, in commit order.
--
-- Before an insert, `number_message` locks the conversation row (`for no key update`; a writer
-- that holds it already keeps it) and takes the row's `last_seq` + 1: concurrent writers of one
-- conversation queue up on that lock, and each reads the number the one before it committed.
-- After the insert, `message_stored` stores the number back and touches the conversation: its
-- `updated_at`, and its head (a user message becomes the head; a reply does when its user
-- message is the head and the reply is that message's current request, so the empty reply a
-- regenerate stores for a request that never started does not). It runs at the end of the
-- statement, after the statement's own updates: a trigger that updated the conversation row
-- before them would make a later update of it in the same statement fail (SQLSTATE 27000).
--
-- An insert that conflicts stores nothing and counts nothing, so no number is lost; a reset
-- deletes the messages and keeps `last_seq`, so numbering goes on after it. A statement stores
-- at most one message per conversation (a second would take the same number and fail on the
-- seq key).

create function number_message()
    returns trigger
    language plpgsql
    as $$
    declare
        last bigint;
    begin
        select c.last_seq into last from web_conversations c
        where c.id = new.conversation_id
        for no key update;
        new.seq := coalesce(last, 0) + 1;
        return new;
    end
    $$;

create function message_stored()
    returns trigger
    language plpgsql
    as $$
    begin
        update web_conversations c
        set last_seq = new.seq, updated_at = new.created_at,
            head_id = case
                when new.role = 'user' then new.id
                when c.head_id = new.reply_to and exists (
                    select 1 from web_conversation_messages q
                    where q.conversation_id = new.conversation_id and q.id = new.reply_to
                      and q.reply_id = new.id)
                    then new.id
                else c.head_id end
        where c.id = new.conversation_id;
        return null;
    end
    $$;

create trigger number_message before insert on web_conversation_messages
    for each row execute function number_message();
create trigger message_stored after insert on web_conversation_messages
    for each row execute function message_stored();

-- The message route's step (migration 16's, numbered and counted by the table) for `message` and `edit`: a
-- new message follows the head (or, while the head's reply has not started, that reply); an
-- edit (`p_edit_of`) stands beside the message it edits, at most `p_max_siblings` of them. The
-- new message becomes the head.
create or replace function accept_message(
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
            select v.id, v.head_id
            from web_conversations v join checked k on v.id = k.conversation_id cross join edit d
            where k.conversation_exists and k.permitted and k.window_messages <= $5
              and k.user_messages < $6 and d.edited_exists and d.siblings < $9
            for no key update of v
        ), inserted as (
            insert into web_conversation_messages
                (conversation_id, tenant_id, role, content, client_message_id, author_id,
                 parent_id, reply_id)
            select k.conversation_id, k.tenant_id, 'user', $3, $4, k.user_id,
                   case when $8::uuid is not null then (select e.parent_id from edited e)
                        else next_parent(l.id, l.head_id) end,
                   gen_random_uuid()
            from checked k join locked l on l.id = k.conversation_id
            on conflict (conversation_id, client_message_id) do nothing
            returning id, conversation_id, tenant_id, created_at, seq, parent_id, reply_id
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
-- replies per message. (Migration 16's, the new reply numbered and counted by the table.)
create or replace function regenerate_reply(
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
            select v.id, v.tenant_id
            from web_conversations v join checked k on v.id = k.conversation_id cross join asked f
            where k.conversation_exists and k.permitted and k.window_messages <= $4
              and k.user_messages < $5 and f.found and f.siblings < $7
            for no key update of v
        ), never_started as (
            insert into web_conversation_messages
                (id, conversation_id, tenant_id, role, content, reply_to, parent_id, status,
                 stop_reason)
            select t.reply_id, l.id, l.tenant_id, 'assistant', '', t.id, t.id, 'cancelled',
                   'cancelled'
            from locked l cross join target t
            on conflict (id) do nothing
        ), renewed as (
            update web_conversation_messages u
            set reply_id = gen_random_uuid(), cancel_requested = false
            from locked l
            where u.conversation_id = l.id and u.id = $3
            returning u.reply_id
        ), touched as (
            update web_conversations v
            set head_id = $3
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

-- A reply's first write (migration 16's, numbered and counted by the table): the reply is identified by
-- its id (the request's), follows its user message, and becomes the head when its user message
-- is the head.
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
            select id, tenant_id from web_conversations where id = $1
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
                (id, conversation_id, tenant_id, role, content, reply_to, parent_id, status,
                 producer, stop_reason, input_tokens, output_tokens)
            select $5, $1, $2, 'assistant', $3, $4, $4, $6, $7, $8, $9, $10
            from locked l
            where not exists (select 1 from existing)
            on conflict (id) do nothing
            returning *
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
