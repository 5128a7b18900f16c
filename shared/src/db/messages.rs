//! `web_conversation_messages`: idempotent writes and cursor pagination.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::Error;
use crate::domain::{ClientMessageId, ConversationId, MessageId, PageLimit, TenantId, UserId};

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
    /// The message it follows (PROTOCOL §2 "Branches"); `None` for a conversation's first.
    #[serde(default)]
    #[sqlx(default)]
    pub parent_id: Option<MessageId>,
    /// User messages: the id the reply of their current request takes.
    #[serde(default)]
    #[sqlx(default)]
    pub reply_id: Option<MessageId>,
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
    /// The message it follows; `null` for the conversation's first (PROTOCOL §2 "Branches").
    pub parent_id: Option<MessageId>,
    /// User messages: the id their reply takes (before it starts, a message sent after this
    /// one names it as its parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_id: Option<MessageId>,
    /// History items: the ids of the messages with the same parent (this one among them),
    /// oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub siblings: Option<Vec<MessageId>>,
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
            parent_id: m.parent_id,
            reply_id: m.reply_id,
            siblings: None,
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

/// A stored message of the conversation, if it is there.
pub async fn find(
    conn: &mut PgConnection,
    conversation_id: ConversationId,
    id: MessageId,
) -> Result<Option<Message>, Error> {
    Ok(crate::checked!(
        query_as,
        "select * from web_conversation_messages
         where conversation_id = $1 and id = $2",
        conversation_id,
        id
    )
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

/// Which messages a page of history is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Branch {
    /// The conversation's current branch: the path from its head back.
    #[default]
    Current,
    /// Every message of the conversation (the whole tree), by `seq`.
    All,
}

/// A message of a page, with the ids of the messages beside it (same parent), oldest first.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PageItem {
    #[sqlx(flatten)]
    pub message: Message,
    pub siblings: sqlx::types::Json<Vec<MessageId>>,
}

impl From<PageItem> for MessageView {
    fn from(item: PageItem) -> Self {
        Self {
            siblings: Some(item.siblings.0),
            ..Self::from(item.message)
        }
    }
}

/// The most messages of a branch [`page`] walks to find those after a `seq`: a branch longer
/// than this is read from its newest end.
const MAX_BRANCH_WALK: i64 = 100_000;

/// One page of history in ascending `seq`: at most `limit` messages and [`MAX_PAGE_BYTES`],
/// from `branch`, each with its siblings.
pub async fn page(
    conn: &mut PgConnection,
    conversation_id: ConversationId,
    branch: Branch,
    from: PageFrom,
    limit: PageLimit,
) -> Result<Vec<PageItem>, Error> {
    let limit = i64::from(limit.get());
    let before = match from {
        PageFrom::Before(id) => Some(
            crate::checked!(
                query_scalar::<i64>,
                "select seq from web_conversation_messages
                 where conversation_id = $1 and id = $2",
                conversation_id,
                id
            )
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| {
                Error::BadRequest("before is not a message of this conversation".into())
            })?,
        ),
        _ => None,
    };
    // The candidates: the whole conversation, or the path from the head (or from `before`,
    // whose own row is left out) back.
    let (start, walk, after) = match from {
        PageFrom::AfterSeq(after) => (None, MAX_BRANCH_WALK, Some(after)),
        PageFrom::Before(id) => (Some(id), limit + 1, None),
        PageFrom::Newest => (None, limit, None),
    };
    let newest_first = after.is_none();
    Ok(crate::checked_file!(
        query_as,
        "src/db/messages_page.sql",
        conversation_id,
        branch == Branch::All,
        start,
        walk,
        after,
        before,
        newest_first,
        limit,
        MAX_PAGE_BYTES
    )
    .fetch_all(conn)
    .await?)
}

/// Deletes every message of the conversation and bumps its `updated_at`; the conversation
/// itself stays, and keeps its `last_seq`, so numbering goes on after a reset and a client
/// resuming from before it misses nothing stored since. Returns how many messages were deleted.
pub async fn reset(conn: &mut PgConnection, conversation_id: ConversationId) -> Result<u64, Error> {
    let deleted = crate::checked!(
        query,
        "delete from web_conversation_messages where conversation_id = $1",
        conversation_id
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    crate::checked!(
        query,
        "update web_conversations set updated_at = clock_timestamp(), head_id = null where id = $1",
        conversation_id
    )
    .execute(conn)
    .await?;
    Ok(deleted)
}
