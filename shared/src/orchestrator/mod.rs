//! The orchestrator: one queued job becomes one stored reply on every socket of the
//! conversation. [`process_one`] does one job; [`handle`] lifts it to an SQS batch, keeping FIFO
//! order when something fails.
//!
//! Guarantees (PROTOCOL §5): a reply is stored before it is sent; each user message gets at
//! most one stored reply however often the job is delivered (a redelivered job re-sends the
//! stored reply instead of asking the agent again); within a conversation, jobs run in the
//! order their messages were stored.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use uuid::Uuid;

use crate::Error;
use crate::agent::{
    AgentRequest, Agents, Bedrock, Deltas, Echo, OpenAi, OutputLimits, RetryPolicy, Turn,
};
use crate::config::{self, ConfigError, DatabaseConfig, Lookup, Mode};
use crate::db::conversations::Conversation;
use crate::db::message_path::{self, ContextMessage, ReplyFlush, ReplyWrite, Written};
use crate::db::messages::{Message, MessageStatus, StopReason, Usage};
use crate::db::{Db, Scope};
use crate::delivery::{Audience, ConnectionsFanout, Fanout, ManagementApi, RedisFanout, encode};
use crate::domain::{MessageId, storable};
use crate::frame::{ChunkOf, ServerFrame};
use crate::job::Job;
use crate::telemetry::{self, Event};

mod batch;
pub use batch::{
    BatchReport, RETRY_AFTER, SqsRedrive, Unsettled, deadline_from_epoch_ms, failures, handle,
    invoke, receives, retry_after, run,
};

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
/// While posts wait for the posting budget, streamed pieces are sent this often at most.
const PRESSED_CHUNK_INTERVAL: Duration = Duration::from_millis(1000);

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

/// Defaults of [`OrchestratorState`]'s limits.
pub const DEFAULT_MAX_RECEIVES: u32 = 5;
pub const DEFAULT_JOB_BUDGET: Duration = Duration::from_secs(30);

impl OrchestratorState {
    /// The orchestrator's state (the function's, and `konstruct-local`'s worker's); opens no
    /// connection.
    pub async fn load(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let (aws, secrets) = crate::secrets::aws_config().await;
        let db = Db::connect_lazy(&DatabaseConfig::load(&lookup, &secrets).await?);
        let (fanout, redrive): (Arc<dyn Fanout>, _) = match Mode::from_lookup(&lookup)? {
            Mode::Aws { queue_url } => (
                Arc::new(ConnectionsFanout::from_lookup(
                    db.clone(),
                    Arc::new(ManagementApi::new(aws.clone())),
                    &lookup,
                )?),
                Some(SqsRedrive {
                    client: aws_sdk_sqs::Client::new(&aws),
                    queue_url,
                    dead_letter_url: config::http_url(&lookup, "DEAD_LETTER_QUEUE_URL")?,
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
        Ok(Self {
            db,
            fanout,
            agents: Arc::new(Agents {
                echo: Echo,
                openai: OpenAi::load(&lookup, &secrets).await?,
                bedrock: Bedrock::from_lookup(aws_sdk_bedrockruntime::Client::new(&aws), &lookup),
            }),
            retry: RetryPolicy::from_lookup(&lookup)?,
            context: ContextLimits::default(),
            output: OutputLimits::from_lookup(&lookup)?,
            max_receives: config::orchestrator::max_receives(&lookup)?,
            job_budget: config::orchestrator::job_budget(&lookup)?,
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
        let ended = end_failed(
            &state.db,
            state.fanout.as_ref(),
            audience,
            job.message_id,
            None,
        );
        if let Err(e) = ended.await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "reply not ended failed"
            );
        }
    }
    result
}

/// Ends the reply to `reply_to` `failed` (what streamed of it kept, or an empty one stored) and
/// tells the audience's sockets; `false` when there was nothing to end. A job that gives up
/// calls it, and the sweeper for a reply nobody has written since `unwritten_since`: no reply
/// stays `streaming`, and the next message's job knows this one is settled.
pub async fn end_failed(
    db: &Db,
    fanout: &dyn Fanout,
    audience: &mut Audience,
    reply_to: MessageId,
    unwritten_since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<bool, Error> {
    let mut tx = db.begin(Scope::Tenant(audience.tenant_id)).await?;
    let failed = message_path::fail_reply(
        &mut tx,
        audience.conversation_id,
        reply_to,
        MessageId::new(),
        unwritten_since,
    )
    .await?;
    tx.commit().await?;
    let Some((reply, recipients)) = failed else {
        return Ok(false);
    };
    audience.renew(recipients);
    deliver(fanout, audience, &reply, true).await?;
    Ok(true)
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
        state.context.messages,
    )
    .await
    .map_err(JobFailure::of_database)?;
    let Some(loaded) = loaded else {
        tracing::warn!("conversation gone; job dropped");
        return Ok(());
    };
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
        let mut stream = ReplyStream::new(state, &conversation, audience, job.message_id);
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
    let mut stream = ReplyStream::new(state, &conversation, audience, job.message_id);
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
    last: bool,
}

/// What one [`ReplyStream::store`] found.
struct Stored {
    reply: Option<Message>,
    reset: bool,
    cancel_requested: bool,
}

/// Why a stream stopped before the agent was done.
enum Ended {
    /// The user asked (`cancel`).
    Cancelled,
    /// Another attempt took the reply over, or it ended already.
    Superseded,
    /// Storing a flush failed.
    Failed(JobFailure),
}

/// A reply stored as it streams: written at its first flush (numbered then), appended to at
/// each later one, each time before the chunk goes out; chunks carry the offset they start at.
struct ReplyStream<'a> {
    state: &'a OrchestratorState,
    conversation: &'a Conversation,
    audience: &'a mut Audience,
    reply_to: MessageId,
    /// This attempt, as the row's `producer`.
    producer: Uuid,
    /// The row, once written.
    reply: Option<Message>,
    /// Characters stored so far.
    offset: usize,
    /// The text stored so far: a chunk a socket missed is sent again from it.
    text: String,
    ended: Option<Ended>,
    /// When the agent was asked: the time to the first chunk counts from here.
    started: Instant,
}

impl<'a> ReplyStream<'a> {
    fn new(
        state: &'a OrchestratorState,
        conversation: &'a Conversation,
        audience: &'a mut Audience,
        reply_to: MessageId,
    ) -> Self {
        Self {
            state,
            conversation,
            audience,
            reply_to,
            producer: Uuid::new_v4(),
            reply: None,
            offset: 0,
            text: String::new(),
            ended: None,
            started: Instant::now(),
        }
    }

    /// Flushes the first piece at once (what a person waits for), then pieces as they come,
    /// every [`CHUNK_INTERVAL`] or [`CHUNK_BYTES`]; asks the agent to `stop` when the stream
    /// cannot go on. Returns what was received but not flushed (the tail, stored by
    /// [`Self::finish`]).
    async fn run(&mut self, mut pieces: mpsc::UnboundedReceiver<String>, stop: &Notify) -> String {
        let mut buffer = String::new();
        let mut tick = tokio::time::interval(CHUNK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut flushed = Instant::now();
        loop {
            tokio::select! {
                piece = pieces.recv() => match piece {
                    Some(piece) => {
                        if self.ended.is_none() {
                            buffer.push_str(&storable(&piece));
                        }
                        if buffer.len() < CHUNK_BYTES && self.reply.is_some() {
                            continue;
                        }
                    }
                    None => return buffer,
                },
                _ = tick.tick() => {}
            }
            if buffer.is_empty() || self.ended.is_some() {
                continue;
            }
            // Under the posting budget's pressure, chunks coalesce: fewer, larger flushes.
            if self.reply.is_some()
                && self.state.fanout.under_pressure()
                && flushed.elapsed() < PRESSED_CHUNK_INTERVAL
            {
                continue;
            }
            flushed = Instant::now();
            let first = self.reply.is_none();
            if let Err(failure) = self.flush(&buffer).await {
                self.ended = Some(Ended::Failed(failure));
            } else if first {
                telemetry::record(Event::TimeToFirstChunk(self.started.elapsed()));
            }
            buffer.clear();
            if self.ended.is_some() {
                stop.notify_one();
            }
        }
    }

    /// Stores `delta` (the first write, or an append), then sends it as chunks.
    async fn flush(&mut self, delta: &str) -> Result<(), JobFailure> {
        let stored = self
            .store(delta, MessageStatus::Streaming, None, None)
            .await?;
        let Some(reply) = stored.reply else {
            self.ended = Some(Ended::Superseded);
            return Ok(());
        };
        self.send_chunks(reply.id, delta, stored.reset).await;
        self.reply = Some(reply);
        if stored.cancel_requested {
            self.ended = Some(Ended::Cancelled);
        }
        Ok(())
    }

    /// Ends the reply with `text` and its status: a streamed reply's unflushed tail, appended
    /// and sent as chunks (so every client's text is whole before the response); otherwise the
    /// whole reply, written in one statement. `None` when another attempt owns the reply.
    async fn end(
        &mut self,
        text: &str,
        status: MessageStatus,
        stop: StopReason,
        usage: Option<Usage>,
    ) -> Result<Option<Message>, JobFailure> {
        let streamed = self.reply.is_some();
        let stored = self.store(text, status, Some(stop), usage).await?;
        if let (Some(ended), true) = (&stored.reply, streamed) {
            self.send_chunks(ended.id, text, false).await;
        }
        Ok(stored.reply)
    }

    /// One step: the reply's first write (a take-over of a dead attempt's says `reset`),
    /// or an append by this attempt; either also reads the cancel flag and the recipients (the
    /// audience from then on). `reply` is `None` when this attempt no longer owns the reply.
    async fn store(
        &mut self,
        text: &str,
        status: MessageStatus,
        stop: Option<StopReason>,
        usage: Option<Usage>,
    ) -> Result<Stored, JobFailure> {
        let db = &self.state.db;
        let stored = match &self.reply {
            Some(reply) => {
                let flushed = message_path::flush_reply(
                    db,
                    self.conversation,
                    ReplyFlush {
                        id: reply.id,
                        producer: self.producer,
                        offset: self.offset,
                        delta: text,
                        status,
                        stop,
                        usage,
                    },
                )
                .await
                .map_err(JobFailure::of_database)?;
                self.audience.renew(flushed.recipients);
                Stored {
                    reply: flushed.reply,
                    reset: false,
                    cancel_requested: flushed.cancel_requested,
                }
            }
            None => {
                let written = message_path::write_reply(
                    db,
                    self.conversation,
                    ReplyWrite {
                        id: MessageId::new(),
                        reply_to: self.reply_to,
                        producer: self.producer,
                        text,
                        status,
                        stop,
                        usage,
                    },
                )
                .await
                .map_err(JobFailure::of_database)?;
                // A streaming write meeting a reply that ended already leaves it to its owner; a
                // whole write returns it (to send again).
                let ended_before =
                    written.written == Written::Existing && status == MessageStatus::Streaming;
                self.audience.renew(written.recipients);
                Stored {
                    reply: (!ended_before).then_some(written.reply),
                    reset: written.written == Written::TakenOver,
                    cancel_requested: written.cancel_requested,
                }
            }
        };
        Ok(stored)
    }

    /// Sends stored text as chunks from the current offset (a frame's worth each), and moves
    /// the offset past it. When a socket missed an earlier chunk (its post failed after its
    /// retries), the chunks start where it missed: the others skip what they hold (PROTOCOL
    /// §2), so no text is lost and none shown twice.
    async fn send_chunks(&mut self, message_id: MessageId, text: &str, reset: bool) {
        let of = ChunkOf {
            conversation_id: self.conversation.id,
            message_id,
            reply_to: self.reply_to,
        };
        if reset {
            self.text.clear();
        }
        let from = match self.audience.missed_from.take() {
            Some(missed) if !reset && missed < self.offset => missed,
            _ => self.offset,
        };
        let start = self.text.len();
        self.text.push_str(text);
        let carried = match self.text.char_indices().nth(from) {
            Some((at, _)) => &self.text[at..],
            None => &self.text[start..],
        };
        for chunk in of.chunks(from, carried, reset) {
            if let Err(e) = self.state.fanout.send(self.audience, &chunk).await {
                tracing::warn!(error = &e as &dyn std::error::Error, "chunk not sent");
            }
        }
        self.offset += text.chars().count();
    }
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

/// Sends the stored reply as a `response`. A reply too long for one frame travels as `chunk`
/// frames (unless it already streamed) and a `response` without its text.
async fn deliver(
    fanout: &dyn Fanout,
    audience: &mut Audience,
    reply: &Message,
    streamed: bool,
) -> Result<(), Error> {
    let reply_to = reply
        .reply_to
        .ok_or_else(|| Error::Internal("a reply without reply_to".into()))?;
    let stop_reason = reply.stop_reason.unwrap_or(match reply.status {
        MessageStatus::Cancelled => StopReason::Cancelled,
        MessageStatus::Failed => StopReason::Error,
        MessageStatus::Complete | MessageStatus::Streaming => StopReason::End,
    });
    let mut frame = ServerFrame::Response {
        text: Some(reply.content.clone()),
        conversation_id: reply.conversation_id,
        message_id: reply.id,
        reply_to,
        seq: reply.seq,
        stop_reason,
        usage: reply.usage(),
    };
    if encode(&frame).is_err() {
        if !streamed {
            let of = ChunkOf {
                conversation_id: reply.conversation_id,
                message_id: reply.id,
                reply_to,
            };
            for chunk in of.chunks(0, &reply.content, false) {
                fanout.send(audience, &chunk).await?;
            }
        }
        if let ServerFrame::Response { text, .. } = &mut frame {
            *text = None;
        }
    }
    let sent = fanout.send(audience, &frame).await;
    // The last frame of a reply: no later flush carries it to a socket whose post was throttled
    // past its retries, so it is posted to those again, seconds apart (a stuck socket is not:
    // it would hold the conversation's next job; it gets the reply when it resumes).
    for wait in FINAL_FRAME_WAITS {
        if audience.missed.is_empty() {
            break;
        }
        tokio::time::sleep(wait).await;
        let missed = std::mem::take(&mut audience.missed);
        let mut again = audience.of(missed);
        let _ = fanout.send(&mut again, &frame).await;
        audience.missed = again.missed;
    }
    if audience.missed.is_empty() {
        Ok(())
    } else {
        sent
    }
}

/// The pauses before a reply's `response` is posted again to the sockets whose posts were
/// throttled: each attempt is a post with its own retries; a socket still missed gets it when
/// it resumes.
const FINAL_FRAME_WAITS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
