//! A reply as it streams: stored at each flush before its chunks go out, and the `response`
//! that ends it.

use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use uuid::Uuid;

use super::{JobFailure, OrchestratorState};
use crate::Error;
use crate::db::conversations::Conversation;
use crate::db::message_path::{self, ReplyFlush, ReplyWrite, Written};
use crate::db::messages::{Message, MessageStatus, StopReason, Usage};
use crate::db::{Db, Scope};
use crate::delivery::{Audience, Fanout, encode};
use crate::domain::{MessageId, storable};
use crate::frame::{ChunkOf, ServerFrame};
use crate::telemetry::{self, Event};

/// Streamed pieces are sent at least this often…
const CHUNK_INTERVAL: Duration = Duration::from_millis(100);
/// …or as soon as this many bytes are waiting.
const CHUNK_BYTES: usize = 1024;
/// While posts wait for the posting budget, streamed pieces are sent this often at most.
const PRESSED_CHUNK_INTERVAL: Duration = Duration::from_millis(1000);

/// What one [`ReplyStream::store`] found.
pub(super) struct Stored {
    pub(super) reply: Option<Message>,
    reset: bool,
    cancel_requested: bool,
}

/// Why a stream stopped before the agent was done.
pub(super) enum Ended {
    /// The user asked (`cancel`).
    Cancelled,
    /// Another attempt took the reply over, or it ended already.
    Superseded,
    /// Storing a flush failed.
    Failed(JobFailure),
}

/// A reply stored as it streams: written at its first flush (numbered then), appended to at
/// each later one, each time before the chunk goes out; chunks carry the offset they start at.
pub(super) struct ReplyStream<'a> {
    pub(super) state: &'a OrchestratorState,
    pub(super) conversation: &'a Conversation,
    pub(super) audience: &'a mut Audience,
    pub(super) reply_to: MessageId,
    /// The id the reply takes: its request's (the user message's `reply_id` when queued).
    pub(super) reply_id: MessageId,
    /// This attempt, as the row's `producer`.
    pub(super) producer: Uuid,
    /// The row, once written.
    pub(super) reply: Option<Message>,
    /// Characters stored so far.
    pub(super) offset: usize,
    /// The text stored so far: a chunk a socket missed is sent again from it.
    pub(super) text: String,
    pub(super) ended: Option<Ended>,
    /// When the agent was asked: the time to the first chunk counts from here.
    pub(super) started: Instant,
}

impl<'a> ReplyStream<'a> {
    pub(super) fn new(
        state: &'a OrchestratorState,
        conversation: &'a Conversation,
        audience: &'a mut Audience,
        reply_to: MessageId,
        reply_id: MessageId,
    ) -> Self {
        Self {
            state,
            conversation,
            audience,
            reply_to,
            reply_id,
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
    pub(super) async fn run(
        &mut self,
        mut pieces: mpsc::UnboundedReceiver<String>,
        stop: &Notify,
    ) -> String {
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
    pub(super) async fn flush(&mut self, delta: &str) -> Result<(), JobFailure> {
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
    pub(super) async fn end(
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
    pub(super) async fn store(
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
                        id: self.reply_id,
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
    pub(super) async fn send_chunks(&mut self, message_id: MessageId, text: &str, reset: bool) {
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

/// Ends reply `reply_id` to `reply_to` `failed` (what streamed of it kept, or an empty one stored) and
/// tells the audience's sockets; `false` when there was nothing to end. A job that gives up
/// calls it, and the sweeper for a reply nobody has written since `unwritten_since`: no reply
/// stays `streaming`, and the next message's job knows this one is settled.
pub async fn end_failed(
    db: &Db,
    fanout: &dyn Fanout,
    audience: &mut Audience,
    reply_to: MessageId,
    reply_id: MessageId,
    unwritten_since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<bool, Error> {
    let mut tx = db.begin(Scope::Tenant(audience.tenant_id)).await?;
    let failed = message_path::fail_reply(
        &mut tx,
        audience.conversation_id,
        reply_to,
        reply_id,
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

/// Sends the stored reply as a `response`. A reply too long for one frame travels as `chunk`
/// frames (unless it already streamed) and a `response` without its text.
pub(super) async fn deliver(
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
