//! The local orchestrator worker: jobs from the Redis stream, in SQS-shaped batches, through the
//! very same batch handler as the Lambda; only what succeeded is acknowledged.
//!
//! Entries are read through a consumer group. One that fails stays in the consumer's pending
//! list and is read again first on the next pass, together with every later entry of its
//! conversation (the batch handler fails those too), so order within a conversation holds.
//! Entries pending for another consumer longer than the visibility timeout (a worker that died)
//! are claimed. An entry delivered `max_deliveries` times goes to a dead-letter stream, as SQS
//! would move it to the dead-letter queue.
//!
//! One worker process per stream keeps conversations in order; that is what the local runtime
//! runs.

use std::collections::HashMap;
use std::time::Duration;

use aws_lambda_events::sqs::{SqsEvent, SqsMessage};
use redis::streams::{StreamId, StreamReadReply};

use crate::Error;
use crate::orchestrator::{OrchestratorState, handle};
use crate::queue::RedisQueue;

pub const GROUP: &str = "orchestrator";

#[derive(Debug, Clone)]
pub struct Worker {
    pub queue: RedisQueue,
    /// Stable across restarts, so a restarted worker finds its own pending entries at once.
    pub consumer: String,
    pub batch: usize,
    /// How long a read waits for new entries.
    pub block: Duration,
    /// The pause after a pass with failures, before they are tried again.
    pub retry_delay: Duration,
    /// How long an entry may stay pending with another consumer before it is claimed.
    pub visibility_timeout: Duration,
    pub max_deliveries: usize,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub succeeded: usize,
    pub failed: usize,
    pub dead_lettered: usize,
}

impl Worker {
    pub fn new(queue: RedisQueue, consumer: &str) -> Self {
        Self {
            queue,
            consumer: consumer.to_owned(),
            // Larger than SQS's ten: a pass runs its conversations side by side.
            batch: 64,
            block: Duration::from_secs(1),
            retry_delay: Duration::from_secs(1),
            visibility_timeout: Duration::from_secs(30),
            max_deliveries: 5,
        }
    }

    pub fn dead_letter_key(&self) -> String {
        format!("{}:dead", self.queue.stream_key())
    }

    /// Runs passes until `shutdown` resolves; a pass under way is finished first, so nothing
    /// is left half done (what was not acknowledged is read again by the next worker).
    pub async fn run(
        &self,
        state: &OrchestratorState,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        loop {
            let pass = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                pass = self.run_once(state) => pass,
            };
            let pause = match pass {
                Ok(pass) if pass.failed == 0 => continue,
                Ok(_) => self.retry_delay,
                Err(e) => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "worker pass failed");
                    self.retry_delay
                }
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One pass: claim orphaned entries, take this consumer's pending entries (oldest first)
    /// and new ones, run them as one batch, acknowledge the successes.
    pub async fn run_once(&self, state: &OrchestratorState) -> Result<Pass, Error> {
        let mut conn = self.queue.connection().await?;
        let stream = self.queue.stream_key();
        self.ensure_group(&mut conn, &stream).await?;

        let _: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.visibility_timeout.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(self.batch)
            .query_async(&mut conn)
            .await?;

        let mut pass = Pass::default();
        let pending = self.read(&mut conn, &stream, "0", None).await?;
        let pending = self
            .dead_letter(&mut conn, &stream, pending, &mut pass)
            .await?;
        let block = pending.is_empty().then_some(self.block);
        let fresh = self.read(&mut conn, &stream, ">", block).await?;
        let entries: Vec<StreamId> = pending.into_iter().chain(fresh).collect();
        if entries.is_empty() {
            return Ok(pass);
        }

        let mut event = SqsEvent::default();
        event.records = entries.iter().map(to_record).collect();
        let failed: Vec<String> = handle(state, event)
            .await
            .batch_item_failures
            .into_iter()
            .map(|f| f.item_identifier)
            .collect();
        let done: Vec<&str> = entries
            .iter()
            .map(|e| e.id.as_str())
            .filter(|id| !failed.iter().any(|f| f == id))
            .collect();
        if !done.is_empty() {
            let _: i64 = redis::cmd("XACK")
                .arg(&stream)
                .arg(GROUP)
                .arg(&done)
                .query_async(&mut conn)
                .await?;
        }
        pass.succeeded += done.len();
        pass.failed += failed.len();
        Ok(pass)
    }

    async fn ensure_group(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        stream: &str,
    ) -> Result<(), Error> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn read(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        stream: &str,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<StreamId>, Error> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.batch);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        let reply: Option<StreamReadReply> = cmd
            .arg("STREAMS")
            .arg(stream)
            .arg(from)
            .query_async(conn)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            // An entry deleted from the stream while pending comes back without fields.
            .filter(|e| !e.map.is_empty())
            .collect())
    }

    /// Moves entries delivered too often to the dead-letter stream and acknowledges them.
    async fn dead_letter(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        stream: &str,
        pending: Vec<StreamId>,
        pass: &mut Pass,
    ) -> Result<Vec<StreamId>, Error> {
        if pending.is_empty() {
            return Ok(pending);
        }
        let counts: Vec<(String, String, u64, usize)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(self.batch * 2)
            .arg(&self.consumer)
            .query_async(conn)
            .await?;
        let deliveries: HashMap<String, usize> = counts
            .into_iter()
            .map(|(id, _, _, times)| (id, times))
            .collect();
        let mut keep = Vec::new();
        for entry in pending {
            if deliveries.get(&entry.id).copied().unwrap_or(0) <= self.max_deliveries {
                keep.push(entry);
                continue;
            }
            tracing::error!(entry = %entry.id, "job delivered too often; dead-lettered");
            let body: String = entry.get("body").unwrap_or_default();
            let group: String = entry.get("group").unwrap_or_default();
            let _: String = redis::cmd("XADD")
                .arg(self.dead_letter_key())
                .arg("*")
                .arg("source_id")
                .arg(&entry.id)
                .arg("group")
                .arg(group)
                .arg("body")
                .arg(body)
                .query_async(conn)
                .await?;
            let _: i64 = redis::cmd("XACK")
                .arg(stream)
                .arg(GROUP)
                .arg(&entry.id)
                .query_async(conn)
                .await?;
            pass.dead_lettered += 1;
        }
        Ok(keep)
    }
}

/// A stream entry as the SQS record the batch handler expects.
fn to_record(entry: &StreamId) -> SqsMessage {
    let mut record = SqsMessage::default();
    record.message_id = Some(entry.id.clone());
    record.body = entry.get("body");
    if let Some(group) = entry.get::<String>("group") {
        record.attributes.insert("MessageGroupId".to_owned(), group);
    }
    record.event_source = Some("konstruct:redis".to_owned());
    record
}
