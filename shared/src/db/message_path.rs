//! The message path's steps, each one statement: a socket bound to its caller, a user message
//! accepted from it, what a job needs read, the reply stored. Every step also answers who may see the conversation
//! now, so no step needs a second query for it (STYLE 13: one round trip per step).
//!
//! Authorization lives in the SQL function `authorized_connections`
//! (migration `…_authorization`): a socket counts while its token has not expired and its user
//! is still the conversation's owner and a member of its tenant, or a platform admin.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgConnection;
use sqlx::types::Json;

use super::agents::Agent;
use super::conversations::Conversation;
use super::messages::{Message, MessageRole, StopReason, Usage};
use crate::Error;
use crate::domain::{
    ClientMessageId, ConnectionId, ConversationId, MessageId, MessageText, Role, TenantId, UserId,
};
use crate::error::ResultExt;

/// A socket that a conversation's frames may go to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, sqlx::FromRow)]
pub struct Recipient {
    pub connection_id: ConnectionId,
    /// The connection-management endpoint that reaches it.
    pub endpoint: String,
}

/// How many `message` frames one connection may send per window: at most `messages` per
/// `window_seconds` (read from the environment by `ws::RateLimit::from_env`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub messages: u32,
    pub window_seconds: u32,
}

/// A user message stored (or found stored, for a repeated `client_message_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub created_at: DateTime<Utc>,
    /// `false` when a message with this `client_message_id` was already stored.
    pub created: bool,
}

#[derive(sqlx::FromRow)]
struct AcceptRow {
    conversation_id: ConversationId,
    tenant_id: Option<TenantId>,
    user_id: Option<UserId>,
    fresh: bool,
    conversation_exists: bool,
    permitted: bool,
    window_messages: i32,
    message_id: Option<MessageId>,
    created_at: Option<DateTime<Utc>>,
    created: bool,
}

/// The message route's one statement, in a [`Scope::BoundConnection`](super::Scope) transaction:
/// counts the message in the connection's rate window, checks the socket is authenticated, its
/// token unexpired and its user still allowed, and stores the message only if all holds.
///
/// Refusals come back as the contract's errors: `unauthenticated` (no `auth` yet, or the token
/// expired), `not_found`, `forbidden`, `rate_limited`.
pub async fn accept(
    conn: &mut PgConnection,
    connection: &ConnectionId,
    text: &MessageText,
    client_message_id: Option<ClientMessageId>,
    limit: RateLimit,
) -> Result<Accepted, Error> {
    let row: Option<AcceptRow> = sqlx::query_as(
        "with connection as (
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
                            where a.connection_id = $1) as permitted
             from connection c
         ), inserted as (
             insert into web_conversation_messages
                 (conversation_id, tenant_id, role, content, client_message_id)
             select conversation_id, tenant_id, 'user', $3, $4 from checked
             where conversation_exists and permitted and window_messages <= $5
             on conflict (conversation_id, client_message_id) do nothing
             returning id, conversation_id, created_at
         ), touched as (
             update web_conversations v set updated_at = i.created_at
             from inserted i where v.id = i.conversation_id
         ), earlier as (
             select m.id, m.created_at
             from web_conversation_messages m join checked k using (conversation_id)
             where $4::uuid is not null and m.client_message_id = $4
         )
         select k.conversation_id, k.tenant_id, k.user_id, k.fresh, k.conversation_exists,
                k.permitted, k.window_messages,
                coalesce(i.id, e.id) as message_id,
                coalesce(i.created_at, e.created_at) as created_at,
                i.id is not null as created
         from checked k
         left join inserted i on true
         left join earlier e on i.id is null",
    )
    .bind(connection)
    .bind(f64::from(limit.window_seconds))
    .bind(text.as_str())
    .bind(client_message_id)
    .bind(i64::from(limit.messages))
    .fetch_optional(&mut *conn)
    .await?;

    let unauthenticated = || Error::Unauthenticated("send an auth frame first".into());
    let row = row.ok_or_else(unauthenticated)?;
    let (Some(tenant_id), Some(user_id)) = (row.tenant_id, row.user_id) else {
        return Err(unauthenticated());
    };
    if !row.fresh {
        return Err(Error::Unauthenticated(
            "your token has expired; send an auth frame with a fresh one".into(),
        ));
    }
    if !row.conversation_exists {
        return Err(Error::NotFound("the conversation no longer exists".into()));
    }
    if !row.permitted {
        return Err(Error::Forbidden(
            "you no longer have access to this conversation".into(),
        ));
    }
    if i64::from(row.window_messages) > i64::from(limit.messages) {
        return Err(Error::RateLimited(format!(
            "at most {} messages per {} seconds",
            limit.messages, limit.window_seconds
        )));
    }
    let (message_id, created_at) = match (row.message_id, row.created_at) {
        (Some(id), Some(at)) => (id, at),
        // A concurrent repeat of the same client_message_id committed after this statement's
        // snapshot was taken: it is stored, read it now.
        _ => {
            sqlx::query_as(
                "select id, created_at from web_conversation_messages
             where conversation_id = $1 and client_message_id = $2",
            )
            .bind(row.conversation_id)
            .bind(client_message_id)
            .fetch_one(conn)
            .await?
        }
    };
    Ok(Accepted {
        tenant_id,
        user_id,
        conversation_id: row.conversation_id,
        message_id,
        created_at,
        created: row.created,
    })
}

#[derive(sqlx::FromRow)]
struct BindRow {
    conversation_id: ConversationId,
    tenant_id: Option<TenantId>,
    permitted: bool,
    bound: bool,
}

/// `auth`'s one statement, in a [`Scope::ConnectingConnection`](super::Scope) transaction:
/// binds the verified caller to the connection until `expires_at`, if the conversation the
/// socket named exists and the caller may see it (its owner while a member of its tenant, or a
/// platform admin). Sent again with a fresh token, it renews the binding. Returns the
/// conversation.
///
/// Refusals: `not_found` (no such connection or conversation), `forbidden`.
pub async fn bind(
    conn: &mut PgConnection,
    connection: &ConnectionId,
    user_id: UserId,
    role: Role,
    expires_at: DateTime<Utc>,
) -> Result<ConversationId, Error> {
    let row: Option<BindRow> = sqlx::query_as(
        "with target as (
             select w.connection_id, w.conversation_id, c.tenant_id,
                    c.id is not null
                    and ($3 = 'platform_admin'
                         or (c.user_id = $2
                             and exists (select 1 from user_tenant_roles m
                                         where m.tenant_id = c.tenant_id and m.user_id = $2)))
                        as permitted
             from ws_connections w
             left join web_conversations c on c.id = w.conversation_id
             where w.connection_id = $1
         ), bound as (
             update ws_connections w
             set tenant_id = t.tenant_id, user_id = $2, role = $3, expires_at = $4,
                 authenticated_at = now(), last_seen_at = now()
             from target t
             where w.connection_id = t.connection_id and t.permitted
             returning w.connection_id
         )
         select t.conversation_id, t.tenant_id, t.permitted, exists (select 1 from bound) as bound
         from target t",
    )
    .bind(connection)
    .bind(user_id)
    .bind(role)
    .bind(expires_at)
    .fetch_optional(conn)
    .await?;
    let row = row.ok_or_else(|| Error::NotFound("this connection is not recorded".into()))?;
    if row.tenant_id.is_none() {
        return Err(Error::NotFound("no such conversation".into()));
    }
    if !(row.permitted && row.bound) {
        return Err(Error::Forbidden(
            "not your conversation, or not a member of its tenant".into(),
        ));
    }
    Ok(row.conversation_id)
}

/// What one job needs, read at once: the conversation, its agent, a reply already stored (a
/// redelivered job), the context the agent sees, and the sockets to send to.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub conversation: Conversation,
    /// `None` when the agent row is gone.
    pub agent: Option<Agent>,
    pub reply: Option<Message>,
    /// The conversation up to the job's message, its last `limit` messages oldest first, each
    /// reply right after the message it answers (a reply is often stored after later user
    /// messages arrived). Its last element is the job's message, unless that was deleted.
    ///
    /// The window is chosen among the newest `2 × limit` messages stored up to the job's
    /// message and the replies stored after it, so its cost does not grow with the
    /// conversation; only a backlog of more than `limit` unanswered messages could leave a
    /// reply stored late out of it.
    pub history: Vec<ContextMessage>,
    pub recipients: Vec<Recipient>,
}

/// A message of the context window: what the agent needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContextMessage {
    pub id: MessageId,
    pub role: MessageRole,
    pub content: String,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    conversation: Json<Conversation>,
    agent: Option<Json<Agent>>,
    reply: Option<Json<Message>>,
    history: Json<Vec<ContextMessage>>,
    recipients: Json<Vec<Recipient>>,
}

/// The orchestrator's read, in the tenant's scope; `None` when the conversation is gone.
pub async fn load_job(
    conn: &mut PgConnection,
    conversation_id: ConversationId,
    message_id: MessageId,
    limit: u16,
) -> Result<Option<JobContext>, Error> {
    let row: Option<JobRow> = sqlx::query_as(
        "select to_jsonb(c) as conversation,
                (select to_jsonb(a) from agents a
                 where a.tenant_id = c.tenant_id and a.id = c.agent_id) as agent,
                (select to_jsonb(r) from web_conversation_messages r
                 where r.conversation_id = c.id and r.reply_to = $2) as reply,
                (select coalesce(jsonb_agg(jsonb_build_object(
                                'id', h.id, 'role', h.role, 'content', h.content)
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
                 from authorized_connections(c.tenant_id, c.id) w) as recipients
         from web_conversations c
         left join web_conversation_messages upto on upto.conversation_id = c.id and upto.id = $2
         where c.id = $1",
    )
    .bind(conversation_id)
    .bind(message_id)
    .bind(i64::from(limit))
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|row| JobContext {
        conversation: row.conversation.0,
        agent: row.agent.map(|a| a.0),
        reply: row.reply.map(|r| r.0),
        history: row.history.0,
        recipients: row.recipients.0,
    }))
}

/// A reply stored, or the one stored before (`created: false`), and who gets it now.
#[derive(Debug, Clone)]
pub struct StoredReply {
    pub reply: Message,
    pub created: bool,
    pub recipients: Vec<Recipient>,
}

#[derive(sqlx::FromRow)]
struct ReplyRow {
    reply: Option<Json<Message>>,
    created: bool,
    recipients: Json<Vec<Recipient>>,
}

/// The orchestrator's write, in the tenant's scope: stores the agent's reply to `reply_to` at
/// most once and lists the conversation's recipients as they are now.
///
/// `id` is chosen by the caller so that `chunk` frames streamed before the reply is stored
/// already carry the id it will have.
pub async fn store_reply(
    conn: &mut PgConnection,
    conversation: &Conversation,
    id: MessageId,
    reply_to: MessageId,
    content: &str,
    stop: StopReason,
    usage: Option<Usage>,
) -> Result<StoredReply, Error> {
    let row: ReplyRow = sqlx::query_as(
        "with inserted as (
             insert into web_conversation_messages
                 (id, conversation_id, tenant_id, role, content, reply_to,
                  stop_reason, input_tokens, output_tokens)
             values ($5, $1, $2, 'assistant', $3, $4, $6, $7, $8)
             on conflict (conversation_id, reply_to) do nothing
             returning *
         ), touched as (
             update web_conversations c set updated_at = i.created_at
             from inserted i where c.id = i.conversation_id
         )
         select coalesce((select to_jsonb(i) from inserted i),
                         (select to_jsonb(m) from web_conversation_messages m
                          where m.conversation_id = $1 and m.reply_to = $4)) as reply,
                exists (select 1 from inserted) as created,
                (select coalesce(jsonb_agg(jsonb_build_object(
                            'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
                 from authorized_connections($2, $1) w) as recipients",
    )
    .bind(conversation.id)
    .bind(conversation.tenant_id)
    .bind(content)
    .bind(reply_to)
    .bind(id)
    .bind(stop)
    .bind(usage.map(|u| i64::from(u.input_tokens)))
    .bind(usage.map(|u| i64::from(u.output_tokens)))
    .fetch_one(&mut *conn)
    .await
    .on_constraint("web_conversation_messages_reply_to_fkey", || {
        Error::NotFound("the message replied to is not in this conversation".into())
    })?;
    let reply = match row.reply {
        Some(reply) => reply.0,
        // A reply stored concurrently, committed after this statement's snapshot.
        None => super::messages::find_reply(conn, conversation.id, reply_to)
            .await?
            .ok_or_else(|| Error::Internal("reply conflicted but cannot be read".into()))?,
    };
    Ok(StoredReply {
        reply,
        created: row.created,
        recipients: row.recipients.0,
    })
}

/// The sockets a conversation's frames may go to now, in the tenant's scope.
pub async fn recipients(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    conversation_id: ConversationId,
) -> Result<Vec<Recipient>, Error> {
    Ok(
        sqlx::query_as("select connection_id, endpoint from authorized_connections($1, $2)")
            .bind(tenant_id)
            .bind(conversation_id)
            .fetch_all(conn)
            .await?,
    )
}
