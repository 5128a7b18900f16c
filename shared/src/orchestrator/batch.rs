//! The orchestrator lifted to an SQS batch: FIFO groups in order, side by side, within the
//! invocation's deadline; and, on AWS, what becomes of the records it did not settle.

use std::collections::HashMap;
use std::time::Duration;

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use tokio::time::Instant;

use super::groups::{BatchReport, Unsettled, failures, receives, settle};
use super::{OrchestratorState, Receipt, process_one};
use crate::Error;
use crate::db::Scope;
use crate::db::message_path;
use crate::domain::MessageId;
use crate::job::Job;

/// The time kept back from a Lambda invocation's deadline to return the batch response.
const RESPONSE_MARGIN: Duration = Duration::from_secs(1);

/// How long counting a batch's deferrals may take: it runs in the margin before the deadline.
const DEFERRAL_WRITE_TIMEOUT: Duration = Duration::from_millis(500);

/// An SQS batch, its records run by [`settle`] with the job
/// itself ([`process_one`]); then each record it deferred has its deferral counted on its
/// message, so that it uses up no attempt (invariant 9).
pub async fn handle(
    state: &OrchestratorState,
    event: SqsEvent,
    deadline: Option<Instant>,
) -> BatchReport {
    let cutoff = deadline.map(|d| d.checked_sub(RESPONSE_MARGIN).unwrap_or(d));
    let run = |job: Job, receipt: Receipt| async move { process_one(state, &job, receipt).await };
    let report = settle(event.records, cutoff, state.job_budget, run).await;
    let counted = tokio::time::timeout(
        DEFERRAL_WRITE_TIMEOUT,
        count_deferrals(state, report.of(Unsettled::Deferred)),
    )
    .await
    .unwrap_or_else(|_| Err(Error::Internal("timed out".into())));
    if let Err(e) = counted {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "deferrals not counted; those receives count as attempts"
        );
    }
    report
}

/// Records each deferred job's deferral on its message: one statement per tenant.
async fn count_deferrals<'a>(
    state: &OrchestratorState,
    deferred: impl Iterator<Item = &'a SqsMessage>,
) -> Result<(), Error> {
    let mut by_tenant: HashMap<_, Vec<MessageId>> = HashMap::new();
    for job in deferred.filter_map(|r| Job::from_body(r.body.as_deref()?).ok()) {
        by_tenant
            .entry(job.tenant_id)
            .or_default()
            .push(job.message_id);
    }
    for (tenant_id, ids) in by_tenant {
        let mut tx = state.db.begin(Scope::Tenant(tenant_id)).await?;
        message_path::defer_jobs(&mut tx, &ids).await?;
        tx.commit().await?;
        tracing::info!(tenant_id = %tenant_id, jobs = ids.len(), "jobs deferred: not enough time to start");
    }
    Ok(())
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

/// The orchestrator's hold on its SQS queue (aws mode). Lambda's event source leaves a record
/// reported failed invisible for the queue's whole visibility timeout (six minutes), so the
/// function sends each one back itself before it returns: a deferred record at once, a failed
/// one after a short backoff. A job given up on goes to the dead-letter queue from here, with
/// its attempts spent: deferrals make SQS's receive count run ahead of the attempts, so the
/// queue's own redrive (a larger `maxReceiveCount`) is only the backstop for a function that
/// dies.
#[derive(Debug, Clone)]
pub struct SqsRedrive {
    pub client: aws_sdk_sqs::Client,
    pub queue_url: String,
    /// `None`: jobs given up on are left to the queue's redrive.
    pub dead_letter_url: Option<String>,
    /// The wait before a failed job's next receive, doubling with each receive.
    pub retry_after: Duration,
}

/// The default of [`SqsRedrive::retry_after`]…
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// …and the longest wait it grows to.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// How long a record that failed on its `receives`th receive stays invisible.
pub fn retry_after(base: Duration, receives: u32) -> Duration {
    let doublings = receives.saturating_sub(1).min(16);
    (base * 2u32.pow(doublings)).min(RETRY_AFTER_MAX)
}

impl SqsRedrive {
    /// Acts on a batch's report and returns the response for Lambda: the records that SQS
    /// keeps (each already made visible when it should be tried again).
    pub async fn settle(&self, report: &BatchReport) -> SqsBatchResponse {
        let mut kept: Vec<&SqsMessage> = Vec::new();
        let mut visibility: Vec<(&SqsMessage, Duration)> = Vec::new();
        for (record, outcome) in &report.unsettled {
            match outcome {
                Unsettled::Deferred => visibility.push((record, Duration::ZERO)),
                Unsettled::Failed => {
                    visibility.push((record, retry_after(self.retry_after, receives(record))));
                }
                Unsettled::GivenUp => match self.dead_letter(record).await {
                    Ok(()) => continue,
                    Err(e) => tracing::error!(
                        error = &e as &dyn std::error::Error,
                        "not moved to the dead-letter queue; left to the queue's redrive"
                    ),
                },
            }
            kept.push(record);
        }
        for entries in visibility.chunks(10) {
            if let Err(e) = self.change_visibility(entries).await {
                // They come back after the visibility timeout instead: late, not lost.
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "visibility not changed"
                );
            }
        }
        failures(kept)
    }

    async fn change_visibility(&self, entries: &[(&SqsMessage, Duration)]) -> Result<(), Error> {
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, (record, after))| {
                aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(record.receipt_handle.clone().unwrap_or_default())
                    .visibility_timeout(i32::try_from(after.as_secs()).unwrap_or(i32::MAX))
                    .build()
                    .map_err(|e| Error::Internal(format!("visibility entry: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| Error::upstream("SQS ChangeMessageVisibilityBatch", e))?;
        if let Some(failed) = out.failed.first() {
            return Err(Error::Internal(format!(
                "SQS ChangeMessageVisibilityBatch: {} of the entries failed ({})",
                out.failed.len(),
                failed.code
            )));
        }
        Ok(())
    }

    /// Sends the job to the dead-letter queue; the caller then reports it settled, so Lambda
    /// deletes it from the work queue.
    async fn dead_letter(&self, record: &SqsMessage) -> Result<(), Error> {
        let Some(url) = &self.dead_letter_url else {
            return Err(Error::Internal("no dead-letter queue configured".into()));
        };
        let id = record.message_id.clone().unwrap_or_default();
        let group = record
            .attributes
            .get("MessageGroupId")
            .cloned()
            .unwrap_or_else(|| id.clone());
        self.client
            .send_message()
            .queue_url(url)
            .message_body(record.body.clone().unwrap_or_default())
            .message_group_id(group)
            .message_deduplication_id(id.clone())
            .send()
            .await
            .map_err(|e| Error::upstream("SQS SendMessage (dead-letter queue)", e))?;
        tracing::error!(message_id = %id, "job dead-lettered after its last attempt");
        Ok(())
    }
}

/// One invocation on the SQS event source: the batch, then what becomes of the records it did
/// not settle (see [`SqsRedrive`]).
pub async fn invoke(
    state: &OrchestratorState,
    event: SqsEvent,
    deadline: Option<Instant>,
) -> SqsBatchResponse {
    let report = handle(state, event, deadline).await;
    match &state.redrive {
        Some(redrive) => redrive.settle(&report).await,
        None => report.response(),
    }
}

/// Runs the orchestrator as a Lambda function on its SQS event source, each invocation bounded
/// by its deadline.
pub async fn run(state: OrchestratorState) -> Result<(), lambda_runtime::Error> {
    let state = &state;
    crate::lambda::serve(
        move |event: lambda_runtime::LambdaEvent<SqsEvent>| async move {
            let deadline = deadline_from_epoch_ms(event.context.deadline);
            Ok(invoke(state, event.payload, deadline).await)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_job_comes_back_sooner_than_the_visibility_timeout_and_later_each_time() {
        assert_eq!(retry_after(RETRY_AFTER, 1), Duration::from_secs(5));
        assert_eq!(retry_after(RETRY_AFTER, 2), Duration::from_secs(10));
        assert_eq!(retry_after(RETRY_AFTER, 4), Duration::from_secs(40));
        assert_eq!(retry_after(RETRY_AFTER, 1000), RETRY_AFTER_MAX);
    }

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
}
