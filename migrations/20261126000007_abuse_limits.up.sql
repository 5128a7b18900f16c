-- Who wrote each user message: the conversation's owner, or a platform admin writing into a
-- customer's conversation (shown in history and marked in the agent's context). Older messages
-- were all their owner's.
alter table web_conversation_messages
    add column author_id uuid references portal_users (id) on delete set null;
update web_conversation_messages m set author_id = c.user_id
from web_conversations c
where m.role = 'user' and c.id = m.conversation_id;
alter table web_conversation_messages
    add constraint web_conversation_messages_author check (role = 'user' or author_id is null);

-- The per-user message rate counts a user's recent messages across all their sockets.
create index web_conversation_messages_author_idx
    on web_conversation_messages (tenant_id, author_id, created_at)
    where role = 'user';

-- The socket caps count a user's open sockets.
create index ws_connections_user_idx on ws_connections (tenant_id, user_id)
    where authenticated_at is not null;

-- Sockets that never authenticated carry no tenant. The sweeper (a scheduled function) closes
-- and forgets the ones past the deadline; its scope sees those rows and no other.
create index ws_connections_unauthenticated_idx on ws_connections (connected_at)
    where authenticated_at is null;
create policy unauthenticated_sweep_read on ws_connections for select
    using (authenticated_at is null and current_setting('app.sweep', true) = 'on');
create policy unauthenticated_sweep_delete on ws_connections for delete
    using (authenticated_at is null and current_setting('app.sweep', true) = 'on');
