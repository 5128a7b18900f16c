//! The orchestrator: one queued job becomes one stored reply on every socket of the
//! conversation. [`process_one`] does one job; [`handle`] lifts it to an SQS batch, keeping FIFO
//! order when something fails.
//!
//! Guarantees (PROTOCOL §5): a reply is stored before it is sent; each user message gets at
//! most one stored reply however often the job is delivered (a redelivered job re-sends the
//! stored reply instead of asking the agent again); within a conversation, jobs run in the
//! order their messages were stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use tokio::sync::mpsc;

use crate::agent::{AgentRequest, Agents, Bedrock, Echo, OpenAi, RetryPolicy, Turn};
use crate::config::{ConfigError, DatabaseConfig, Mode};
use crate::db::message_path::{self, ContextMessage};
use crate::db::messages::Message;
use crate::db::{Db, Scope};
use crate::delivery::{Audience, ConnectionsFanout, Fanout, ManagementApi, RedisFanout, encode};
use crate::domain::{MessageId, storable};
use crate::frame::ServerFrame;
use crate::job::Job;
use crate::{Error, ErrorCode};

/// How much of the conversation the agent sees: the last `messages`, and no more than `chars`
/// characters of them (the newest are kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimits {
    pub messages: u16,
    pub chars: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            messages: 30,
            chars: 32_000,
        }
    }
}

/// Streamed pieces are sent at least this often…
const CHUNK_INTERVAL: Duration = Duration::from_millis(100);
/// …or as soon as this many bytes are waiting.
const CHUNK_BYTES: usize = 1024;
/// The most characters one `chunk` frame carries: even fully escaped (6 bytes a character) it
/// stays inside API Gateway's 32 KiB frame.
const CHUNK_MAX_CHARS: usize = 4096;

/// What the orchestrator needs; built once per process.
#[derive(Clone)]
pub struct OrchestratorState {
    pub db: Db,
    pub fanout: Arc<dyn Fanout>,
    pub agents: Arc<Agents>,
    pub retry: RetryPolicy,
    pub context: ContextLimits,
}

impl OrchestratorState {
    /// From the environment; opens no connection.
    pub async fn from_env() -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let db = Db::connect_lazy(&DatabaseConfig::from_env()?);
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let fanout: Arc<dyn Fanout> = match Mode::from_env()? {
            Mode::Aws { .. } => Arc::new(ConnectionsFanout {
                db: db.clone(),
                delivery: Arc::new(ManagementApi::new(aws.clone())),
            }),
            Mode::Local { redis_url } => Arc::new(
                RedisFanout::new(&redis_url)
                    .map_err(|e| ConfigError::new("REDIS_URL", e.to_string()))?,
            ),
        };
        Ok(Self {
            db,
            fanout,
            agents: Arc::new(Agents {
                echo: Echo,
                openai: OpenAi::from_lookup(env)?,
                bedrock: Bedrock::new(aws_sdk_bedrockruntime::Client::new(&aws)),
            }),
            retry: RetryPolicy::from_lookup(env)?,
            context: ContextLimits::default(),
        })
    }
}

/// A job that did not complete. `retry` says whether delivering it again can help; a job that
/// cannot (a permanent agent failure, a conversation deleted meanwhile) is dropped once its
/// user has been told.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    pub retry: bool,
    #[source]
    pub error: Error,
}

/// Database and delivery trouble is transient as far as a job can tell, except data the
/// database refuses (SQLSTATE class 22, data exception): the same data is refused again.
impl<E: Into<Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        let error = error.into();
        let refused_data = matches!(
            &error,
            Error::Database(sqlx::Error::Database(db))
                if db.code().is_some_and(|code| code.starts_with("22"))
        );
        Self {
            retry: !refused_data,
            error,
        }
    }
}

/// One job: the stored reply re-sent, or the agent asked, its reply stored, then sent.
///
/// Two statements reach the database: one reads everything the job needs (recipients
/// included), one stores the reply and lists the recipients as they are then. Streamed chunks
/// go to the recipients read first; no chunk costs a query.
#[tracing::instrument(skip_all, fields(conversation_id = %job.conversation_id, message_id = %job.message_id))]
pub async fn process_one(state: &OrchestratorState, job: &Job) -> Result<(), Failure> {
    let tenant_id = job.tenant_id;
    let mut tx = state.db.begin(Scope::Tenant(tenant_id)).await?;
    let loaded = message_path::load_job(
        &mut tx,
        job.conversation_id,
        job.message_id,
        state.context.messages,
    )
    .await?;
    // No transaction stays open while the agent thinks: Postgres connections are scarce.
    tx.commit().await?;
    let Some(loaded) = loaded else {
        tracing::warn!("conversation gone; job dropped");
        return Ok(());
    };
    let conversation = loaded.conversation;
    let mut audience = Audience::new(tenant_id, conversation.id, loaded.recipients);
    if let Some(reply) = loaded.reply {
        tracing::info!("reply already stored; sending it again");
        return Ok(deliver(state, &mut audience, &reply, false).await?);
    }
    let history = loaded.history;
    if history.last().map(|m| m.id) != Some(job.message_id) {
        tracing::warn!("user message gone (conversation reset); job dropped");
        return Ok(());
    }
    let agent = loaded
        .agent
        .ok_or_else(|| Error::NotFound("the conversation's agent is gone".into()))?;

    let turns = within_budget(&history, state.context.chars);
    let request = AgentRequest {
        agent: &agent,
        history: &turns,
    };
    let reply_id = MessageId::new();
    let (deltas, pieces) = mpsc::unbounded_channel();
    let call = async {
        let result = state
            .retry
            .run(state.agents.provider(&agent), &request, &deltas)
            .await;
        drop(deltas);
        result
    };
    let (result, streamed) =
        tokio::join!(call, stream_chunks(state, &mut audience, reply_id, pieces));
    let text = match result {
        Ok(text) => storable(&text).into_owned(),
        Err(err) => {
            tracing::warn!(error = %err, retryable = err.retryable, "agent failed");
            let failed =
                Error::AgentFailed("the agent could not answer; your message is saved".into());
            if let Err(e) = state
                .fanout
                .send(&mut audience, &ServerFrame::error(&failed))
                .await
            {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "agent_failed not sent"
                );
            }
            return Err(Failure {
                retry: err.retryable,
                error: Error::AgentFailed(err.message),
            });
        }
    };

    let mut tx = state.db.begin(Scope::Tenant(tenant_id)).await?;
    let stored =
        message_path::store_reply(&mut tx, &conversation, reply_id, job.message_id, &text).await?;
    tx.commit().await?;
    audience.renew(stored.recipients);
    // Chunks carried this id only if this run's reply is the one stored.
    let streamed = streamed && stored.reply.id == reply_id;
    Ok(deliver(state, &mut audience, &stored.reply, streamed).await?)
}

/// The newest turns that fit the character budget, oldest first; the user message always.
fn within_budget(history: &[ContextMessage], chars: usize) -> Vec<Turn> {
    let mut used = 0;
    let mut kept: Vec<Turn> = Vec::new();
    for message in history.iter().rev() {
        let len = message.content.chars().count();
        if !kept.is_empty() && used + len > chars {
            break;
        }
        used += len;
        kept.push(Turn {
            role: message.role,
            content: message.content.clone(),
        });
    }
    kept.reverse();
    kept
}

/// Sends the stored reply as a `response`. A reply too long for one frame travels as `chunk`
/// frames (unless it already streamed) and a `response` without its text.
async fn deliver(
    state: &OrchestratorState,
    audience: &mut Audience,
    reply: &Message,
    streamed: bool,
) -> Result<(), Error> {
    let reply_to = reply
        .reply_to
        .ok_or_else(|| Error::Internal("a reply without reply_to".into()))?;
    let mut frame = ServerFrame::Response {
        text: Some(reply.content.clone()),
        conversation_id: reply.conversation_id,
        message_id: reply.id,
        reply_to,
    };
    if encode(&frame).is_err() {
        if !streamed {
            for delta in split_chars(&reply.content, CHUNK_MAX_CHARS) {
                let chunk = ServerFrame::Chunk {
                    conversation_id: reply.conversation_id,
                    message_id: reply.id,
                    delta: delta.to_owned(),
                };
                state.fanout.send(audience, &chunk).await?;
            }
        }
        if let ServerFrame::Response { text, .. } = &mut frame {
            *text = None;
        }
    }
    state.fanout.send(audience, &frame).await
}

/// Forwards streamed pieces as `chunk` frames, batched by time and size; says whether any went.
async fn stream_chunks(
    state: &OrchestratorState,
    audience: &mut Audience,
    message_id: MessageId,
    mut pieces: mpsc::UnboundedReceiver<String>,
) -> bool {
    let mut buffer = String::new();
    let mut sent = false;
    let mut tick = tokio::time::interval(CHUNK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let done = tokio::select! {
            piece = pieces.recv() => match piece {
                Some(piece) => {
                    buffer.push_str(&storable(&piece));
                    if buffer.len() < CHUNK_BYTES {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        for delta in split_chars(&buffer, CHUNK_MAX_CHARS) {
            let chunk = ServerFrame::Chunk {
                conversation_id: audience.conversation_id,
                message_id,
                delta: delta.to_owned(),
            };
            match state.fanout.send(audience, &chunk).await {
                Ok(()) => sent = true,
                Err(e) => tracing::warn!(error = &e as &dyn std::error::Error, "chunk not sent"),
            }
        }
        buffer.clear();
        if done {
            return sent;
        }
    }
}

/// `text` in pieces of at most `max` characters.
fn split_chars(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .char_indices()
            .nth(max)
            .map_or(rest.len(), |(index, _)| index);
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// An SQS batch. Records of one message group run in order; groups run side by side. After the
/// first failure in a group, that record and every later one of the group are reported failed,
/// so SQS delivers them again in order. A record whose body is not a job is reported failed
/// (it reaches the dead-letter queue after `maxReceiveCount`).
pub async fn handle(state: &OrchestratorState, event: SqsEvent) -> SqsBatchResponse {
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<SqsMessage>> = HashMap::new();
    for record in event.records {
        let group = record
            .attributes
            .get("MessageGroupId")
            .cloned()
            .or_else(|| record.message_id.clone())
            .unwrap_or_default();
        if !groups.contains_key(&group) {
            order.push(group.clone());
        }
        groups.entry(group).or_default().push(record);
    }
    let runs = order
        .into_iter()
        .filter_map(|group| groups.remove(&group))
        .map(|records| process_group(state, records));
    let failed = futures::future::join_all(runs).await.concat();
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = failed
        .into_iter()
        .map(|id| {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = id;
            failure
        })
        .collect();
    response
}

async fn process_group(state: &OrchestratorState, records: Vec<SqsMessage>) -> Vec<String> {
    let mut failed = Vec::new();
    for record in records {
        let id = record.message_id.clone().unwrap_or_default();
        if !failed.is_empty() {
            failed.push(id);
            continue;
        }
        let outcome = match record.body.as_deref().map(Job::from_body) {
            Some(Ok(job)) => process_one(state, &job).await,
            Some(Err(e)) => Err(Failure::from(e)),
            None => Err(Failure::from(Error::BadRequest(
                "record has no body".into(),
            ))),
        };
        match outcome {
            Ok(()) => {}
            Err(f) if !f.retry => {
                tracing::warn!(message_id = %id, error = %f, "job dropped: retrying cannot help");
            }
            Err(f) => {
                if f.error.code() == ErrorCode::BadRequest {
                    tracing::error!(message_id = %id, error = %f, "unparseable record");
                } else {
                    tracing::error!(message_id = %id, error = &f as &dyn std::error::Error, "job failed");
                }
                failed.push(id);
            }
        }
    }
    failed
}

/// Runs the orchestrator as a Lambda function on its SQS event source.
pub async fn run(state: OrchestratorState) -> Result<(), lambda_runtime::Error> {
    let state = &state;
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<SqsEvent>| async move {
            Ok::<_, std::convert::Infallible>(handle(state, event.payload).await)
        },
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_chars_keeps_characters_whole() {
        let pieces: Vec<&str> = split_chars("aébc€d", 2).collect();
        assert_eq!(pieces, vec!["aé", "bc", "€d"]);
        assert_eq!(split_chars("", 3).count(), 0);
        assert_eq!(split_chars("abc", 10).collect::<Vec<_>>(), vec!["abc"]);
    }
}
