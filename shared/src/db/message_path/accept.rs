//! A user message accepted from a socket, and a reply cancelled from one.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::Recipient;
use crate::Error;
use crate::config::routes::Limits;
use crate::db::{Db, Scope};
use crate::domain::{
    ClientMessageId, ConnectionId, ConversationId, MessageId, MessageText, TenantId, UserId,
};

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
    /// The message it follows (PROTOCOL §2 "Branches"); `None` for a conversation's first.
    pub parent_id: Option<MessageId>,
    /// The id its reply will take.
    pub reply_id: MessageId,
    /// The conversation's other sockets that may see it, listed after it was numbered (empty
    /// for a repeat): they get it as a `message` frame.
    pub others: Vec<Recipient>,
}

/// What a message-like frame's step read of its socket (`socket_frame`, migration 16).
#[derive(sqlx::FromRow)]
pub(super) struct SocketCheck {
    pub(super) conversation_id: ConversationId,
    tenant_id: Option<TenantId>,
    user_id: Option<UserId>,
    fresh: bool,
    conversation_exists: bool,
    permitted: bool,
    window_messages: i32,
    user_messages: i64,
}

impl SocketCheck {
    /// The socket's tenant and user when the frame is taken; otherwise the contract's refusal:
    /// `unauthenticated` (no `auth` yet, or the token expired), `not_found`, `forbidden`,
    /// `rate_limited`.
    pub(super) fn refusal(&self, limits: Limits) -> Result<(TenantId, UserId), Error> {
        let unauthenticated = || Error::Unauthenticated("send an auth frame first".into());
        let (Some(tenant_id), Some(user_id)) = (self.tenant_id, self.user_id) else {
            return Err(unauthenticated());
        };
        let limit = limits.connection;
        if !self.fresh {
            return Err(Error::Unauthenticated(
                "your token has expired; send an auth frame with a fresh one".into(),
            ));
        }
        if !self.conversation_exists {
            return Err(Error::NotFound("the conversation no longer exists".into()));
        }
        if !self.permitted {
            return Err(Error::Forbidden(
                "you no longer have access to this conversation".into(),
            ));
        }
        if i64::from(self.window_messages) > i64::from(limit.messages) {
            return Err(Error::RateLimited(format!(
                "at most {} messages per {} seconds",
                limit.messages, limit.window_seconds
            )));
        }
        if self.user_messages >= i64::from(limits.user.messages) {
            return Err(Error::RateLimited(format!(
                "at most {} messages per {} seconds from one user, across all their sockets",
                limits.user.messages, limits.user.window_seconds
            )));
        }
        Ok((tenant_id, user_id))
    }
}

#[derive(sqlx::FromRow)]
struct AcceptRow {
    #[sqlx(flatten)]
    socket: SocketCheck,
    edited_exists: bool,
    siblings: i64,
    message_id: Option<MessageId>,
    created_at: Option<DateTime<Utc>>,
    seq: Option<i64>,
    created: bool,
    parent_id: Option<MessageId>,
    reply_id: Option<MessageId>,
    others: Json<Vec<Recipient>>,
}

/// How many messages may stand beside each other (an edited message and its edits, a user
/// message's replies): past it, `edit` and `regenerate` are refused `too_large`.
pub const MAX_SIBLINGS: i64 = 20;

/// The message route's one step (`accept_message`, in the socket's
/// [`Scope::BoundConnection`]; one round trip): counts the message in the connection's rate window and the user's recent messages, checks the
/// socket is authenticated, its token unexpired and its user still allowed, and stores the
/// message, with its author, only if all holds. The message follows the conversation's head,
/// or, for an `edit` (`edit_of`), stands beside the message it edits; it becomes the head.
///
/// Refusals come back as the contract's errors: `unauthenticated` (no `auth` yet, or the token
/// expired), `not_found`, `forbidden`, `rate_limited`, `too_large` (an edit past
/// [`MAX_SIBLINGS`]).
pub async fn accept(
    db: &Db,
    connection: &ConnectionId,
    text: &MessageText,
    client_message_id: Option<ClientMessageId>,
    limits: Limits,
    edit_of: Option<MessageId>,
) -> Result<Accepted, Error> {
    let limit = limits.connection;
    let row: Option<AcceptRow> = db
        .call_one(
            Scope::BoundConnection(connection),
            crate::call!(
                "select * from accept_message($1::text, $2::float8, $3::text, $4::uuid, $5::bigint, $6::bigint, $7::float8, $8::uuid, $9::bigint)",
                connection.as_str(),
                f64::from(limit.window_seconds),
                text.as_str(),
                client_message_id,
                i64::from(limit.messages),
                i64::from(limits.user.messages),
                f64::from(limits.user.window_seconds),
                edit_of,
                MAX_SIBLINGS
            ),
        )
        .await?;

    let row = row.ok_or_else(|| Error::Unauthenticated("send an auth frame first".into()))?;
    let (tenant_id, user_id) = row.socket.refusal(limits)?;
    if !row.edited_exists {
        return Err(Error::NotFound(
            "no such user message in this conversation to edit".into(),
        ));
    }
    if row.siblings >= MAX_SIBLINGS {
        return Err(Error::TooLarge(format!(
            "a message has at most {MAX_SIBLINGS} versions"
        )));
    }
    let (message_id, created_at, seq, parent_id, reply_id) =
        match (row.message_id, row.created_at, row.seq, row.reply_id) {
            (Some(id), Some(at), Some(seq), Some(reply_id)) => {
                (id, at, seq, row.parent_id, reply_id)
            }
            // A concurrent repeat of the same client_message_id committed after this statement's
            // snapshot was taken: it is stored, read it now.
            _ => {
                let mut tx = db.begin(Scope::BoundConnection(connection)).await?;
                let stored = crate::checked!(
                    query_as,
                    "select id, created_at, seq, parent_id, reply_id from web_conversation_messages
                 where conversation_id = $1 and client_message_id = $2",
                    row.socket.conversation_id,
                    client_message_id
                )
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                stored
            }
        };
    Ok(Accepted {
        tenant_id,
        user_id,
        conversation_id: row.socket.conversation_id,
        message_id,
        created_at,
        seq,
        created: row.created,
        parent_id,
        reply_id,
        others: row.others.0,
    })
}

#[derive(sqlx::FromRow)]
struct CancelRow {
    fresh: bool,
    permitted: bool,
    flagged: bool,
}

/// `cancel`'s one statement, in a [`Scope::BoundConnection`](crate::db::Scope) transaction: the
/// socket must be authorized as for a message; flags the user message `reply_to` of its
/// conversation. The reply's next flush (or its job, not started yet) sees the flag.
pub async fn cancel(
    conn: &mut PgConnection,
    connection: &ConnectionId,
    reply_to: MessageId,
) -> Result<(), Error> {
    let row: Option<CancelRow> = crate::checked!(
        query_as,
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
        connection,
        reply_to
    )
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
