//! The job queue: SQS FIFO on AWS, a Redis stream on a laptop. Both deliver at least once and
//! keep one conversation's jobs in order.

use async_trait::async_trait;

use crate::Error;
use crate::job::Job;
use crate::redis_connection::RedisConnection;

/// Where `ws-message` puts a stored user message for the orchestrator.
#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Queues the job once: queuing the same request again within the deduplication window
    /// (SQS's five minutes) adds nothing.
    async fn enqueue(&self, job: &Job) -> Result<(), Error>;
}

/// SQS FIFO: the message group is the conversation (order within it, parallelism across
/// conversations), the deduplication id is the request ([`Job::request_id`]).
#[derive(Debug, Clone)]
pub struct SqsQueue {
    pub client: aws_sdk_sqs::Client,
    pub queue_url: String,
}

#[async_trait]
impl JobQueue for SqsQueue {
    async fn enqueue(&self, job: &Job) -> Result<(), Error> {
        // The invocation's trace travels with the job (the header Lambda's runtime puts in
        // `_X_AMZN_TRACE_ID`), so X-Ray follows one message from the route into the
        // orchestrator.
        let mut send = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(job.to_body())
            .message_group_id(job.conversation_id.to_string())
            .message_deduplication_id(job.request_id().to_string());
        if let Some(trace) = std::env::var(TRACE_ENV).ok().filter(|t| !t.is_empty()) {
            let value = aws_sdk_sqs::types::MessageSystemAttributeValue::builder()
                .data_type("String")
                .string_value(trace)
                .build()
                .map_err(|e| Error::Internal(format!("trace header: {e}")))?;
            send = send.message_system_attributes(
                aws_sdk_sqs::types::MessageSystemAttributeNameForSends::AwsTraceHeader,
                value,
            );
        }
        send.send()
            .await
            .map_err(|e| Error::upstream("SQS SendMessage", e))?;
        Ok(())
    }
}

/// Where Lambda's runtime puts the invocation's X-Ray trace header.
pub const TRACE_ENV: &str = "_X_AMZN_TRACE_ID";

/// The SQS system attribute that carries it to the orchestrator.
pub const TRACE_ATTRIBUTE: &str = "AWSTraceHeader";

/// How long a queued message id is remembered, as SQS FIFO does.
pub const DEDUPLICATION_SECONDS: u64 = 300;

/// A Redis stream read through a consumer group: an entry stays pending until acknowledged, so
/// a consumer that dies before acknowledging leaves it to be claimed again (at least once).
#[derive(Clone)]
pub struct RedisQueue {
    redis: RedisConnection,
    prefix: String,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Adds the entry only if its deduplication key was not set, both in one atomic step, so a
/// failed add never leaves a key that would swallow the retry.
const ENQUEUE_ONCE: &str = r"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  return redis.call('XADD', KEYS[1], '*', 'group', ARGV[1], 'body', ARGV[2])
end
return false
";

impl RedisQueue {
    /// `prefix` namespaces the keys (`konstruct:` in use, one per test in tests). Connects on
    /// first use.
    pub fn new(url: &str, prefix: &str) -> Result<Self, Error> {
        Ok(Self {
            redis: RedisConnection::open(url)?,
            prefix: prefix.to_owned(),
        })
    }

    /// The stream that holds the jobs.
    pub fn stream_key(&self) -> String {
        format!("{}webchat:jobs", self.prefix)
    }

    fn dedup_key(&self, job: &Job) -> String {
        format!(
            "{}{}:webchat:job:{}",
            self.prefix,
            job.tenant_id,
            job.request_id()
        )
    }

    pub async fn connection(&self) -> Result<redis::aio::ConnectionManager, Error> {
        self.redis.get().await
    }

    /// A connection of its own, for blocking reads that must not hold up the shared one.
    pub async fn dedicated_connection(&self) -> Result<redis::aio::ConnectionManager, Error> {
        self.redis.dedicated().await
    }
}

#[async_trait]
impl JobQueue for RedisQueue {
    async fn enqueue(&self, job: &Job) -> Result<(), Error> {
        let mut conn = self.connection().await?;
        let _: Option<String> = redis::Script::new(ENQUEUE_ONCE)
            .key(self.stream_key())
            .key(self.dedup_key(job))
            .arg(job.conversation_id.to_string())
            .arg(job.to_body())
            .arg(DEDUPLICATION_SECONDS)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}
