//! `web_conversation_messages`: idempotent writes and cursor pagination.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use super::Upserted;
use super::conversations::Conversation;
use crate::Error;
use crate::domain::{
    ClientMessageId, ConversationId, MessageId, MessageText, PageLimit, TenantId, UserId,
};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum MessageRole {
    User,
    Assistant,
}

/// Why a reply ended (the `response` frame's `stop_reason`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum StopReason {
    /// The model finished.
    End,
    /// The output cap was reached (the model's `max_tokens` or the stored reply's size cap).
    Length,
    Cancelled,
    Error,
}

/// Where a message stands: a reply streams until it ends one of the other ways; a user message
/// is always `complete`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum MessageStatus {
    Complete,
    Streaming,
    Cancelled,
    Failed,
}

/// Tokens a provider reports for one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub tenant_id: TenantId,
    pub role: MessageRole,
    pub content: String,
    pub client_message_id: Option<ClientMessageId>,
    pub reply_to: Option<MessageId>,
    pub created_at: DateTime<Utc>,
    /// The message's place in its conversation (PROTOCOL §2 "Resume").
    pub seq: i64,
    pub status: MessageStatus,
    /// Replies only.
    #[serde(default)]
    pub stop_reason: Option<StopReason>,
    #[serde(default)]
    pub input_tokens: Option<i32>,
    #[serde(default)]
    pub output_tokens: Option<i32>,
    /// User messages: who wrote it (the owner, or a platform admin).
    #[serde(default)]
    #[sqlx(default)]
    pub author_id: Option<UserId>,
}

/// A stored message as clients see it: in the history API and in `replay` frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageView {
    pub seq: i64,
    pub id: MessageId,
    pub role: MessageRole,
    pub content: String,
    pub status: MessageStatus,
    pub reply_to: Option<MessageId>,
    pub created_at: DateTime<Utc>,
    /// User messages: who wrote it, the conversation's owner or a platform admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_id: Option<UserId>,
    /// User messages: the sending client's own id, when it gave one, so a client that sent a
    /// message just before a drop matches the stored one to its pending one (shown once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<ClientMessageId>,
}

impl From<Message> for MessageView {
    fn from(m: Message) -> Self {
        Self {
            seq: m.seq,
            id: m.id,
            role: m.role,
            content: m.content,
            status: m.status,
            reply_to: m.reply_to,
            created_at: m.created_at,
            author_id: m.author_id,
            client_message_id: m.client_message_id,
        }
    }
}

impl Message {
    /// The provider's token counts, when it reported both.
    pub fn usage(&self) -> Option<Usage> {
        Some(Usage {
            input_tokens: u32::try_from(self.input_tokens?).ok()?,
            output_tokens: u32::try_from(self.output_tokens?).ok()?,
        })
    }
}

/// Stores a user message. With a `client_message_id` already stored in this conversation, the
/// earlier message comes back (`created: false`) and nothing is written. A new message bumps
/// the conversation's `updated_at` to its own time.
pub async fn insert_user(
    conn: &mut PgConnection,
    conversation: &Conversation,
    text: &MessageText,
    client_message_id: Option<ClientMessageId>,
) -> Result<Upserted<Message>, Error> {
    let created: Option<Message> = super::query_as(
        "with locked as (
             select id, last_seq from web_conversations where id = $1 for no key update
         ), inserted as (
             insert into web_conversation_messages
                 (conversation_id, tenant_id, role, content, client_message_id, seq, author_id)
             select $1, $2, 'user', $3, $4, l.last_seq + 1, $5 from locked l
             on conflict (conversation_id, client_message_id) do nothing
             returning *
         ), touched as (
             update web_conversations c set updated_at = i.created_at, last_seq = i.seq
             from inserted i where c.id = i.conversation_id
         )
         select * from inserted",
    )
    .bind(conversation.id)
    .bind(conversation.tenant_id)
    .bind(text.as_str())
    .bind(client_message_id)
    .bind(conversation.user_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = created {
        return Ok(Upserted { row, created: true });
    }
    let row = super::query_as(
        "select * from web_conversation_messages
         where conversation_id = $1 and client_message_id = $2",
    )
    .bind(conversation.id)
    .bind(client_message_id)
    .fetch_one(conn)
    .await?;
    Ok(Upserted {
        row,
        created: false,
    })
}

/// The stored reply to a user message, if there is one.
pub async fn find_reply(
    conn: &mut PgConnection,
    conversation_id: ConversationId,
    reply_to: MessageId,
) -> Result<Option<Message>, Error> {
    Ok(super::query_as(
        "select * from web_conversation_messages
         where conversation_id = $1 and reply_to = $2",
    )
    .bind(conversation_id)
    .bind(reply_to)
    .fetch_optional(conn)
    .await?)
}

/// Where a page of history starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrom {
    /// The newest messages.
    Newest,
    /// The messages just older than this one.
    Before(MessageId),
    /// The messages just after this `seq` (catching up).
    AfterSeq(i64),
}

/// The most message text (bytes of content) one page of history carries: at worst escaped
/// six-fold in JSON, a page stays well under Lambda's 6 MB response. A page holds at least one
/// message, and is cut at the end away from its cursor, so the next page's cursor is exact.
pub const MAX_PAGE_BYTES: i64 = 512 * 1024;

/// One page of history in ascending `seq`: at most `limit` messages and [`MAX_PAGE_BYTES`].
pub async fn page(
    conn: &mut PgConnection,
    conversation_id: ConversationId,
    from: PageFrom,
    limit: PageLimit,
) -> Result<Vec<Message>, Error> {
    let limit = i64::from(limit.get());
    match from {
        PageFrom::AfterSeq(after) => Ok(super::query_as(
            "select * from (
                 select m.*, sum(octet_length(m.content)) over (order by m.seq) as bytes
                 from (select * from web_conversation_messages
                       where conversation_id = $1 and seq > $2
                       order by seq
                       limit $3) m
             ) page
             where bytes - octet_length(content) < $4
             order by seq",
        )
        .bind(conversation_id)
        .bind(after)
        .bind(limit)
        .bind(MAX_PAGE_BYTES)
        .fetch_all(conn)
        .await?),
        PageFrom::Newest | PageFrom::Before(_) => {
            let before = match from {
                PageFrom::Before(id) => Some(
                    super::query_scalar::<i64>(
                        "select seq from web_conversation_messages
                         where conversation_id = $1 and id = $2",
                    )
                    .bind(conversation_id)
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?
                    .ok_or_else(|| {
                        Error::BadRequest("before is not a message of this conversation".into())
                    })?,
                ),
                _ => None,
            };
            Ok(super::query_as(
                "select * from (
                     select m.*, sum(octet_length(m.content)) over (order by m.seq desc) as bytes
                     from (select * from web_conversation_messages
                           where conversation_id = $1 and ($2::bigint is null or seq < $2)
                           order by seq desc
                           limit $3) m
                 ) newest
                 where bytes - octet_length(content) < $4
                 order by seq",
            )
            .bind(conversation_id)
            .bind(before)
            .bind(limit)
            .bind(MAX_PAGE_BYTES)
            .fetch_all(conn)
            .await?)
        }
    }
}

/// Deletes every message of the conversation and bumps its `updated_at`; the conversation
/// itself stays. Returns how many messages were deleted.
pub async fn reset(conn: &mut PgConnection, conversation_id: ConversationId) -> Result<u64, Error> {
    let deleted = super::query("delete from web_conversation_messages where conversation_id = $1")
        .bind(conversation_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    super::query("update web_conversations set updated_at = clock_timestamp() where id = $1")
        .bind(conversation_id)
        .execute(conn)
        .await?;
    Ok(deleted)
}
