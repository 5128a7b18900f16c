//! The message path's steps, each one statement: a socket bound to its caller, a user message
//! accepted from it, what a job needs read, the reply stored. Every step also answers who may see the conversation
//! now, so no step needs a second query for it (STYLE 13: one round trip per step).
//!
//! Authorization lives in the SQL function `authorized_connections`
//! (migration `…_authorization`): a socket counts while its token has not expired and its user
//! is still the conversation's owner and a member of its tenant, or a platform admin.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

use super::agents::Agent;
use super::conversations::Conversation;
use super::messages::{Message, MessageRole, MessageStatus, StopReason, Usage};
use super::{Call, Db, Scope};
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

/// How many `message` frames may be sent per window: at most `messages` per `window_seconds`.
/// One limit counts a connection's frames in a fixed window; another counts a user's stored
/// messages across all their sockets in a sliding one (see [`Limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub messages: u32,
    pub window_seconds: u32,
}

/// What the message route enforces besides authorization (read from the environment by
/// `ws::Limits::from_env`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `message` frames per connection: a flood from one socket.
    pub connection: RateLimit,
    /// Messages per user, whichever sockets they come from: reconnecting or opening more
    /// sockets does not reset it.
    pub user: RateLimit,
}

/// A user message stored (or found stored, for a repeated `client_message_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub created_at: DateTime<Utc>,
    pub seq: i64,
    /// `false` when a message with this `client_message_id` was already stored.
    pub created: bool,
    /// The conversation's other sockets that may see it, listed after it was numbered (empty
    /// for a repeat): they get it as a `message` frame.
    pub others: Vec<Recipient>,
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
    user_messages: i64,
    message_id: Option<MessageId>,
    created_at: Option<DateTime<Utc>>,
    seq: Option<i64>,
    created: bool,
    others: Json<Vec<Recipient>>,
}

/// The message route's one step (`accept_message`, in the socket's
/// [`Scope::BoundConnection`]; one round trip): counts the message in the connection's rate window and the user's recent messages, checks the
/// socket is authenticated, its token unexpired and its user still allowed, and stores the
/// message, with its author, only if all holds.
///
/// Refusals come back as the contract's errors: `unauthenticated` (no `auth` yet, or the token
/// expired), `not_found`, `forbidden`, `rate_limited`.
pub async fn accept(
    db: &Db,
    connection: &ConnectionId,
    text: &MessageText,
    client_message_id: Option<ClientMessageId>,
    limits: Limits,
) -> Result<Accepted, Error> {
    let limit = limits.connection;
    let row: Option<AcceptRow> = db
        .call_one(
            Scope::BoundConnection(connection),
            Call::new("accept_message")
                .text(connection.as_str())
                .float(f64::from(limit.window_seconds))
                .text(text.as_str())
                .optional_uuid(client_message_id)
                .bigint(i64::from(limit.messages))
                .bigint(i64::from(limits.user.messages))
                .float(f64::from(limits.user.window_seconds)),
        )
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
    if row.user_messages >= i64::from(limits.user.messages) {
        return Err(Error::RateLimited(format!(
            "at most {} messages per {} seconds from one user, across all their sockets",
            limits.user.messages, limits.user.window_seconds
        )));
    }
    let (message_id, created_at, seq) = match (row.message_id, row.created_at, row.seq) {
        (Some(id), Some(at), Some(seq)) => (id, at, seq),
        // A concurrent repeat of the same client_message_id committed after this statement's
        // snapshot was taken: it is stored, read it now.
        _ => {
            let mut tx = db.begin(Scope::BoundConnection(connection)).await?;
            let stored = super::query_as(
                "select id, created_at, seq from web_conversation_messages
                 where conversation_id = $1 and client_message_id = $2",
            )
            .bind(row.conversation_id)
            .bind(client_message_id)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            stored
        }
    };
    Ok(Accepted {
        tenant_id,
        user_id,
        conversation_id: row.conversation_id,
        message_id,
        created_at,
        seq,
        created: row.created,
        others: row.others.0,
    })
}

/// How many authenticated sockets may be open at once, per user (in a tenant) and per
/// conversation: a reply fans out to every socket of its conversation, every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketCaps {
    pub per_user: u32,
    pub per_conversation: u32,
}

#[derive(sqlx::FromRow)]
struct BindRow {
    conversation_id: ConversationId,
    tenant_id: Option<TenantId>,
    permitted: bool,
    user_sockets: i64,
    conversation_sockets: i64,
    window_frames: i32,
    user_auths: Option<i32>,
    bound: bool,
}

/// `auth`'s one statement, in a [`Scope::ConnectingConnection`](super::Scope) transaction:
/// binds the verified caller to the connection until `expires_at`, if the conversation the
/// socket named exists and the caller may see it (its owner while a member of its tenant, or a
/// platform admin), and if neither the user nor the conversation has `caps` sockets open already
/// (this one aside). Sent again with a fresh token, it renews the binding. Returns the
/// conversation.
///
/// The frame counts against `limits` as a message does, with the same numbers: in the
/// connection's window of `auth` frames, and in the user's.
///
/// Refusals: `not_found` (no such connection or conversation), `forbidden`, `rate_limited`
/// (too many sockets, or `auth` frames).
#[allow(clippy::too_many_arguments)]
pub async fn bind(
    conn: &mut PgConnection,
    connection: &ConnectionId,
    user_id: UserId,
    role: Role,
    expires_at: DateTime<Utc>,
    caps: SocketCaps,
    limits: Limits,
) -> Result<ConversationId, Error> {
    let row: Option<BindRow> = super::query_as(
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
         ), user_window as (
             insert into user_auth_windows as u (tenant_id, user_id, auths)
             select t.tenant_id, $2, 1 from target t where t.tenant_id is not null
             on conflict (tenant_id, user_id) do update set
                 auths = case when u.window_started_at > now() - make_interval(secs => $10)
                              then u.auths + 1 else 1 end,
                 window_started_at = case
                     when u.window_started_at > now() - make_interval(secs => $10)
                     then u.window_started_at else now() end
             returning u.auths
         ), counted as (
             -- Sockets open now (authenticated, token unexpired), this one aside.
             select
                 (select case when w.auth_window_started_at > now() - make_interval(secs => $8)
                              then w.auth_frames + 1 else 1 end
                  from ws_connections w where w.connection_id = $1) as window_frames,
                 (select auths from user_window) as user_auths,
                 (select count(*) from ws_connections o
                  where o.tenant_id = t.tenant_id and o.user_id = $2 and o.connection_id <> $1
                    and o.authenticated_at is not null and o.expires_at > now())
                     as user_sockets,
                 (select count(*) from ws_connections o
                  where o.tenant_id = t.tenant_id and o.conversation_id = t.conversation_id
                    and o.connection_id <> $1
                    and o.authenticated_at is not null and o.expires_at > now())
                     as conversation_sockets
             from target t
         ), bound as (
             update ws_connections w
             set tenant_id = t.tenant_id, user_id = $2, role = $3, expires_at = $4,
                 authenticated_at = now(), last_seen_at = now(), catching_up_since = now(),
                 auth_frames = n.window_frames,
                 auth_window_started_at = case when n.window_frames = 1 then now()
                                               else w.auth_window_started_at end
             from target t, counted n
             where w.connection_id = t.connection_id and t.permitted
               and n.user_sockets < $5 and n.conversation_sockets < $6
               and n.window_frames <= $7 and n.user_auths <= $9
             returning w.connection_id
         ), locked as (
             -- Writers of the conversation wait until this transaction ends (see `resume`).
             select v.id from web_conversations v join target t on v.id = t.conversation_id
             where t.permitted
             for share of v
         )
         select t.conversation_id, t.tenant_id, t.permitted, n.user_sockets,
                n.conversation_sockets, n.window_frames, n.user_auths,
                exists (select 1 from bound) and exists (select 1 from locked) as bound
         from target t, counted n",
    )
    .bind(connection)
    .bind(user_id)
    .bind(role)
    .bind(expires_at)
    .bind(i64::from(caps.per_user))
    .bind(i64::from(caps.per_conversation))
    .bind(i64::from(limits.connection.messages))
    .bind(f64::from(limits.connection.window_seconds))
    .bind(i64::from(limits.user.messages))
    .bind(f64::from(limits.user.window_seconds))
    .fetch_optional(conn)
    .await?;
    let row = row.ok_or_else(|| Error::NotFound("this connection is not recorded".into()))?;
    if row.tenant_id.is_none() {
        return Err(Error::NotFound("no such conversation".into()));
    }
    if !row.permitted {
        return Err(Error::Forbidden(
            "not your conversation, or not a member of its tenant".into(),
        ));
    }
    if row.user_sockets >= i64::from(caps.per_user) {
        return Err(Error::RateLimited(format!(
            "you have {} sockets open already; close one first",
            caps.per_user
        )));
    }
    if row.conversation_sockets >= i64::from(caps.per_conversation) {
        return Err(Error::RateLimited(format!(
            "this conversation has {} sockets open already",
            caps.per_conversation
        )));
    }
    if i64::from(row.window_frames) > i64::from(limits.connection.messages) {
        return Err(Error::RateLimited(format!(
            "at most {} auth frames per {} seconds on one socket",
            limits.connection.messages, limits.connection.window_seconds
        )));
    }
    if row
        .user_auths
        .is_some_and(|n| i64::from(n) > i64::from(limits.user.messages))
    {
        return Err(Error::RateLimited(format!(
            "at most {} auth frames per {} seconds from one user, across all their sockets",
            limits.user.messages, limits.user.window_seconds
        )));
    }
    if !row.bound {
        return Err(Error::Forbidden(
            "not your conversation, or not a member of its tenant".into(),
        ));
    }
    Ok(row.conversation_id)
}

/// The most messages a `replay` catches up with; past that the client reloads through REST.
pub const MAX_REPLAY: i64 = 500;

/// The most bytes of message content a `replay` catches up with (a bounded number of frames,
/// posted well within the auth route's timeout); past that the client reloads through REST.
pub const MAX_REPLAY_BYTES: i64 = 256 * 1024;

/// What a socket that just authenticated is owed, read after `bind` in its transaction, or
/// what was stored since by [`catch_up`].
#[derive(Debug, Clone)]
pub struct Resume {
    /// The conversation's newest `seq`.
    pub last_seq: i64,
    /// The messages after the `seq` asked for, oldest first (none when the client did not
    /// resume).
    pub missed: Vec<Message>,
    /// More than [`MAX_REPLAY`] messages, or [`MAX_REPLAY_BYTES`], were missed: `missed` is
    /// empty, the client reloads.
    pub too_many: bool,
    /// A reply streaming now, with its text so far.
    pub streaming: Option<Message>,
    /// The socket takes live frames from now on: nothing more is owed to it.
    pub live: bool,
}

#[derive(sqlx::FromRow)]
struct ResumeRow {
    last_seq: i64,
    too_many: bool,
    missed: Json<Vec<Message>>,
    streaming: Option<Json<Message>>,
    live: bool,
}

/// The messages after `$2` (null: none), at most MAX_REPLAY (`$3`) and MAX_REPLAY_BYTES (`$4`)
/// of them, and the reply streaming now, in conversation `$1`: the start of both statements
/// that tell a socket what it is owed.
const OWED: &str = "with missed as (
         select m.*, sum(octet_length(m.content)) over (order by m.seq) as bytes
         from web_conversation_messages m
         where m.conversation_id = $1 and $2::bigint is not null and m.seq > $2
         order by m.seq
         limit $3 + 1
     ), owed as (
         select (select count(*) from missed) > $3
                or coalesce((select max(bytes) from missed), 0) > $4 as too_many,
                (select to_jsonb(m) from web_conversation_messages m
                 where m.conversation_id = $1 and m.status = 'streaming'
                 order by m.seq desc limit 1) as streaming
     )";

/// What both statements return ([`ResumeRow`]), once the statement's `live` CTE has run.
const OWED_COLUMNS: &str = "c.last_seq, o.too_many,
     case when o.too_many then '[]'::jsonb
          else (select coalesce(jsonb_agg(to_jsonb(m) - 'bytes' order by m.seq), '[]')
                from missed m)
     end as missed,
     o.streaming,
     exists (select 1 from live) as live";

/// `auth`'s second statement, after [`bind`] in the same transaction: `bind` locked the
/// conversation row (`for share`), so this statement's snapshot holds every message whose writer
/// listed the sockets before the binding was visible, and every writer after it waits for this
/// transaction. `bind` left the socket catching up (writers leave it out); when it is owed
/// nothing (it did not resume, and no reply is streaming) this statement makes it live, and
/// every writer after this transaction lists it. Otherwise `auth` posts what it is owed after
/// the commit, then calls [`catch_up`] until it is live. `resume_after` is the client's last
/// `seq`, if it resumes.
pub async fn resume(
    conn: &mut PgConnection,
    connection: &ConnectionId,
    conversation_id: ConversationId,
    resume_after: Option<i64>,
) -> Result<Resume, Error> {
    let row: ResumeRow = super::query_as(AssertSqlSafe(format!(
        "{OWED}, live as (
             update ws_connections w set catching_up_since = null
             from owed o
             where w.connection_id = $5 and $2::bigint is null and o.streaming is null
             returning 1
         )
         select {OWED_COLUMNS}
         from web_conversations c, owed o where c.id = $1"
    )))
    .bind(conversation_id)
    .bind(resume_after)
    .bind(MAX_REPLAY)
    .bind(MAX_REPLAY_BYTES)
    .bind(connection)
    .fetch_one(conn)
    .await?;
    Ok(row.into())
}

impl From<ResumeRow> for Resume {
    fn from(row: ResumeRow) -> Self {
        Self {
            last_seq: row.last_seq,
            too_many: row.too_many,
            missed: row.missed.0,
            streaming: row.streaming.map(|m| m.0),
            live: row.live,
        }
    }
}

/// Where a socket's catching up stands: what it has been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Every message up to this `seq` has been sent whole (or as it stood, for a reply
    /// streaming then).
    pub through_seq: i64,
    /// A reply that was streaming, and how many characters of it the socket holds.
    pub streaming: Option<(MessageId, usize)>,
}

/// `auth` catching a socket up, in a [`Scope::CatchingUp`](super::Scope) transaction (the
/// conversation locked `for share` before this statement's snapshot, so no writer is between
/// storing and listing): what was stored after `sent.through_seq`, and the reply streaming now
/// (the one `sent.streaming` names if it still streams). When nothing changed since `sent`, or
/// `last_round`, the socket is made live in the same statement.
pub async fn catch_up(
    conn: &mut PgConnection,
    connection: &ConnectionId,
    conversation_id: ConversationId,
    sent: Sent,
    last_round: bool,
) -> Result<(Resume, Option<Message>), Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        resume: ResumeRow,
        /// The reply `sent.streaming` names, when it has ended since.
        ended: Option<Json<Message>>,
    }
    let (streaming_id, streaming_held) = sent
        .streaming
        .map_or((None, 0), |(id, held)| (Some(id), held));
    let row: Row = super::query_as(AssertSqlSafe(format!(
        "{OWED}, ended as (
             select to_jsonb(m) as message from web_conversation_messages m
             where m.conversation_id = $1 and m.id = $6 and m.status <> 'streaming'
         ), unchanged as (
             select not exists (select 1 from missed) and not exists (select 1 from ended)
                    and ($6::uuid is null) = (o.streaming is null)
                    and ($6::uuid is null
                         or (o.streaming ->> 'id' = $6::text
                             and char_length(o.streaming ->> 'content') = $7)) as yes
             from owed o
         ), live as (
             update ws_connections w set catching_up_since = null
             from unchanged u
             where w.connection_id = $5 and (u.yes or $8)
             returning 1
         )
         select {OWED_COLUMNS}, (select message from ended) as ended
         from web_conversations c, owed o where c.id = $1"
    )))
    .bind(conversation_id)
    .bind(sent.through_seq)
    .bind(MAX_REPLAY)
    .bind(MAX_REPLAY_BYTES)
    .bind(connection)
    .bind(streaming_id)
    .bind(i64::try_from(streaming_held).unwrap_or(i64::MAX))
    .bind(last_round)
    .fetch_one(conn)
    .await?;
    Ok((row.resume.into(), row.ended.map(|m| m.0)))
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
    /// The user cancelled the job's message before it started.
    pub cancel_requested: bool,
    /// Times the job was received but sent back unstarted: receives that were not attempts.
    pub deferrals: u32,
    /// User messages stored just before the job's (among its [`EARLIER_WINDOW`] predecessors)
    /// that have no reply yet, oldest first: their jobs were queued after this one (two
    /// routes racing), and are answered first (invariant 9: in `seq` order).
    pub earlier: Vec<MessageId>,
}

/// How far back a job looks for messages stored before its own and not answered yet.
pub const EARLIER_WINDOW: i64 = 20;

/// A message of the context window: what the agent needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContextMessage {
    pub id: MessageId,
    pub role: MessageRole,
    pub content: String,
    /// A user message written by someone other than the conversation's owner (a platform
    /// admin).
    #[serde(default)]
    pub by_someone_else: bool,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    conversation: Json<Conversation>,
    agent: Option<Json<Agent>>,
    reply: Option<Json<Message>>,
    history: Json<Vec<ContextMessage>>,
    recipients: Json<Vec<Recipient>>,
    cancel_requested: bool,
    deferrals: i32,
    earlier: Json<Vec<MessageId>>,
}

/// The orchestrator's read (`job_context`, in the tenant's scope; one round trip); `None` when
/// the conversation is gone.
pub async fn load_job(
    db: &Db,
    tenant_id: TenantId,
    conversation_id: ConversationId,
    message_id: MessageId,
    limit: u16,
) -> Result<Option<JobContext>, Error> {
    let row: Option<JobRow> = db
        .call_one(
            Scope::Tenant(tenant_id),
            Call::new("job_context")
                .uuid(conversation_id)
                .uuid(message_id)
                .bigint(i64::from(limit))
                .bigint(EARLIER_WINDOW),
        )
        .await?;
    Ok(row.map(|row| JobContext {
        conversation: row.conversation.0,
        agent: row.agent.map(|a| a.0),
        reply: row.reply.map(|r| r.0),
        history: row.history.0,
        recipients: row.recipients.0,
        cancel_requested: row.cancel_requested,
        deferrals: u32::try_from(row.deferrals).unwrap_or(0),
        earlier: row.earlier.0,
    }))
}

/// Counts one deferral for each of these user messages' jobs: received, but sent back to the
/// queue without being started (see `orchestrator::handle`).
pub async fn defer_jobs(conn: &mut PgConnection, message_ids: &[MessageId]) -> Result<(), Error> {
    let ids: Vec<uuid::Uuid> = message_ids.iter().map(MessageId::as_uuid).collect();
    super::query(
        "update web_conversation_messages set job_deferrals = job_deferrals + 1
         where id = any($1) and role = 'user'",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// How a reply's first write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// A new row, numbered now.
    Created,
    /// A reply left `streaming` by an attempt that died, restarted with this text (its clients
    /// are told `reset`).
    TakenOver,
    /// A reply that had ended already: this attempt writes nothing (a redelivered job sends it
    /// again).
    Existing,
}

/// A reply written, and who gets its frames now.
#[derive(Debug, Clone)]
pub struct StoredReply {
    pub reply: Message,
    pub written: Written,
    /// The user asked to stop this reply (`cancel`).
    pub cancel_requested: bool,
    pub recipients: Vec<Recipient>,
}

/// A reply's first write: its first streamed flush (`status: Streaming`, owned by `producer`)
/// or the whole reply in one go.
#[derive(Debug, Clone, Copy)]
pub struct ReplyWrite<'a> {
    /// Chosen by the caller, so that frames sent before the write carry the id it will have.
    pub id: MessageId,
    pub reply_to: MessageId,
    /// The attempt writing it: later flushes must name it.
    pub producer: Uuid,
    pub text: &'a str,
    pub status: MessageStatus,
    pub stop: Option<StopReason>,
    pub usage: Option<Usage>,
}

#[derive(sqlx::FromRow)]
struct ReplyRow {
    reply: Option<Json<Message>>,
    created: bool,
    taken_over: bool,
    cancel_requested: bool,
    recipients: Json<Vec<Recipient>>,
}

/// The recipients column of a writer's statement: read after the conversation's lock (the
/// `locked` CTE), with a snapshot of its own.
macro_rules! recipients_now {
    () => {
        "(select coalesce(jsonb_agg(jsonb_build_object(
              'connection_id', w.connection_id, 'endpoint', w.endpoint)), '[]')
          from locked l, authorized_connections_now(l.tenant_id, l.id) w)"
    };
}

/// Writes a reply to `reply_to` for the first time (`write_reply`, in the tenant's scope; one
/// round trip): at most one reply
/// per user message, numbered when it starts; a `streaming` one left by a dead attempt is
/// taken over. Lists the recipients as they are now.
pub async fn write_reply(
    db: &Db,
    conversation: &Conversation,
    write: ReplyWrite<'_>,
) -> Result<StoredReply, Error> {
    let producer = (write.status == MessageStatus::Streaming).then_some(write.producer);
    let row: ReplyRow = db
        .call_one(
            Scope::Tenant(conversation.tenant_id),
            Call::new("write_reply")
                .uuid(conversation.id)
                .uuid(conversation.tenant_id)
                .text(write.text)
                .uuid(write.reply_to)
                .uuid(write.id)
                .text(status_name(write.status))
                .optional_uuid(producer)
                .optional_text(write.stop.map(stop_name))
                .optional_bigint(write.usage.map(|u| i64::from(u.input_tokens)))
                .optional_bigint(write.usage.map(|u| i64::from(u.output_tokens))),
        )
        .await
        .on_constraint("web_conversation_messages_reply_to_fkey", || {
            Error::NotFound("the message replied to is not in this conversation".into())
        })?
        .ok_or_else(|| Error::Internal("write_reply returned no row".into()))?;
    let reply = match row.reply {
        Some(reply) => reply.0,
        // A reply stored concurrently, committed after this statement's snapshot.
        None => {
            let mut tx = db.begin(Scope::Tenant(conversation.tenant_id)).await?;
            let found = super::messages::find_reply(&mut tx, conversation.id, write.reply_to)
                .await?
                .ok_or_else(|| Error::Internal("reply conflicted but cannot be read".into()))?;
            tx.commit().await?;
            found
        }
    };
    let written = if row.created {
        Written::Created
    } else if row.taken_over {
        Written::TakenOver
    } else {
        Written::Existing
    };
    Ok(StoredReply {
        reply,
        written,
        cancel_requested: row.cancel_requested,
        recipients: row.recipients.0,
    })
}

/// Ends the reply to `reply_to` `failed` when its job gives up, in the tenant's scope: a
/// reply still `streaming` keeps what it had; when none was written, an empty `failed` one is
/// stored (numbered now, with id `id`), so every acknowledged message ends answered or visibly
/// failed, and a later message's job knows this one is settled. `None` when the reply had
/// already ended, or the user message is gone. Lists the recipients as they are now.
///
/// `unwritten_since`: only a reply still streaming that nobody has written since then is
/// ended (the sweeper's check that its producer is gone); nothing is stored when none was.
pub async fn fail_reply(
    conn: &mut PgConnection,
    conversation_id: ConversationId,
    reply_to: MessageId,
    id: MessageId,
    unwritten_since: Option<DateTime<Utc>>,
) -> Result<Option<(Message, Vec<Recipient>)>, Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        reply: Option<Json<Message>>,
        recipients: Json<Vec<Recipient>>,
    }
    let row: Row = super::query_as(concat!(
        "with locked as (
             select id, tenant_id, last_seq from web_conversations where id = $1
             for no key update
         ), ended as (
             update web_conversation_messages m
             set status = 'failed', stop_reason = 'error', producer = null, written_at = now()
             from locked l
             where m.conversation_id = l.id and m.reply_to = $2 and m.status = 'streaming'
               and ($4::timestamptz is null or m.written_at < $4)
             returning m.*
         ), inserted as (
             insert into web_conversation_messages
                 (id, conversation_id, tenant_id, role, content, reply_to, seq, status,
                  stop_reason)
             select $3, l.id, l.tenant_id, 'assistant', '', $2, l.last_seq + 1, 'failed', 'error'
             from locked l
             where $4::timestamptz is null
               and exists (select 1 from web_conversation_messages q
                           where q.conversation_id = l.id and q.id = $2 and q.role = 'user')
               and not exists (select 1 from web_conversation_messages r
                               where r.conversation_id = l.id and r.reply_to = $2)
             on conflict (conversation_id, reply_to) do nothing
             returning *
         ), touched as (
             update web_conversations v set updated_at = i.created_at, last_seq = i.seq
             from inserted i where v.id = i.conversation_id
         )
         select coalesce((select to_jsonb(e) from ended e),
                         (select to_jsonb(i) from inserted i)) as reply,
                ",
        recipients_now!(),
        " as recipients"
    ))
    .bind(conversation_id)
    .bind(reply_to)
    .bind(id)
    .bind(unwritten_since)
    .fetch_one(conn)
    .await?;
    Ok(row.reply.map(|reply| (reply.0, row.recipients.0)))
}

/// A reply left `streaming` by a producer that has not written since `before`, as the
/// sweeper finds it (its `Scope::Unauthenticated`, which sees such replies of every tenant).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StaleReply {
    pub tenant_id: TenantId,
    pub conversation_id: ConversationId,
    pub reply_to: MessageId,
    pub written_at: DateTime<Utc>,
}

/// At most `limit` replies still `streaming` whose producer has not written since `before`,
/// oldest first.
pub async fn stale_replies(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<StaleReply>, Error> {
    Ok(super::query_as(
        "select tenant_id, conversation_id, reply_to, written_at
         from web_conversation_messages
         where status = 'streaming' and written_at < $1 and reply_to is not null
         order by written_at
         limit $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The whole reply at once (not streamed): [`write_reply`] with `Complete`.
pub async fn store_reply(
    db: &Db,
    conversation: &Conversation,
    id: MessageId,
    reply_to: MessageId,
    content: &str,
    stop: StopReason,
    usage: Option<Usage>,
) -> Result<StoredReply, Error> {
    write_reply(
        db,
        conversation,
        ReplyWrite {
            id,
            reply_to,
            producer: Uuid::nil(),
            text: content,
            status: MessageStatus::Complete,
            stop: Some(stop),
            usage,
        },
    )
    .await
}

/// A later flush of a streaming reply, or its end.
#[derive(Debug, Clone, Copy)]
pub struct ReplyFlush<'a> {
    pub id: MessageId,
    pub producer: Uuid,
    /// The reply's length in characters before `delta`: the row must hold exactly that much.
    pub offset: usize,
    pub delta: &'a str,
    /// `Streaming` to go on; another status ends the reply.
    pub status: MessageStatus,
    pub stop: Option<StopReason>,
    pub usage: Option<Usage>,
}

/// What a flush found.
#[derive(Debug, Clone)]
pub struct Flushed {
    /// The reply after the flush; `None` when this attempt no longer owns it (another took it
    /// over, or it ended).
    pub reply: Option<Message>,
    pub cancel_requested: bool,
    pub recipients: Vec<Recipient>,
}

#[derive(sqlx::FromRow)]
struct FlushRow {
    reply: Option<Json<Message>>,
    cancel_requested: bool,
    recipients: Json<Vec<Recipient>>,
}

/// Appends `delta` to the reply this attempt streams, in the tenant's scope, and reads the
/// user's `cancel` flag and the recipients in the same statement (`append_reply`): a flush costs
/// one round trip.
pub async fn flush_reply(
    db: &Db,
    conversation: &Conversation,
    flush: ReplyFlush<'_>,
) -> Result<Flushed, Error> {
    let producer = (flush.status == MessageStatus::Streaming).then_some(flush.producer);
    // One generic plan per server connection (migration 14): behind a pooler, a statement of
    // its own would be planned at every flush.
    let row: FlushRow = db
        .call_one(
            Scope::Tenant(conversation.tenant_id),
            Call::new("append_reply")
                .uuid(conversation.id)
                .uuid(flush.id)
                .uuid(flush.producer)
                .bigint(i64::try_from(flush.offset).unwrap_or(i64::MAX))
                .text(flush.delta)
                .text(status_name(flush.status))
                .optional_uuid(producer)
                .optional_text(flush.stop.map(stop_name))
                .optional_bigint(flush.usage.map(|u| i64::from(u.input_tokens)))
                .optional_bigint(flush.usage.map(|u| i64::from(u.output_tokens))),
        )
        .await?
        .ok_or_else(|| Error::Internal("append_reply returned no row".into()))?;
    Ok(Flushed {
        reply: row.reply.map(|r| r.0),
        cancel_requested: row.cancel_requested,
        recipients: row.recipients.0,
    })
}

/// A status as the schema stores it (`text`), for a [`Call`].
fn status_name(status: MessageStatus) -> &'static str {
    match status {
        MessageStatus::Complete => "complete",
        MessageStatus::Streaming => "streaming",
        MessageStatus::Cancelled => "cancelled",
        MessageStatus::Failed => "failed",
    }
}

/// A stop reason as the schema stores it (`text`), for a [`Call`].
fn stop_name(stop: StopReason) -> &'static str {
    match stop {
        StopReason::End => "end",
        StopReason::Length => "length",
        StopReason::Cancelled => "cancelled",
        StopReason::Error => "error",
    }
}

#[derive(sqlx::FromRow)]
struct CancelRow {
    fresh: bool,
    permitted: bool,
    flagged: bool,
}

/// `cancel`'s one statement, in a [`Scope::BoundConnection`](super::Scope) transaction: the
/// socket must be authorized as for a message; flags the user message `reply_to` of its
/// conversation. The reply's next flush (or its job, not started yet) sees the flag.
pub async fn cancel(
    conn: &mut PgConnection,
    connection: &ConnectionId,
    reply_to: MessageId,
) -> Result<(), Error> {
    let row: Option<CancelRow> = super::query_as(
        "with me as (
             select w.conversation_id, w.tenant_id,
                    coalesce(w.expires_at > now(), false) as fresh,
                    exists (select 1 from authorized_connections(w.tenant_id, w.conversation_id) a
                            where a.connection_id = $1) as permitted
             from ws_connections w where w.connection_id = $1 and w.tenant_id is not null
         ), flagged as (
             update web_conversation_messages m set cancel_requested = true
             from me
             where me.fresh and me.permitted and m.conversation_id = me.conversation_id
               and m.id = $2 and m.role = 'user'
             returning m.id
         )
         select me.fresh, me.permitted, exists (select 1 from flagged) as flagged from me",
    )
    .bind(connection)
    .bind(reply_to)
    .fetch_optional(conn)
    .await?;
    let row = row.ok_or_else(|| Error::Unauthenticated("send an auth frame first".into()))?;
    if !row.fresh {
        return Err(Error::Unauthenticated(
            "your token has expired; send an auth frame with a fresh one".into(),
        ));
    }
    if !row.permitted {
        return Err(Error::Forbidden(
            "you no longer have access to this conversation".into(),
        ));
    }
    if !row.flagged {
        return Err(Error::NotFound(
            "no such message of yours in this conversation".into(),
        ));
    }
    Ok(())
}

/// The sockets a conversation's frames may go to now, in the tenant's scope.
pub async fn recipients(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    conversation_id: ConversationId,
) -> Result<Vec<Recipient>, Error> {
    Ok(
        super::query_as("select connection_id, endpoint from live_connections($1, $2)")
            .bind(tenant_id)
            .bind(conversation_id)
            .fetch_all(conn)
            .await?,
    )
}
