//! Lambda's SQS event source for a FIFO queue, over any SQS endpoint (moto in the tests), so the
//! orchestrator meets batches as it does on AWS.
//!
//! What it models, for the settings the template gives the orchestrator:
//! - up to `batch_size` records per invocation, in queue order within a message group; while a
//!   group has records in flight no other batch gets any of it (SQS FIFO's own rule, which moto
//!   keeps), so a group has one batch in flight at a time;
//! - at most `max_concurrency` invocations at once (the event source's `MaximumConcurrency`),
//!   each batch received once one may start;
//! - each invocation gets the function's `timeout` as its deadline and is cut off there: a
//!   timed-out invocation's records are left in flight until the visibility timeout, as Lambda
//!   leaves them;
//! - `ReportBatchItemFailures`: the records the response does not name are deleted, the named
//!   ones are left alone (visible again when their visibility timeout ends, or when the function
//!   changed it);
//! - each record carries the attributes Lambda passes on: `ApproximateReceiveCount`,
//!   `MessageGroupId`, `MessageDeduplicationId`, `SentTimestamp`, `AWSTraceHeader`.
//!
//! Not modelled: the event source's scaling ramp (up to `max_concurrency` invocations at once from
//! the start), its batching window, and retries of a failed invocation by Lambda itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use futures::future::BoxFuture;
use shared::orchestrator::receives;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The pause between two receives that found nothing: at most this is added to a job's wait,
/// which Lambda's long-polling event source does not add.
pub const IDLE_POLL: Duration = Duration::from_millis(5);

/// The function the event source invokes: a batch and the invocation's deadline in, the batch
/// response out.
pub type Function =
    Arc<dyn Fn(SqsEvent, Instant) -> BoxFuture<'static, SqsBatchResponse> + Send + Sync>;

/// One invocation, as it happened.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Each record's message id and its receive count then.
    pub records: Vec<(String, u32)>,
    /// `None` when it timed out.
    pub failed: Option<Vec<String>>,
}

#[derive(Clone)]
pub struct EventSource {
    pub client: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub batch_size: i32,
    pub max_concurrency: usize,
    /// The function's `Timeout`.
    pub timeout: Duration,
    invocations: Arc<Mutex<Vec<Invocation>>>,
    /// Receives that returned messages, and deletes (the empty receives of an idle queue are
    /// left out: they do not grow with the messages).
    calls: Arc<std::sync::atomic::AtomicU64>,
}

impl EventSource {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: &str, timeout: Duration) -> Self {
        Self {
            client,
            queue_url: queue_url.to_owned(),
            batch_size: 10,
            max_concurrency: 2,
            timeout,
            invocations: Arc::default(),
            calls: Arc::default(),
        }
    }

    /// SQS calls made for messages so far: receives that returned some, and deletes.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_call(&self) {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every invocation so far.
    pub fn invocations(&self) -> Vec<Invocation> {
        self.invocations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Polls and invokes until the returned set is dropped.
    pub fn start(&self, function: Function) -> JoinSet<()> {
        let mut pollers = JoinSet::new();
        pollers.spawn(self.clone().poll(function));
        pollers
    }

    /// One receive at a time, each once an invocation slot is free; the invocations run side
    /// by side. Short polls, [`IDLE_POLL`] apart while the queue is empty: moto computes a long
    /// poll's blocked message groups once, when the poll starts, so a long poll would hold a
    /// group's next message until it ends (up to its wait) after the one before was deleted,
    /// and two long polls at once could each take a message of one group. AWS has neither.
    async fn poll(self, function: Function) {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(self.max_concurrency.max(1)));
        let mut invocations = JoinSet::new();
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            while invocations.try_join_next().is_some() {}
            let received = self
                .client
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(self.batch_size)
                .wait_time_seconds(0)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await;
            let messages = match received {
                Ok(out) => out.messages.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "event source: receive failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if messages.is_empty() {
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
            self.count_call();
            let (source, function) = (self.clone(), function.clone());
            invocations.spawn(async move {
                source.invoke(&function, messages).await;
                drop(slot);
            });
        }
    }

    async fn invoke(&self, function: &Function, messages: Vec<aws_sdk_sqs::types::Message>) {
        let records: Vec<SqsMessage> = messages.iter().map(record).collect();
        let mut event = SqsEvent::default();
        event.records = records.clone();
        let started = Instant::now();
        let deadline = started + self.timeout;
        let response = tokio::time::timeout(self.timeout, function(event, deadline))
            .await
            .ok();
        let failed: Option<Vec<String>> = response.map(|r| {
            r.batch_item_failures
                .into_iter()
                .map(|f| f.item_identifier)
                .collect()
        });
        if let Some(failed) = &failed {
            self.delete_all_but(&records, failed).await;
        } else {
            tracing::warn!("event source: invocation timed out");
        }
        // Noted once it is over, deletions included.
        self.invocations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Invocation {
                records: records
                    .iter()
                    .map(|r| (r.message_id.clone().unwrap_or_default(), receives(r)))
                    .collect(),
                failed,
            });
    }

    /// Deletes the batch's records that the response does not name, as Lambda does.
    async fn delete_all_but(&self, records: &[SqsMessage], failed: &[String]) {
        let done: Vec<_> = records
            .iter()
            .enumerate()
            .filter(|(_, r)| !failed.contains(r.message_id.as_ref().unwrap()))
            .map(|(i, r)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r.receipt_handle.clone().unwrap_or_default())
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        if done.is_empty() {
            return;
        }
        self.count_call();
        if let Err(e) = self
            .client
            .delete_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(done))
            .send()
            .await
        {
            tracing::warn!(error = %e, "event source: delete failed");
        }
    }
}

/// A received message as the record Lambda hands the function.
pub fn record(message: &aws_sdk_sqs::types::Message) -> SqsMessage {
    let mut record = SqsMessage::default();
    record.message_id = message.message_id.clone();
    record.receipt_handle = message.receipt_handle.clone();
    record.body = message.body.clone();
    record.md5_of_body = message.md5_of_body.clone();
    record.event_source = Some("aws:sqs".to_owned());
    if let Some(attributes) = &message.attributes {
        for (name, value) in attributes {
            record
                .attributes
                .insert(name.as_str().to_owned(), value.clone());
        }
    }
    record
}
