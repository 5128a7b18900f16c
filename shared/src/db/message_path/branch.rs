//! Branches (PROTOCOL §2 "Branches"): a new request for a stored message's reply, and the
//! conversation's head moved. An `edit` is a message beside another ([`super::accept`]).

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::accept::SocketCheck;
use super::{MAX_SIBLINGS, Recipient};
use crate::Error;
use crate::config::routes::Limits;
use crate::db::{Db, Scope};
use crate::domain::{ConnectionId, ConversationId, MessageId, TenantId, UserId};

/// A regenerate accepted: the user message asked again, and the id its new reply will take.
#[derive(Debug, Clone, PartialEq)]
pub struct Regenerated {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    /// The message's text and time, for the job.
    pub content: String,
    pub created_at: DateTime<Utc>,
    pub reply_id: MessageId,
    /// Every socket of the conversation that may see it now (the sender too): they get the
    /// `head` frame.
    pub recipients: Vec<Recipient>,
}

#[derive(sqlx::FromRow)]
struct RegenerateRow {
    #[sqlx(flatten)]
    socket: SocketCheck,
    found: bool,
    siblings: i64,
    content: Option<String>,
    created_at: Option<DateTime<Utc>>,
    reply_id: Option<MessageId>,
    recipients: Json<Vec<Recipient>>,
}

/// `regenerate`'s one step (`regenerate_reply`, in the socket's [`Scope::BoundConnection`]; one
/// round trip): the socket checked and counted as for a message; the user message's reply not
/// started yet is stored `cancelled` (never started), one streaming stops at its next flush;
/// the message takes a new reply id and becomes the head.
///
/// Refusals: as [`super::accept`]'s, and `not_found` (no such user message in the
/// conversation), `too_large` (it has [`MAX_SIBLINGS`] replies).
pub async fn regenerate(
    db: &Db,
    connection: &ConnectionId,
    message_id: MessageId,
    limits: Limits,
) -> Result<Regenerated, Error> {
    let limit = limits.connection;
    let row: Option<RegenerateRow> = db
        .call_one(
            Scope::BoundConnection(connection),
            crate::call!(
                "select * from regenerate_reply($1::text, $2::float8, $3::uuid, $4::bigint, $5::bigint, $6::float8, $7::bigint)",
                connection.as_str(),
                f64::from(limit.window_seconds),
                message_id,
                i64::from(limit.messages),
                i64::from(limits.user.messages),
                f64::from(limits.user.window_seconds),
                MAX_SIBLINGS
            ),
        )
        .await?;
    let row = row.ok_or_else(|| Error::Unauthenticated("send an auth frame first".into()))?;
    let (tenant_id, user_id) = row.socket.refusal(limits)?;
    if !row.found {
        return Err(Error::NotFound(
            "no such user message in this conversation".into(),
        ));
    }
    if row.siblings >= MAX_SIBLINGS {
        return Err(Error::TooLarge(format!(
            "a message has at most {MAX_SIBLINGS} replies"
        )));
    }
    match (row.content, row.created_at, row.reply_id) {
        (Some(content), Some(created_at), Some(reply_id)) => Ok(Regenerated {
            tenant_id,
            user_id,
            conversation_id: row.socket.conversation_id,
            message_id,
            content,
            created_at,
            reply_id,
            recipients: row.recipients.0,
        }),
        _ => Err(Error::Internal("regenerate_reply stored nothing".into())),
    }
}

/// Where the head stands after a move: what the `head` frame says, and to whom.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub tenant_id: TenantId,
    pub conversation_id: ConversationId,
    pub head_id: Option<MessageId>,
    /// The id the head's reply will take, when the head is a user message whose reply has not
    /// started.
    pub reply_id: Option<MessageId>,
    pub recipients: Vec<Recipient>,
}

#[derive(sqlx::FromRow)]
struct HeadRow {
    head_id: Option<MessageId>,
    reply_id: Option<MessageId>,
    recipients: Json<Vec<Recipient>>,
}

/// Moves the conversation's head to the newest message of the branches through `message_id`
/// (`move_head`), in the caller's scope, whose authorization the caller checked; `not_found`
/// when the message is not in the conversation.
pub async fn move_head(
    db: &Db,
    scope: Scope<'_>,
    tenant_id: TenantId,
    conversation_id: ConversationId,
    message_id: MessageId,
) -> Result<Head, Error> {
    let row: Option<HeadRow> = db
        .call_one(
            scope,
            crate::call!(
                "select * from move_head($1::uuid, $2::uuid)",
                conversation_id,
                message_id
            ),
        )
        .await?;
    let row = row.ok_or_else(|| Error::NotFound("no such message in this conversation".into()))?;
    Ok(Head {
        tenant_id,
        conversation_id,
        head_id: row.head_id,
        reply_id: row.reply_id,
        recipients: row.recipients.0,
    })
}

/// A `head` frame's move, from a socket: the socket must be authorized as for a message.
pub async fn move_head_from(
    db: &Db,
    connection: &ConnectionId,
    message_id: MessageId,
) -> Result<Head, Error> {
    #[derive(sqlx::FromRow)]
    struct Me {
        tenant_id: TenantId,
        conversation_id: ConversationId,
        fresh: bool,
        permitted: bool,
    }
    let mut tx = db.begin(Scope::BoundConnection(connection)).await?;
    let me: Option<Me> = crate::checked!(
        query_as,
        "select w.tenant_id, w.conversation_id, coalesce(w.expires_at > now(), false) as fresh,
                exists (select 1 from authorized_connections(w.tenant_id, w.conversation_id) a
                        where a.connection_id = $1) as permitted
         from ws_connections w where w.connection_id = $1 and w.tenant_id is not null",
        connection
    )
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let me = me.ok_or_else(|| Error::Unauthenticated("send an auth frame first".into()))?;
    if !me.fresh {
        return Err(Error::Unauthenticated(
            "your token has expired; send an auth frame with a fresh one".into(),
        ));
    }
    if !me.permitted {
        return Err(Error::Forbidden(
            "you no longer have access to this conversation".into(),
        ));
    }
    move_head(
        db,
        Scope::BoundConnection(connection),
        me.tenant_id,
        me.conversation_id,
        message_id,
    )
    .await
}
