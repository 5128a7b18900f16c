//! The reply stored: its first write, its flushes as it streams, its end.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use super::Recipient;
use crate::Error;
use crate::db::conversations::Conversation;
use crate::db::messages::{Message, MessageStatus, StopReason, Usage};
use crate::db::{Db, Scope};
use crate::domain::{ConversationId, MessageId, TenantId};
use crate::error::ResultExt;

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

/// Writes a reply to `reply_to` for the first time (`write_reply`, in the tenant's scope; one
/// round trip): the reply of one request (its id, the request's `reply_id`) is stored once,
/// numbered when it starts, and becomes the head if its user message is; a `streaming` one left
/// by a dead attempt is taken over. Lists the recipients as they are now.
pub async fn write_reply(
    db: &Db,
    conversation: &Conversation,
    write: ReplyWrite<'_>,
) -> Result<StoredReply, Error> {
    let producer = (write.status == MessageStatus::Streaming).then_some(write.producer);
    let row: ReplyRow = db
        .call_one(
            Scope::Tenant(conversation.tenant_id),
            crate::call!(
                "select * from write_reply($1::uuid, $2::uuid, $3::text, $4::uuid, $5::uuid, $6::text, $7::uuid, $8::text, $9::bigint, $10::bigint)",
                conversation.id,
                conversation.tenant_id,
                write.text,
                write.reply_to,
                write.id,
                &stored_name(write.status),
                producer,
                write.stop.map(stored_name).as_deref(),
                write.usage.map(|u| i64::from(u.input_tokens)),
                write.usage.map(|u| i64::from(u.output_tokens))
            ),
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
            let found = crate::db::messages::find(&mut tx, conversation.id, write.id)
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

/// Ends reply `id` (to `reply_to`) `failed` when its job gives up, in the tenant's scope: a
/// reply still `streaming` keeps what it had; when none was written, an empty `failed` one is
/// stored (numbered now), so every request ends answered or visibly failed, and a later
/// message's job knows this one is settled. `None` when the reply had
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
    let row: Row = crate::checked_file!(
        query_as,
        "src/db/message_path/fail_reply.sql",
        conversation_id,
        reply_to,
        id,
        unwritten_since
    )
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
    pub id: MessageId,
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
    Ok(crate::checked!(
        query_as,
        "select tenant_id, conversation_id, id, reply_to, written_at
         from web_conversation_messages
         where status = 'streaming' and written_at < $1 and reply_to is not null
         order by written_at
         limit $2",
        before,
        limit
    )
    .fetch_all(conn)
    .await?)
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
            crate::call!(
                "select * from append_reply($1::uuid, $2::uuid, $3::uuid, $4::bigint, $5::text, $6::text, $7::uuid, $8::text, $9::bigint, $10::bigint)",
                conversation.id,
                flush.id,
                flush.producer,
                i64::try_from(flush.offset).unwrap_or(i64::MAX),
                flush.delta,
                &stored_name(flush.status),
                producer,
                flush.stop.map(stored_name).as_deref(),
                flush.usage.map(|u| i64::from(u.input_tokens)),
                flush.usage.map(|u| i64::from(u.output_tokens))
            ),
        )
        .await?
        .ok_or_else(|| Error::Internal("append_reply returned no row".into()))?;
    Ok(Flushed {
        reply: row.reply.map(|r| r.0),
        cancel_requested: row.cancel_requested,
        recipients: row.recipients.0,
    })
}

/// A status or stop reason as the schema stores it (`text`, the name serde and sqlx share), for
/// a [`Call`].
fn stored_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => unreachable!("a unit variant serializes as its name: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names a [`Call`] writes are the ones the schema stores.
    #[test]
    fn statuses_and_stop_reasons_are_named_as_stored() {
        for (status, name) in [
            (MessageStatus::Complete, "complete"),
            (MessageStatus::Streaming, "streaming"),
            (MessageStatus::Cancelled, "cancelled"),
            (MessageStatus::Failed, "failed"),
        ] {
            assert_eq!(stored_name(status), name);
        }
        for (stop, name) in [
            (StopReason::End, "end"),
            (StopReason::Length, "length"),
            (StopReason::Cancelled, "cancelled"),
            (StopReason::Error, "error"),
        ] {
            assert_eq!(stored_name(stop), name);
        }
    }
}
