//! What one job needs, read at once.

use serde::Deserialize;
use sqlx::PgConnection;
use sqlx::types::Json;

use super::Recipient;
use crate::Error;
use crate::db::agents::Agent;
use crate::db::conversations::Conversation;
use crate::db::messages::{Message, MessageRole};
use crate::db::{Db, Scope};
use crate::domain::{ConversationId, MessageId, TenantId};

/// What one job needs, read at once: the conversation, its agent, a reply already stored (a
/// redelivered job), the context the agent sees, and the sockets to send to.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub conversation: Conversation,
    /// `None` when the agent row is gone.
    pub agent: Option<Agent>,
    pub reply: Option<Message>,
    /// The id of the reply this job's request stores.
    pub reply_id: MessageId,
    /// The branch up to the job's message, its last `limit` messages oldest first, each
    /// reply right after the message it answers (a reply is often stored after later user
    /// messages arrived). Its last element is the job's message, unless that was deleted.
    ///
    /// The window is chosen among the newest `2 × limit` messages stored up to the job's
    /// message and the replies stored after it, so its cost does not grow with the
    /// conversation; only a backlog of more than `limit` unanswered messages could leave a
    /// reply stored late out of it.
    pub history: Vec<ContextMessage>,
    pub recipients: Vec<Recipient>,
    /// The user cancelled the job's message before it started, or asked for a new reply since
    /// (this job's request is no longer the message's current one).
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
    reply_id: Option<MessageId>,
    history: Json<Vec<ContextMessage>>,
    recipients: Json<Vec<Recipient>>,
    cancel_requested: bool,
    deferrals: i32,
    earlier: Json<Vec<MessageId>>,
}

/// The orchestrator's read (`job_context`, in the tenant's scope; one round trip) for the
/// request whose reply is `reply_id` (`None`: the message's current request); `None` when the
/// conversation or the message is gone.
pub async fn load_job(
    db: &Db,
    tenant_id: TenantId,
    conversation_id: ConversationId,
    message_id: MessageId,
    reply_id: Option<MessageId>,
    limit: u16,
) -> Result<Option<JobContext>, Error> {
    let row: Option<JobRow> = db
        .call_one(
            Scope::Tenant(tenant_id),
            crate::call!(
                "select * from job_context($1::uuid, $2::uuid, $3::bigint, $4::bigint, $5::uuid)",
                conversation_id,
                message_id,
                i64::from(limit),
                EARLIER_WINDOW,
                reply_id
            ),
        )
        .await?;
    Ok(row.and_then(|row| {
        Some(JobContext {
            conversation: row.conversation.0,
            agent: row.agent.map(|a| a.0),
            reply: row.reply.map(|r| r.0),
            reply_id: row.reply_id?,
            history: row.history.0,
            recipients: row.recipients.0,
            cancel_requested: row.cancel_requested,
            deferrals: u32::try_from(row.deferrals).unwrap_or(0),
            earlier: row.earlier.0,
        })
    }))
}

/// Counts one deferral for each of these user messages' jobs: received, but sent back to the
/// queue without being started (see `orchestrator::handle`).
pub async fn defer_jobs(conn: &mut PgConnection, message_ids: &[MessageId]) -> Result<(), Error> {
    let ids: Vec<uuid::Uuid> = message_ids.iter().map(MessageId::as_uuid).collect();
    crate::checked!(
        query,
        "update web_conversation_messages set job_deferrals = job_deferrals + 1
         where id = any($1) and role = 'user'",
        ids
    )
    .execute(conn)
    .await?;
    Ok(())
}
