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
    /// The stored user message: SQS's deduplication id and the reply's `reply_to`.
    pub message_id: MessageId,
    pub message: KonstructMessage,
}

impl Job {
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
