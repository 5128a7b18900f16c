-- A streaming reply's flush (several a second for every reply that streams) as one PL/pgSQL
-- function: behind a pooler statements are prepared unnamed, so this statement was planned again
-- at every flush, most of what it cost Postgres; the function keeps one generic plan per server
-- connection. It runs as the caller (row-level security holds), and its query takes a snapshot
-- of its own as the statement it replaces did.
--
-- Appends `delta` to the reply this attempt (`old_producer`) streams, if the row holds exactly
-- `offset_chars` characters; sets its status, producer, stop reason and usage; returns the
-- reply after the write (null when this attempt no longer owns it), the user's cancel flag and
-- the sockets that receive it now.
create function append_reply(
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
