//! The orchestrator: one queued job becomes one stored reply on every socket of the
//! conversation. [`process_one`] does one job; [`handle`] lifts it to an SQS batch, keeping FIFO
//! order when something fails.
//!
//! Guarantees (PROTOCOL §5): a reply is stored before it is sent; each request (a message, an
//! edit, a regenerate) gets at most one stored reply however often the job is delivered (a
//! redelivered job re-sends the stored reply instead of asking the agent again); within a
//! conversation, jobs run in the order they were queued.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::Error;
use crate::agent::{AgentRequest, Agents, Bedrock, Deltas, Echo, OpenAi, Turn};
use crate::config::orchestrator::{OrchestratorSettings, OutputLimits, RetryPolicy};
use crate::config::{self, ConfigError, DatabaseConfig, Lookup, Mode};
use crate::db::Db;
use crate::db::message_path::{self, ContextMessage};
use crate::db::messages::{MessageStatus, StopReason};
use crate::delivery::{Audience, ConnectionsFanout, Fanout, ManagementApi, RedisFanout};
use crate::domain::{MessageId, storable};
use crate::frame::ServerFrame;
use crate::job::Job;
use crate::telemetry::{self, Event};
pub use stream::end_failed;
use stream::{Ended, ReplyStream, deliver};

mod batch;
mod groups;
mod stream;
pub use batch::{
    RETRY_AFTER, SqsRedrive, deadline_from_epoch_ms, handle, invoke, retry_after, run,
};
pub use groups::{BatchReport, Unsettled, failures, receives};

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
    /// aws mode: records not settled go back through it (see [`SqsRedrive`]).
    pub redrive: Option<SqsRedrive>,
}

impl OrchestratorState {
    /// The orchestrator's state (the function's, and `konstruct-local`'s worker's), built from
    /// its settings; opens no connection.
    pub async fn load(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let (aws, secrets) = crate::secrets::aws_config().await;
        let settings = OrchestratorSettings::from_lookup(&lookup)?;
        let db = Db::connect_lazy(&DatabaseConfig::load(&lookup, &secrets).await?);
        let (fanout, redrive): (Arc<dyn Fanout>, _) = match Mode::from_lookup(&lookup)? {
            Mode::Aws { queue_url } => (
                Arc::new(ConnectionsFanout::with_settings(
                    db.clone(),
                    Arc::new(ManagementApi::new(aws.clone())),
                    &settings.fanout,
                )),
                Some(SqsRedrive {
                    client: aws_sdk_sqs::Client::new(&aws),
                    queue_url,
                    dead_letter_url: settings.dead_letter_url.clone(),
                    retry_after: RETRY_AFTER,
                }),
            ),
            Mode::Local { redis_url } => (
                Arc::new(
                    RedisFanout::new(&redis_url)
                        .map_err(|e| ConfigError::new("REDIS_URL", e.to_string()))?,
                ),
                None,
            ),
        };
        let openai_key = config::load_secret(
            &lookup,
            &secrets,
            "OPENAI_API_KEY",
            "OPENAI_API_KEY_SECRET_ARN",
        )
        .await?;
        let mut bedrock = Bedrock::new(aws_sdk_bedrockruntime::Client::new(&aws));
        if let Some(models) = settings.bedrock_model_ids {
            bedrock = bedrock.allowing(models);
        }
        Ok(Self {
            db,
            fanout,
            agents: Arc::new(Agents {
                echo: Echo,
                openai: OpenAi::with_key(&settings.openai_base_url, openai_key),
                bedrock,
            }),
            retry: settings.retry,
            context: ContextLimits::default(),
            output: settings.output,
            max_receives: settings.max_receives,
            job_budget: settings.job_budget,
            redrive,
        })
    }
}

/// One delivery of a job: how often the queue has handed it over (SQS's
/// `ApproximateReceiveCount`), and when it must be done (a Lambda invocation's deadline; none
/// for the local worker).
#[derive(Debug, Clone)]
pub struct Receipt {
    pub receives: u32,
    pub deadline: Option<Instant>,
    /// The X-Ray trace header the job travelled with (from the route that queued it).
    pub trace: Option<String>,
}

/// A job that did not complete. `retry` says whether delivering it again can help; each
/// place a job can fail decides. A job that cannot (a permanent agent failure, an inactive
/// agent, data the database refuses) is dropped once its user has been told.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct JobFailure {
    pub retry: bool,
    /// It failed on its last attempt: the queue should not deliver it again.
    pub last: bool,
    #[source]
    pub error: Error,
    /// What the user is told (`agent_failed`) when the job gives up.
    notice: &'static str,
}

const COULD_NOT_ANSWER: &str = "the agent could not answer; your message is saved";

impl JobFailure {
    /// Trouble that may pass: the database or the network, a model's 5xx or timeout.
    pub fn transient(error: impl Into<Error>) -> Self {
        Self {
            retry: true,
            last: false,
            error: error.into(),
            notice: COULD_NOT_ANSWER,
        }
    }

    /// The same job fails the same way however often it is delivered.
    pub fn permanent(error: impl Into<Error>) -> Self {
        Self {
            retry: false,
            last: false,
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
#[tracing::instrument(skip_all, fields(
    conversation_id = %job.conversation_id,
    message_id = %job.message_id,
    tenant_id = %job.tenant_id,
    trace = %receipt.trace.as_deref().unwrap_or(""),
))]
pub async fn process_one(
    state: &OrchestratorState,
    job: &Job,
    receipt: Receipt,
) -> Result<(), JobFailure> {
    // Until the job's row is read, its deferrals are unknown: every receive counts.
    let mut attempt = Attempt {
        audience: None,
        reply_id: job.reply_id,
        last: receipt.receives >= state.max_receives,
    };
    let started = Instant::now();
    let result = answer(state, job, &receipt, &mut attempt, true).await;
    // One line per job, carrying the span's ids: what a search for a message finds.
    tracing::info!(
        ok = result.is_ok(),
        last = attempt.last,
        ms = started.elapsed().as_millis() as u64,
        "job finished"
    );
    let result = result.map_err(|failure| JobFailure {
        last: attempt.last,
        ..failure
    });
    if let (Err(failure), Some(audience)) = (&result, attempt.audience.as_mut())
        && (!failure.retry || failure.last)
    {
        let frame = ServerFrame::error(&Error::AgentFailed(failure.notice.into()));
        if let Err(e) = state.fanout.send(audience, &frame).await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "agent_failed not sent"
            );
        }
        let ended = match attempt.reply_id {
            Some(reply_id) => end_failed(
                &state.db,
                state.fanout.as_ref(),
                audience,
                job.message_id,
                reply_id,
                None,
            )
            .await
            .map(|_| ()),
            None => Ok(()),
        };
        if let Err(e) = ended {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "reply not ended failed"
            );
        }
    }
    result
}

/// One statement reads everything the job needs (recipients included). A reply that arrives
/// whole is stored by one more; a streamed one is stored as it streams: each flush is one
/// statement that appends to it, reads the user's `cancel` flag and lists the recipients as
/// they are then, before the chunk goes out (invariant 7).
///
/// `in_order`: messages stored before the job's and not answered yet are answered first.
async fn answer(
    state: &OrchestratorState,
    job: &Job,
    receipt: &Receipt,
    attempt: &mut Attempt,
    in_order: bool,
) -> Result<(), JobFailure> {
    let tenant_id = job.tenant_id;
    // A step of its own: no transaction stays open while the agent thinks.
    let loaded = message_path::load_job(
        &state.db,
        tenant_id,
        job.conversation_id,
        job.message_id,
        job.reply_id,
        state.context.messages,
    )
    .await
    .map_err(JobFailure::of_database)?;
    let Some(loaded) = loaded else {
        tracing::warn!("conversation or message gone; job dropped");
        return Ok(());
    };
    let reply_id = *attempt.reply_id.insert(loaded.reply_id);
    let conversation = loaded.conversation;
    // Receives that found no time to start were sent back unattempted; they do not count.
    let attempts = receipt.receives.saturating_sub(loaded.deferrals);
    attempt.last = attempts >= state.max_receives;
    let audience =
        attempt
            .audience
            .insert(Audience::new(tenant_id, conversation.id, loaded.recipients));
    if in_order && loaded.reply.is_none() && !loaded.earlier.is_empty() {
        // Messages stored before this one whose jobs come after it (two routes racing to
        // queue): answered first, each as its own job, then this one, from a fresh read.
        for earlier in loaded.earlier {
            let earlier = Job {
                message_id: earlier,
                reply_id: None,
                ..job.clone()
            };
            let receipt = Receipt {
                receives: 1,
                ..receipt.clone()
            };
            tracing::info!(earlier = %earlier.message_id, "answering an earlier message first");
            match Box::pin(process_one(state, &earlier, receipt)).await {
                // Given up (its user told, its reply failed): settled, so this one goes on.
                Err(failure) if failure.retry => return Err(failure),
                _ => {}
            }
        }
        return Box::pin(answer(state, job, receipt, attempt, false)).await;
    }
    if let Some(reply) = loaded
        .reply
        .filter(|r| r.status != MessageStatus::Streaming)
    {
        tracing::info!("reply already stored; sending it again");
        return deliver(state.fanout.as_ref(), audience, &reply, false)
            .await
            .map_err(JobFailure::transient);
    }
    let history = loaded.history;
    if history.last().map(|m| m.id) != Some(job.message_id) {
        tracing::warn!("user message gone (conversation reset); job dropped");
        return Ok(());
    }
    if attempts > state.max_receives {
        // The last attempt ended without a word (its process died): say it now, and give up.
        return Err(JobFailure::transient(Error::AgentFailed(format!(
            "no attempt left after {} receives",
            receipt.receives
        ))));
    }
    let agent = loaded.agent.ok_or_else(|| {
        JobFailure::permanent(Error::NotFound("the conversation's agent is gone".into()))
    })?;
    if loaded.cancel_requested {
        tracing::info!("cancelled before it started");
        let mut stream = ReplyStream::new(state, &conversation, audience, job.message_id, reply_id);
        let stored = stream
            .end("", MessageStatus::Cancelled, StopReason::Cancelled, None)
            .await?;
        return match stored {
            Some(reply) => deliver(state.fanout.as_ref(), stream.audience, &reply, false)
                .await
                .map_err(JobFailure::transient),
            None => Ok(()),
        };
    }
    if !agent.is_active {
        return Err(JobFailure {
            notice: "this agent is switched off and does not answer; your message is saved",
            ..JobFailure::permanent(Error::AgentFailed(format!(
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
    let reserve = FINISH_RESERVE.min(state.job_budget / 5);
    let agent_deadline = receipt
        .deadline
        .map(|d| d.checked_sub(reserve).unwrap_or(d));
    let (deltas, pieces) = Deltas::channel();
    let stop = tokio::sync::Notify::new();
    let call = async {
        let result = tokio::select! {
            result = state.retry.run(
                state.agents.client(&agent),
                &request,
                &deltas,
                agent_deadline,
            ) => Some(result),
            () = stop.notified() => None,
        };
        drop(deltas);
        result
    };
    let mut stream = ReplyStream::new(state, &conversation, audience, job.message_id, reply_id);
    let (result, leftover) = tokio::join!(call, stream.run(pieces, &stop));
    if result.is_some() {
        telemetry::record(Event::AgentLatency(stream.started.elapsed()));
    }
    let (text, status, stop, usage) = match (result, stream.ended.take()) {
        (_, Some(Ended::Superseded)) => {
            tracing::info!("another attempt owns this reply now");
            return Ok(());
        }
        (_, Some(Ended::Failed(failure))) => return Err(failure),
        (_, Some(Ended::Cancelled)) | (None, None) => (
            leftover,
            MessageStatus::Cancelled,
            StopReason::Cancelled,
            None,
        ),
        // A provider that does not stream: the whole reply, stored in one statement.
        (Some(Ok(reply)), None) if stream.reply.is_none() => (
            storable(&reply.text).into_owned(),
            MessageStatus::Complete,
            reply.stop,
            reply.usage,
        ),
        (Some(Ok(reply)), None) => (leftover, MessageStatus::Complete, reply.stop, reply.usage),
        (Some(Err(err)), None) => {
            tracing::warn!(error = %err, retryable = err.retryable, "agent failed");
            telemetry::record(Event::AgentFailure {
                transient: err.retryable,
            });
            let error = Error::AgentFailed(err.message);
            let failure = if err.retryable {
                JobFailure::transient(error)
            } else {
                JobFailure::permanent(error)
            };
            // A streaming reply stays as it is for the next receive to take over (and reset);
            // on the last, or when retrying cannot help, it ends `failed` with what it had.
            if stream.reply.is_some() && (!failure.retry || attempt.last) {
                stream
                    .end(&leftover, MessageStatus::Failed, StopReason::Error, None)
                    .await?;
            }
            return Err(failure);
        }
    };
    let streamed = stream.reply.is_some();
    if let Some(usage) = usage {
        telemetry::record(Event::OutputTokens(usage.output_tokens));
    }
    let Some(stored) = stream.end(&text, status, stop, usage).await? else {
        return Ok(());
    };
    deliver(state.fanout.as_ref(), stream.audience, &stored, streamed)
        .await
        .map_err(JobFailure::transient)?;
    let waited = (chrono::Utc::now() - job.message.timestamp)
        .to_std()
        .unwrap_or_default();
    telemetry::record(Event::ReplyLatency(waited));
    Ok(())
}

/// What a job learned before it ended: who its frames go to (once its row was read), and
/// whether this is its last attempt.
struct Attempt {
    audience: Option<Audience>,
    /// The reply this request stores (known once the job's row was read, for a job queued
    /// before branches).
    reply_id: Option<MessageId>,
    last: bool,
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
        // The agent tells the owner's words from a platform admin's in the same conversation.
        kept.push(Turn {
            role: message.role,
            content: message.content.clone(),
            by_someone_else: message.by_someone_else,
        });
    }
    kept.reverse();
    kept
}
