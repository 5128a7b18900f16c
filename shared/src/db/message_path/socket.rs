//! A socket bound to its caller (`auth`), and what it is owed when it resumes.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::Error;
use crate::config::routes::{Limits, SocketCaps};
use crate::db::messages::Message;
use crate::domain::{ConnectionId, ConversationId, MessageId, Role, TenantId, UserId};

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

/// `auth`'s one statement, in a [`Scope::ConnectingConnection`](crate::db::Scope) transaction:
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
    let row: Option<BindRow> = crate::checked_file!(
        query_as,
        "src/db/message_path/bind.sql",
        connection,
        user_id,
        role,
        expires_at,
        i64::from(caps.per_user),
        i64::from(caps.per_conversation),
        i64::from(limits.connection.messages),
        f64::from(limits.connection.window_seconds),
        i64::from(limits.user.messages),
        f64::from(limits.user.window_seconds)
    )
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
    /// The end of the conversation's current branch, and the id its reply will take when it
    /// is a user message whose reply has not started (a `head` frame's fields).
    pub head_id: Option<MessageId>,
    pub head_reply_id: Option<MessageId>,
}

#[derive(sqlx::FromRow)]
struct ResumeRow {
    last_seq: i64,
    too_many: bool,
    missed: Json<Vec<Message>>,
    streaming: Option<Json<Message>>,
    live: bool,
    head_id: Option<MessageId>,
    head_reply_id: Option<MessageId>,
}

/// One of the two statements that tell a socket what it is owed, in pieces: `with missed …,
/// owed …` (the messages after `$2` (null: none), at most MAX_REPLAY (`$3`) and
/// MAX_REPLAY_BYTES (`$4`) of them, and the reply streaming now, in conversation `$1`), then the
/// statement's own CTEs (one named `live`), then what both return ([`ResumeRow`]), then the
/// statement's own columns and its `from`.
macro_rules! owed {
    ($kind:ident, $ctes:tt, $tail:tt $(, $arg:expr)* $(,)?) => {
        crate::checked!(
            $kind,
            [
                "with missed as (
         select m.*, sum(octet_length(m.content)) over (order by m.seq) as bytes
         from web_conversation_messages m
         where m.conversation_id = $1 and $2::bigint is not null and m.seq > $2
         order by m.seq
         limit $3::bigint + 1
     ), owed as (
         select (select count(*) from missed) > $3
                or coalesce((select max(bytes) from missed), 0) > $4 as too_many,
                (select to_jsonb(m) from web_conversation_messages m
                 where m.conversation_id = $1 and m.status = 'streaming'
                 order by m.seq desc limit 1) as streaming
     )",
                $ctes,
                "select c.last_seq, o.too_many,
     case when o.too_many then '[]'::jsonb
          else (select coalesce(jsonb_agg(to_jsonb(m) - 'bytes' order by m.seq), '[]')
                from missed m)
     end as missed,
     o.streaming,
     exists (select 1 from live) as live,
     (select h.head_id from head_of(c.id) h) as head_id,
     (select h.reply_id from head_of(c.id) h) as head_reply_id",
                $tail
            ]
            $(, $arg)*
        )
    };
}

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
    let row: ResumeRow = owed!(
        query_as,
        ", live as (
             update ws_connections w set catching_up_since = null
             from owed o
             where w.connection_id = $5 and $2::bigint is null and o.streaming is null
             returning 1
         )
         ",
        "
         from web_conversations c, owed o where c.id = $1",
        conversation_id,
        resume_after,
        MAX_REPLAY,
        MAX_REPLAY_BYTES,
        connection,
    )
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
            head_id: row.head_id,
            head_reply_id: row.head_reply_id,
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

/// `auth` catching a socket up, in a [`Scope::CatchingUp`](crate::db::Scope) transaction (the
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
    let row: Row = owed!(
        query_as,
        ", ended as (
             select to_jsonb(m) as message from web_conversation_messages m
             where m.conversation_id = $1 and m.id = $6 and m.status <> 'streaming'
         ), unchanged as (
             select not exists (select 1 from missed) and not exists (select 1 from ended)
                    and ($6::uuid is null) = (o.streaming is null)
                    and ($6::uuid is null
                         or (o.streaming ->> 'id' = $6::text
                             and char_length(o.streaming ->> 'content') = $7::bigint)) as yes
             from owed o
         ), live as (
             update ws_connections w set catching_up_since = null
             from unchanged u
             where w.connection_id = $5 and (u.yes or $8)
             returning 1
         )
         ",
        ", (select message from ended) as ended
         from web_conversations c, owed o where c.id = $1",
        conversation_id,
        sent.through_seq,
        MAX_REPLAY,
        MAX_REPLAY_BYTES,
        connection,
        streaming_id,
        i64::try_from(streaming_held).unwrap_or(i64::MAX),
        last_round,
    )
    .fetch_one(conn)
    .await?;
    Ok((row.resume.into(), row.ended.map(|m| m.0)))
}
