//! The unit of work between `ws-message` and the orchestrator.

use serde::{Deserialize, Serialize};

use crate::domain::{ConversationId, MessageId, TenantId, UserId};
use crate::konstruct_message::KonstructMessage;

/// One stored user message waiting for its reply. Everything here was checked or produced by
/// the server; nothing is re-derived from what the browser sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub tenant_id: TenantId,
    pub conversation_id: ConversationId,
    pub portal_user_id: UserId,
    /// The stored user message: the reply's `reply_to`.
    pub message_id: MessageId,
    /// The id of the reply this request stores (the message's `reply_id` when it was queued;
    /// a regenerate queues a new one): the queue's deduplication id. Absent from jobs queued
    /// before branches: the message's current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_id: Option<MessageId>,
    pub message: KonstructMessage,
}

impl Job {
    /// What the queue deduplicates on: one job per request (a message, an edit, a
    /// regenerate), however often it is queued.
    pub fn request_id(&self) -> MessageId {
        self.reply_id.unwrap_or(self.message_id)
    }

    /// The body of a queued job. An SQS message body is at most 256 KiB; a job carries at most
    /// 8000 characters of text, well inside it.
    pub fn to_body(&self) -> String {
        serde_json::to_string(self).expect("jobs always serialize")
    }

    pub fn from_body(body: &str) -> Result<Self, crate::Error> {
        serde_json::from_str(body)
            .map_err(|e| crate::Error::BadRequest(format!("malformed job body: {e}")))
    }
}
