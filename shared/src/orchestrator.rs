//! The orchestrator: one queued job becomes one stored reply on every socket of the
//! conversation. [`process_one`] does one job; [`handle`] lifts it to an SQS batch, keeping FIFO
//! order when something fails.
//!
//! Guarantees (PROTOCOL §5): a reply is stored before it is sent; each user message gets at
//! most one stored reply however often the job is delivered (a redelivered job re-sends the
//! stored reply instead of asking the agent again); within a conversation, jobs run in the
//! order their messages were stored.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::agent::{
    AgentReply, AgentRequest, Agents, Bedrock, Echo, OpenAi, OutputLimits, RetryPolicy, Turn,
};
use crate::config::{ConfigError, DatabaseConfig, Mode, positive};
use crate::db::message_path::{self, ContextMessage};
use crate::db::messages::{Message, StopReason};
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

/// The time kept back from a Lambda invocation's deadline to return the batch response.
const RESPONSE_MARGIN: Duration = Duration::from_secs(1);
/// The time kept back from the agent within a job, to store and deliver its reply: a fifth of
/// the job budget, at most this.
const FINISH_RESERVE: Duration = Duration::from_secs(2);

/// What the orchestrator needs; built once per process.
#[derive(Clone)]
pub struct OrchestratorState {
    pub db: Db,
    pub fanout: Arc<dyn Fanout>,
    pub agents: Arc<Agents>,
    pub retry: RetryPolicy,
    pub context: ContextLimits,
    pub output: OutputLimits,
    /// Receives of a job before the queue gives up on it (SQS's `maxReceiveCount`): the user
    /// is told of a transient failure only on the last.
    pub max_receives: u32,
    /// The time a job may need: none starts with less left before the invocation's deadline.
    pub job_budget: Duration,
}

/// Defaults of [`OrchestratorState`]'s limits.
pub const DEFAULT_MAX_RECEIVES: u32 = 5;
pub const DEFAULT_JOB_BUDGET: Duration = Duration::from_secs(30);

impl OrchestratorState {
    /// From the environment; opens no connection.
    pub async fn from_env() -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let db = Db::connect_lazy(&DatabaseConfig::from_env()?);
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let fanout: Arc<dyn Fanout> = match Mode::from_env()? {
            Mode::Aws { .. } => Arc::new(ConnectionsFanout::from_lookup(
                db.clone(),
                Arc::new(ManagementApi::new(aws.clone())),
                env,
            )?),
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
                bedrock: Bedrock::from_lookup(aws_sdk_bedrockruntime::Client::new(&aws), env),
            }),
            retry: RetryPolicy::from_lookup(env)?,
            context: ContextLimits::default(),
            output: OutputLimits::from_lookup(env)?,
            max_receives: positive(&env, "MAX_RECEIVE_COUNT")?.map_or(DEFAULT_MAX_RECEIVES, |n| {
                u32::try_from(n).unwrap_or(u32::MAX)
            }),
            job_budget: positive(&env, "JOB_BUDGET_SECONDS")?
                .map_or(DEFAULT_JOB_BUDGET, Duration::from_secs),
        })
    }
}

/// One delivery of a job: whether the queue will give up on it after this, and when it must
/// be done (a Lambda invocation's deadline; none for the local worker).
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    pub last: bool,
    pub deadline: Option<Instant>,
}

/// A job that did not complete. `retry` says whether delivering it again can help; each
/// place a job can fail decides. A job that cannot (a permanent agent failure, an inactive
/// agent, data the database refuses) is dropped once its user has been told.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    pub retry: bool,
    #[source]
    pub error: Error,
    /// What the user is told (`agent_failed`) when the job gives up.
    notice: &'static str,
}

const COULD_NOT_ANSWER: &str = "the agent could not answer; your message is saved";

impl Failure {
    /// Trouble that may pass: the database or the network, a model's 5xx or timeout.
    pub fn transient(error: impl Into<Error>) -> Self {
        Self {
            retry: true,
            error: error.into(),
            notice: COULD_NOT_ANSWER,
        }
    }

    /// The same job fails the same way however often it is delivered.
    pub fn permanent(error: impl Into<Error>) -> Self {
        Self {
            retry: false,
            error: error.into(),
            notice: COULD_NOT_ANSWER,
        }
    }

    /// A database step's failure: data the database refuses (SQLSTATE class 22, data
    /// exception; class 23, a violated constraint) and rows that are gone are permanent; the
    /// rest (connections, timeouts, serialization) may pass.
    pub fn of_database(error: Error) -> Self {
        let permanent = match &error {
            Error::Database(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
            Error::NotFound(_) | Error::BadRequest(_) => true,
            _ => false,
        };
        if permanent {
            Self::permanent(error)
        } else {
            Self::transient(error)
        }
    }
}

/// One job: the stored reply re-sent, or the agent asked, its reply stored, then sent. When
/// the job gives up (a permanent failure, or a transient one on its last receive), the
/// conversation's sockets get `agent_failed`; until then a transient failure is silent, the
/// message still being worked on.
#[tracing::instrument(skip_all, fields(conversation_id = %job.conversation_id, message_id = %job.message_id))]
pub async fn process_one(
    state: &OrchestratorState,
    job: &Job,
    receipt: Receipt,
) -> Result<(), Failure> {
    let mut audience = None;
    let result = answer(state, job, receipt, &mut audience).await;
    if let (Err(failure), Some(audience)) = (&result, audience.as_mut())
        && (!failure.retry || receipt.last)
    {
        let frame = ServerFrame::error(&Error::AgentFailed(failure.notice.into()));
        if let Err(e) = state.fanout.send(audience, &frame).await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "agent_failed not sent"
            );
        }
    }
    result
}

/// Two statements reach the database: one reads everything the job needs (recipients
/// included), one stores the reply and lists the recipients as they are then. Streamed chunks
/// go to the recipients read first; no chunk costs a query.
async fn answer(
    state: &OrchestratorState,
    job: &Job,
    receipt: Receipt,
    audience_out: &mut Option<Audience>,
) -> Result<(), Failure> {
    let tenant_id = job.tenant_id;
    let mut tx = state
        .db
        .begin(Scope::Tenant(tenant_id))
        .await
        .map_err(Failure::transient)?;
    let loaded = message_path::load_job(
        &mut tx,
        job.conversation_id,
        job.message_id,
        state.context.messages,
    )
    .await
    .map_err(Failure::of_database)?;
    // No transaction stays open while the agent thinks: Postgres connections are scarce.
    tx.commit().await.map_err(Failure::transient)?;
    let Some(loaded) = loaded else {
        tracing::warn!("conversation gone; job dropped");
        return Ok(());
    };
    let conversation = loaded.conversation;
    let audience =
        audience_out.insert(Audience::new(tenant_id, conversation.id, loaded.recipients));
    if let Some(reply) = loaded.reply {
        tracing::info!("reply already stored; sending it again");
        return deliver(state, audience, &reply, false)
            .await
            .map_err(Failure::transient);
    }
    let history = loaded.history;
    if history.last().map(|m| m.id) != Some(job.message_id) {
        tracing::warn!("user message gone (conversation reset); job dropped");
        return Ok(());
    }
    let agent = loaded.agent.ok_or_else(|| {
        Failure::permanent(Error::NotFound("the conversation's agent is gone".into()))
    })?;
    if !agent.is_active {
        return Err(Failure {
            notice: "this agent is switched off and does not answer; your message is saved",
            ..Failure::permanent(Error::AgentFailed(format!(
                "agent {} is not active",
                agent.id
            )))
        });
    }

    let turns = within_budget(&history, state.context.chars);
    let request = AgentRequest {
        agent: &agent,
        history: &turns,
        max_tokens: state.output.max_tokens_for(&agent),
        max_reply_bytes: state.output.max_reply_bytes,
    };
    let reply_id = MessageId::new();
    let (deltas, pieces) = mpsc::unbounded_channel();
    let reserve = FINISH_RESERVE.min(state.job_budget / 5);
    let agent_deadline = receipt
        .deadline
        .map(|d| d.checked_sub(reserve).unwrap_or(d));
    let call = async {
        let result = state
            .retry
            .run(
                state.agents.provider(&agent),
                &request,
                &deltas,
                agent_deadline,
            )
            .await;
        drop(deltas);
        result
    };
    let (result, streamed) = tokio::join!(call, stream_chunks(state, audience, reply_id, pieces));
    let reply = match result {
        Ok(reply) => AgentReply {
            text: storable(&reply.text).into_owned(),
            ..reply
        },
        Err(err) => {
            tracing::warn!(error = %err, retryable = err.retryable, "agent failed");
            let error = Error::AgentFailed(err.message);
            return Err(if err.retryable {
                Failure::transient(error)
            } else {
                Failure::permanent(error)
            });
        }
    };

    let mut tx = state
        .db
        .begin(Scope::Tenant(tenant_id))
        .await
        .map_err(Failure::transient)?;
    let stored = message_path::store_reply(
        &mut tx,
        &conversation,
        reply_id,
        job.message_id,
        &reply.text,
        reply.stop,
        reply.usage,
    )
    .await
    .map_err(Failure::of_database)?;
    tx.commit().await.map_err(Failure::transient)?;
    audience.renew(stored.recipients);
    // Chunks carried this id only if this run's reply is the one stored.
    let streamed = streamed && stored.reply.id == reply_id;
    deliver(state, audience, &stored.reply, streamed)
        .await
        .map_err(Failure::transient)
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
        stop_reason: reply.stop_reason.unwrap_or(StopReason::End),
        usage: reply.usage(),
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
/// so SQS delivers them again in order. With a `deadline` (the Lambda invocation's), no job
/// starts with less than the job budget left, and the response goes out a moment before the
/// deadline whatever is still running: every record not finished by then is reported failed.
/// A record whose body is not a job is dropped (logged): no delivery can make it one.
pub async fn handle(
    state: &OrchestratorState,
    event: SqsEvent,
    deadline: Option<Instant>,
) -> SqsBatchResponse {
    let mut ids: Vec<String> = Vec::new();
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<SqsMessage>> = HashMap::new();
    for record in event.records {
        let id = record.message_id.clone().unwrap_or_default();
        let group = record
            .attributes
            .get("MessageGroupId")
            .cloned()
            .unwrap_or_else(|| id.clone());
        ids.push(id);
        if !groups.contains_key(&group) {
            order.push(group.clone());
        }
        groups.entry(group).or_default().push(record);
    }
    let cutoff = deadline.map(|d| d.checked_sub(RESPONSE_MARGIN).unwrap_or(d));
    let settled = Mutex::new(HashSet::new());
    let runs = order
        .into_iter()
        .filter_map(|group| groups.remove(&group))
        .map(|records| process_group(state, records, cutoff, &settled));
    let all = futures::future::join_all(runs);
    match cutoff {
        Some(cutoff) => {
            if tokio::time::timeout_at(cutoff, all).await.is_err() {
                tracing::warn!("deadline near: unfinished records reported failed");
            }
        }
        None => {
            all.await;
        }
    }
    let settled = settled.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = ids
        .into_iter()
        .filter(|id| !settled.contains(id))
        .map(|id| {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = id;
            failure
        })
        .collect();
    response
}

/// Works one message group's records in order, marking each one finished with in `settled`;
/// stops at the first that failed, or that could not finish before `cutoff`.
async fn process_group(
    state: &OrchestratorState,
    records: Vec<SqsMessage>,
    cutoff: Option<Instant>,
    settled: &Mutex<HashSet<String>>,
) {
    for record in records {
        let id = record.message_id.clone().unwrap_or_default();
        if cutoff.is_some_and(|c| Instant::now() + state.job_budget > c) {
            tracing::info!(message_id = %id, "not enough time left for the job; left for the next receive");
            return;
        }
        let receives: u32 = record
            .attributes
            .get("ApproximateReceiveCount")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let receipt = Receipt {
            last: receives >= state.max_receives,
            deadline: cutoff,
        };
        let outcome = match record.body.as_deref().map(Job::from_body) {
            Some(Ok(job)) => process_one(state, &job, receipt).await,
            Some(Err(e)) => Err(Failure::permanent(e)),
            None => Err(Failure::permanent(Error::BadRequest(
                "record has no body".into(),
            ))),
        };
        match outcome {
            Ok(()) => {}
            Err(f) if !f.retry => {
                if f.error.code() == ErrorCode::BadRequest {
                    tracing::error!(message_id = %id, error = %f, "unparseable record dropped");
                } else {
                    tracing::warn!(message_id = %id, error = %f, "job dropped: retrying cannot help");
                }
            }
            Err(f) => {
                tracing::error!(message_id = %id, receives, error = &f as &dyn std::error::Error, "job failed; to be retried");
                return;
            }
        }
        settled.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    }
}

/// The instant a Lambda deadline (milliseconds since the Unix epoch) falls on; none when it is
/// not in the future (a runtime emulator that sends no real deadline), so the batch still runs.
pub fn deadline_from_epoch_ms(deadline_ms: u64) -> Option<Instant> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if deadline_ms <= now_ms {
        tracing::warn!(
            deadline_ms,
            now_ms,
            "invocation deadline already past; ignored"
        );
        return None;
    }
    Some(Instant::now() + Duration::from_millis(deadline_ms - now_ms))
}

/// Runs the orchestrator as a Lambda function on its SQS event source, each invocation bounded
/// by its deadline.
pub async fn run(state: OrchestratorState) -> Result<(), lambda_runtime::Error> {
    let state = &state;
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<SqsEvent>| async move {
            let deadline = deadline_from_epoch_ms(event.context.deadline);
            Ok::<_, std::convert::Infallible>(handle(state, event.payload, deadline).await)
        },
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_in_the_past_is_none_and_one_ahead_is_that_far_ahead() {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(deadline_from_epoch_ms(0).is_none());
        assert!(deadline_from_epoch_ms(now_ms - 1).is_none());
        let ahead = deadline_from_epoch_ms(now_ms + 60_000).unwrap() - Instant::now();
        assert!(ahead > Duration::from_secs(59) && ahead <= Duration::from_secs(60));
    }

    #[test]
    fn split_chars_keeps_characters_whole() {
        let pieces: Vec<&str> = split_chars("aébc€d", 2).collect();
        assert_eq!(pieces, vec!["aé", "bc", "€d"]);
        assert_eq!(split_chars("", 3).count(), 0);
        assert_eq!(split_chars("abc", 10).collect::<Vec<_>>(), vec!["abc"]);
    }
}
