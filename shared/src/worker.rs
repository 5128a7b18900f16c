//! The local orchestrator worker: jobs from the Redis stream through the very same batch handler
//! as the Lambda; only what succeeded is acknowledged.
//!
//! Conversations proceed independently: each has a lane of its entries, worked in stream order
//! one at a time, and up to [`Worker::concurrency`] lanes run at once, so a conversation whose
//! agent is slow holds back only itself. A reader task keeps taking entries off the stream
//! while lanes run.
//!
//! Entries are read through a consumer group. One that fails stays pending and at the front of
//! its lane, so its conversation waits for it (order within a conversation holds); it is tried
//! again after [`Worker::retry_delay`], each try counted as a delivery (`XCLAIM`) and handed
//! over with that count (SQS's `ApproximateReceiveCount`), and after the orchestrator's
//! `max_receives` it goes to a dead-letter stream, as SQS would move it to the dead-letter
//! queue. Entries pending for another consumer longer than the visibility timeout (a worker
//! that died) are claimed; a restarted worker finds its own pending entries first.
//!
//! One worker process per stream keeps conversations in order; that is what the local runtime
//! runs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use aws_lambda_events::sqs::{SqsEvent, SqsMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use redis::aio::ConnectionManager;
use redis::streams::{StreamClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Error;
use crate::orchestrator::{OrchestratorState, handle};
use crate::queue::RedisQueue;

pub const GROUP: &str = "orchestrator";

#[derive(Debug, Clone)]
pub struct Worker {
    pub queue: RedisQueue,
    /// Stable across restarts, so a restarted worker finds its own pending entries at once.
    pub consumer: String,
    /// How many entries one read takes off the stream.
    pub batch: usize,
    /// How long a read waits for new entries.
    pub block: Duration,
    /// The pause after a failed entry, before it is tried again.
    pub retry_delay: Duration,
    /// How long an entry may stay pending with another consumer before it is claimed.
    pub visibility_timeout: Duration,
    /// How many conversations are worked at once.
    pub concurrency: usize,
}

/// An entry and how it came to this worker.
#[derive(Debug, Clone)]
struct Entry {
    id: StreamId,
    /// Read before (pending from an earlier run, claimed from a dead worker, or failed here):
    /// its deliveries are counted before it runs.
    redelivered: bool,
}

/// One conversation's entries, in stream order.
#[derive(Debug, Default)]
struct Lane {
    entries: VecDeque<Entry>,
    running: bool,
    /// After a failure: not before then.
    resume_at: Option<Instant>,
}

/// What became of one attempt at a lane's front entry.
enum Outcome {
    /// Done (answered, or dropped because retrying cannot help): acknowledged.
    Done,
    /// Failed; stays pending for another try.
    Failed,
    /// Delivered too often: moved to the dead-letter stream and acknowledged.
    DeadLettered,
}

impl Worker {
    pub fn new(queue: RedisQueue, consumer: &str) -> Self {
        Self {
            queue,
            consumer: consumer.to_owned(),
            batch: 64,
            block: Duration::from_secs(1),
            retry_delay: Duration::from_secs(1),
            visibility_timeout: Duration::from_secs(30),
            concurrency: 32,
        }
    }

    pub fn dead_letter_key(&self) -> String {
        format!("{}:dead", self.queue.stream_key())
    }

    /// Works entries until `shutdown` resolves; attempts under way are finished first, so
    /// nothing is left half done (what was not acknowledged is read again by the next worker).
    pub async fn run(
        &self,
        state: &OrchestratorState,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let (sender, mut incoming) = mpsc::channel::<Vec<Entry>>(1);
        let reader = tokio::spawn(self.clone().read_loop(sender));
        let mut lanes: HashMap<String, Lane> = HashMap::new();
        let mut held: HashSet<String> = HashSet::new();
        let mut attempts = FuturesUnordered::new();
        let mut running = 0;
        loop {
            let now = Instant::now();
            for (group, lane) in &mut lanes {
                if running >= self.concurrency {
                    break;
                }
                if lane.running || lane.resume_at.is_some_and(|at| at > now) {
                    continue;
                }
                if let Some(entry) = lane.entries.front() {
                    lane.running = true;
                    lane.resume_at = None;
                    running += 1;
                    attempts.push(self.attempt(state, group.clone(), entry.clone()));
                }
            }
            let next_resume = lanes
                .values()
                .filter(|l| !l.running)
                .filter_map(|l| l.resume_at)
                .min();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some((group, outcome)) = attempts.next() => {
                    running -= 1;
                    let lane = lanes.get_mut(&group).expect("a lane with an attempt");
                    lane.running = false;
                    match outcome {
                        Outcome::Done | Outcome::DeadLettered => {
                            if let Some(done) = lane.entries.pop_front() {
                                held.remove(&done.id.id);
                            }
                            if lane.entries.is_empty() {
                                lanes.remove(&group);
                            }
                        }
                        Outcome::Failed => {
                            if let Some(front) = lane.entries.front_mut() {
                                front.redelivered = true;
                            }
                            lane.resume_at = Some(Instant::now() + self.retry_delay);
                        }
                    }
                }
                Some(entries) = incoming.recv() => {
                    for entry in entries {
                        // A claim can hand back an entry this worker already holds.
                        if held.insert(entry.id.id.clone()) {
                            let group = entry.id.get::<String>("group").unwrap_or_default();
                            lanes.entry(group).or_default().entries.push_back(entry);
                        }
                    }
                }
                () = sleep_until(next_resume), if next_resume.is_some() => {}
            }
        }
        reader.abort();
        while attempts.next().await.is_some() {}
        Ok(())
    }

    /// Takes entries off the stream for [`run`](Self::run): this consumer's pending ones first,
    /// then orphans claimed and new ones, as long as the worker runs. Waits while the worker
    /// has not taken the previous read.
    async fn read_loop(self, lanes: mpsc::Sender<Vec<Entry>>) {
        let mut pending_done = false;
        loop {
            let read = async {
                // Blocking reads get a connection of their own, so they never hold up the
                // acknowledgements on the shared one.
                let mut conn = self.queue.dedicated_connection().await?;
                self.ensure_group(&mut conn).await?;
                loop {
                    let entries = if pending_done {
                        let mut entries = self.claim(&mut conn).await?;
                        let block = entries.is_empty().then_some(self.block);
                        entries.extend(self.read(&mut conn, ">", block).await?.into_iter().map(
                            |id| Entry {
                                id,
                                redelivered: false,
                            },
                        ));
                        entries
                    } else {
                        pending_done = true;
                        self.own_pending(&mut conn).await?
                    };
                    if !entries.is_empty() && lanes.send(entries).await.is_err() {
                        return Ok::<(), Error>(());
                    }
                }
            };
            match read.await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "worker read failed");
                    // After Redis comes back, this consumer's pending entries are read again.
                    pending_done = false;
                    tokio::time::sleep(self.retry_delay).await;
                }
            }
        }
    }

    async fn ensure_group(&self, conn: &mut ConnectionManager) -> Result<(), Error> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.queue.stream_key())
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

    /// Every entry delivered to this consumer and not acknowledged, oldest first.
    async fn own_pending(&self, conn: &mut ConnectionManager) -> Result<Vec<Entry>, Error> {
        let mut all = Vec::new();
        let mut after = "0".to_owned();
        loop {
            let page = self.read(conn, &after, None).await?;
            let Some(last) = page.last() else {
                return Ok(all);
            };
            after = last.id.clone();
            all.extend(page.into_iter().map(|id| Entry {
                id,
                redelivered: true,
            }));
        }
    }

    /// Entries another consumer left pending longer than the visibility timeout (a worker that
    /// died). Listed first (`XPENDING … IDLE`), then only other consumers' entries claimed
    /// (`XCLAIM`): `XAUTOCLAIM` would also re-claim this worker's own entries waiting in their
    /// lanes, and each claim counts a delivery, dead-lettering them early.
    async fn claim(&self, conn: &mut ConnectionManager) -> Result<Vec<Entry>, Error> {
        let idle = self.visibility_timeout.as_millis() as u64;
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(self.queue.stream_key())
            .arg(GROUP)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(self.batch)
            .query_async(conn)
            .await?;
        let orphans: Vec<String> = pending
            .ids
            .into_iter()
            .filter(|p| p.consumer != self.consumer)
            .map(|p| p.id)
            .collect();
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        let reply: StreamClaimReply = redis::cmd("XCLAIM")
            .arg(self.queue.stream_key())
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(idle)
            .arg(&orphans)
            .query_async(conn)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .filter(|e| !e.map.is_empty())
            .map(|id| Entry {
                id,
                redelivered: true,
            })
            .collect())
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
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
            .arg(self.queue.stream_key())
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

    /// One try at a lane's front entry, through the batch handler.
    async fn attempt(
        &self,
        state: &OrchestratorState,
        group: String,
        entry: Entry,
    ) -> (String, Outcome) {
        let outcome = match self.try_entry(state, &entry).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(entry = %entry.id.id, error = &e as &dyn std::error::Error, "worker attempt failed");
                Outcome::Failed
            }
        };
        (group, outcome)
    }

    async fn try_entry(&self, state: &OrchestratorState, entry: &Entry) -> Result<Outcome, Error> {
        let mut conn = self.queue.connection().await?;
        let stream = self.queue.stream_key();
        let receives = if entry.redelivered {
            self.deliveries(&mut conn, &entry.id.id).await?
        } else {
            1
        };
        if receives > state.max_receives as usize {
            self.dead_letter(&mut conn, &entry.id).await?;
            return Ok(Outcome::DeadLettered);
        }
        let mut event = SqsEvent::default();
        event.records = vec![to_record(&entry.id, receives)];
        if !handle(state, event, None).await.unsettled.is_empty() {
            return Ok(Outcome::Failed);
        }
        // A job done but not acknowledged (Redis went away meanwhile; its frames may have gone
        // with it) stays at the front of its lane and runs again after the retry delay: it is
        // answered from the stored reply, which is sent again (at least once), never asked
        // again, and acknowledged then. Left to a later read it would wait for the next
        // reconnect of the reader, which may have come and gone already.
        let acked: redis::RedisResult<i64> = redis::cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(&entry.id.id)
            .query_async(&mut conn)
            .await;
        if let Err(e) = acked {
            tracing::warn!(entry = %entry.id.id, error = &e as &dyn std::error::Error, "job done but not acknowledged; it runs again");
            return Ok(Outcome::Failed);
        }
        Ok(Outcome::Done)
    }

    /// Counts one more delivery of a pending entry (as reading it again would) and returns how
    /// many it has had.
    async fn deliveries(&self, conn: &mut ConnectionManager, id: &str) -> Result<usize, Error> {
        let stream = self.queue.stream_key();
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(0)
            // Not JUSTID: that would leave the delivery count as it is.
            .arg(id)
            .query_async(conn)
            .await?;
        let counts: Vec<(String, String, u64, usize)> = redis::cmd("XPENDING")
            .arg(&stream)
            .arg(GROUP)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(conn)
            .await?;
        Ok(counts.first().map_or(0, |(_, _, _, times)| *times))
    }

    /// Moves an entry delivered too often to the dead-letter stream and acknowledges it.
    async fn dead_letter(
        &self,
        conn: &mut ConnectionManager,
        entry: &StreamId,
    ) -> Result<(), Error> {
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
            .arg(self.queue.stream_key())
            .arg(GROUP)
            .arg(&entry.id)
            .query_async(conn)
            .await?;
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A stream entry as the SQS record the batch handler expects.
fn to_record(entry: &StreamId, receives: usize) -> SqsMessage {
    let mut record = SqsMessage::default();
    record.message_id = Some(entry.id.clone());
    record.body = entry.get("body");
    record
        .attributes
        .insert("ApproximateReceiveCount".to_owned(), receives.to_string());
    if let Some(group) = entry.get::<String>("group") {
        record.attributes.insert("MessageGroupId".to_owned(), group);
    }
    record.event_source = Some("konstruct:redis".to_owned());
    record
}
