-- Resume and durable streams (PROTOCOL §2 "Resume", §3, invariant 7).
--
-- `seq`: every stored message's place in its conversation, strictly increasing and gap-free.
-- A writer locks the conversation row (`for no key update`), takes `last_seq + 1` from the
-- row's newest version and stores it back in the same statement, so concurrent writers of one
-- conversation queue up on that lock and commit in `seq` order.
--
-- `status`: a reply exists from its first streamed flush (`streaming`), grows with each flush,
-- and ends `complete`, `cancelled` or `failed`. `producer` names the attempt writing it: a
-- redelivered job takes a `streaming` reply over (new producer, text restarted), and a flush of
-- the attempt it replaced no longer matches.
--
-- `cancel_requested`: on a user message, the `cancel` frame's flag, which the next flush of its
-- reply reads in the statement it already runs.

alter table web_conversations add column last_seq bigint not null default 0;
alter table web_conversation_messages
    add column seq bigint,
    add column status text not null default 'complete'
        check (status in ('complete', 'streaming', 'cancelled', 'failed')),
    add column producer uuid,
    add column cancel_requested boolean not null default false;

-- Number what is stored, oldest first. The tables force row-level security on their owner too:
-- lifted for the backfill only, within this migration's transaction.
alter table web_conversations no force row level security;
alter table web_conversation_messages no force row level security;
update web_conversation_messages m set seq = n.seq
from (select id, row_number() over (partition by conversation_id order by created_at, id) as seq
      from web_conversation_messages) n
where m.id = n.id;
update web_conversations c set last_seq = n.last_seq
from (select conversation_id, max(seq) as last_seq from web_conversation_messages
      group by conversation_id) n
where c.id = n.conversation_id;
alter table web_conversations force row level security;
alter table web_conversation_messages force row level security;

alter table web_conversation_messages
    alter column seq set not null,
    add constraint web_conversation_messages_seq_key unique (conversation_id, seq),
    add constraint web_conversation_messages_streaming check (
        (status = 'streaming') = (producer is not null)
    ),
    add constraint web_conversation_messages_user_status check (
        role = 'assistant' or status = 'complete'
    );

-- The sockets that may receive a conversation's frames, read with a snapshot of its own: a
-- writer calls it after taking the conversation's lock, so it sees every `auth` committed
-- before (the rule `authorized_connections` states; VOLATILE keeps it from being inlined into
-- the calling statement's older snapshot).
create function authorized_connections_now(tenant uuid, conversation uuid)
    returns setof ws_connections
    language sql volatile
    as $$ select * from authorized_connections(tenant, conversation) $$;
