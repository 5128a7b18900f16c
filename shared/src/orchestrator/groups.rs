//! An SQS batch's records settled in FIFO order: each message group's records one after
//! another, the groups side by side, within a cutoff. Pure logic over a job runner, so the
//! grouping is tested here with a fake one; [`super::batch`] runs it with the job itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsMessage};
use tokio::time::Instant;

use super::{JobFailure, Receipt};
use crate::job::Job;
use crate::telemetry::{self, Event, JobOutcome};
use crate::{Error, ErrorCode};

/// What became of a record that a batch did not settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsettled {
    /// Never started: too little of the invocation was left, or an earlier record of its group
    /// failed. It goes back at once, and its receive is not counted as an attempt.
    Deferred,
    /// Started, and failed in a way that may pass: to be tried again.
    Failed,
    /// Failed on its last attempt, its user told: for the dead-letter queue.
    GivenUp,
}

/// A batch's outcome: every record it did not settle, in the order received, and why.
#[derive(Debug, Default)]
pub struct BatchReport {
    pub unsettled: Vec<(SqsMessage, Unsettled)>,
}

impl BatchReport {
    /// The response for a driver that leaves every unsettled record to the queue: each is
    /// delivered again, and the queue's own redrive dead-letters it after enough receives.
    pub fn response(&self) -> SqsBatchResponse {
        failures(self.unsettled.iter().map(|(record, _)| record))
    }

    pub fn of(&self, kind: Unsettled) -> impl Iterator<Item = &SqsMessage> {
        self.unsettled
            .iter()
            .filter(move |(_, k)| *k == kind)
            .map(|(record, _)| record)
    }
}

/// A batch response reporting these records failed.
pub fn failures<'a>(records: impl IntoIterator<Item = &'a SqsMessage>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = records
        .into_iter()
        .map(|record| {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = record.message_id.clone().unwrap_or_default();
            failure
        })
        .collect();
    response
}

/// Settles an SQS batch with `run` (the job; a test's fake). Records of one message group run
/// in order; groups run side by side. After the first failure in a group, that record and
/// every later one of the group stay unsettled, so SQS delivers them again in order; a failure
/// on the last attempt (its user told) is given up and the group goes on. With a `cutoff`, no
/// job starts with less than `job_budget` left, and the report is made at the cutoff whatever
/// is still running. A record that did not start is `Deferred`. A record whose body is not a
/// job is dropped (logged): no delivery can make it one.
pub(super) async fn settle<F, Fut>(
    records: Vec<SqsMessage>,
    cutoff: Option<Instant>,
    job_budget: Duration,
    run: F,
) -> BatchReport
where
    F: Fn(Job, Receipt) -> Fut,
    Fut: Future<Output = Result<(), JobFailure>>,
{
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<&SqsMessage>> = HashMap::new();
    for record in &records {
        let group = record
            .attributes
            .get("MessageGroupId")
            .or(record.message_id.as_ref())
            .cloned()
            .unwrap_or_default();
        if !groups.contains_key(&group) {
            order.push(group.clone());
        }
        groups.entry(group).or_default().push(record);
    }
    let outcomes = Mutex::new(HashMap::new());
    let runs = order
        .into_iter()
        .filter_map(|group| groups.remove(&group))
        .map(|records| process_group(records, cutoff, job_budget, &run, &outcomes));
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
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    BatchReport {
        unsettled: records
            .into_iter()
            .filter_map(|record| {
                let id = record.message_id.as_deref().unwrap_or_default();
                match outcomes.get(id) {
                    None => Some((record, Unsettled::Deferred)),
                    Some(Some(unsettled)) => Some((record, *unsettled)),
                    Some(None) => None,
                }
            })
            .collect(),
    }
}

/// Works one message group's records in order, noting in `outcomes` each one started (`None`
/// once settled); stops at the first that failed and may be tried again, or that could not
/// finish before `cutoff`.
async fn process_group<F, Fut>(
    records: Vec<&SqsMessage>,
    cutoff: Option<Instant>,
    job_budget: Duration,
    run: &F,
    outcomes: &Mutex<HashMap<String, Option<Unsettled>>>,
) where
    F: Fn(Job, Receipt) -> Fut,
    Fut: Future<Output = Result<(), JobFailure>>,
{
    let note = |id: &str, outcome: Option<Unsettled>| {
        outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), outcome);
    };
    for record in records {
        let id = record.message_id.clone().unwrap_or_default();
        if cutoff.is_some_and(|c| Instant::now() + job_budget > c) {
            tracing::info!(message_id = %id, "not enough time left for the job; sent back");
            return;
        }
        // Started: should the deadline come first, it counts as a failed attempt.
        note(&id, Some(Unsettled::Failed));
        let receives = receives(record);
        let receipt = Receipt {
            receives,
            deadline: cutoff,
            trace: record
                .attributes
                .get(crate::queue::TRACE_ATTRIBUTE)
                .cloned(),
        };
        let outcome = match record.body.as_deref().map(Job::from_body) {
            Some(Ok(job)) => run(job, receipt).await,
            Some(Err(e)) => Err(JobFailure::permanent(e)),
            None => Err(JobFailure::permanent(Error::BadRequest(
                "record has no body".into(),
            ))),
        };
        telemetry::record(Event::Job(match &outcome {
            Ok(()) => JobOutcome::Answered,
            Err(f) if !f.retry => JobOutcome::Failed,
            Err(f) if f.last => JobOutcome::DeadLettered,
            Err(_) => JobOutcome::Retried,
        }));
        match outcome {
            Ok(()) => {}
            Err(f) if !f.retry => {
                if f.error.code() == ErrorCode::BadRequest {
                    tracing::error!(message_id = %id, error = %f, "unparseable record dropped");
                } else {
                    tracing::warn!(message_id = %id, error = %f, "job dropped: retrying cannot help");
                }
            }
            // Its user has been told: the group goes on without it.
            Err(f) if f.last => {
                tracing::error!(message_id = %id, receives, error = &f as &dyn std::error::Error, "job failed on its last attempt; given up");
                note(&id, Some(Unsettled::GivenUp));
                continue;
            }
            Err(f) => {
                tracing::error!(message_id = %id, receives, error = &f as &dyn std::error::Error, "job failed; to be retried");
                return;
            }
        }
        note(&id, None);
    }
}

/// How often SQS has handed the record over (`ApproximateReceiveCount`; 1 when absent).
pub fn receives(record: &SqsMessage) -> u32 {
    record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::{ConversationId, MessageId, MessageText, TenantId, UserId};
    use crate::konstruct_message::{WebEvent, normalize_web_event};

    /// A record of `group` whose job's text is `text`, on its `receives`th delivery.
    fn record(group: &str, raw: &str, receives: u32) -> SqsMessage {
        let text = MessageText::parse(raw).unwrap();
        let (tenant_id, conversation_id, portal_user_id, message_id) = (
            TenantId::new(),
            ConversationId::new(),
            UserId::new(),
            MessageId::new(),
        );
        let job = Job {
            tenant_id,
            conversation_id,
            portal_user_id,
            message_id,
            reply_id: None,
            message: normalize_web_event(WebEvent {
                tenant_id,
                conversation_id,
                portal_user_id,
                message_id,
                text: &text,
                display_name: None,
                timestamp: chrono::Utc::now(),
            }),
        };
        let mut record = SqsMessage::default();
        record.message_id = Some(format!("{group}-{raw}"));
        record.body = Some(job.to_body());
        record
            .attributes
            .insert("MessageGroupId".into(), group.into());
        record
            .attributes
            .insert("ApproximateReceiveCount".into(), receives.to_string());
        record
    }

    /// A fake job runner: notes each job's text as it starts, sleeps `work` (paused time), and
    /// fails the texts starting with `fail` (on the last attempt when `last`).
    fn runner(
        started: Arc<Mutex<Vec<String>>>,
        work: Duration,
        last: bool,
    ) -> impl Fn(Job, Receipt) -> std::pin::Pin<Box<dyn Future<Output = Result<(), JobFailure>>>>
    {
        move |job, _receipt| {
            let started = started.clone();
            Box::pin(async move {
                let text = job.message.content.text;
                started.lock().unwrap().push(text.clone());
                tokio::time::sleep(work).await;
                if text.starts_with("fail") {
                    let mut failure = JobFailure::transient(Error::Internal("fake".into()));
                    failure.last = last;
                    return Err(failure);
                }
                Ok(())
            })
        }
    }

    fn unsettled(report: &BatchReport) -> Vec<(String, Unsettled)> {
        report
            .unsettled
            .iter()
            .map(|(r, kind)| (r.message_id.clone().unwrap(), *kind))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_runs_in_order_and_stops_at_its_first_failure_while_others_go_on() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let records = vec![
            record("a", "a1", 1),
            record("b", "b1", 1),
            record("a", "fail-a2", 1),
            record("b", "b2", 1),
            record("a", "a3", 1),
        ];
        let begun = Instant::now();
        let work = Duration::from_secs(1);
        let report = settle(records, None, work, runner(started.clone(), work, false)).await;
        assert_eq!(
            unsettled(&report),
            [
                ("a-fail-a2".to_owned(), Unsettled::Failed),
                ("a-a3".to_owned(), Unsettled::Deferred),
            ]
        );
        let started = started.lock().unwrap().clone();
        assert_eq!(
            started,
            ["a1", "b1", "fail-a2", "b2"],
            "side by side, each in order"
        );
        assert_eq!(begun.elapsed(), 2 * work, "the groups ran at the same time");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_given_up_on_its_last_attempt_lets_its_group_go_on() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let records = vec![record("a", "fail-a1", 5), record("a", "a2", 1)];
        let work = Duration::from_millis(10);
        let report = settle(records, None, work, runner(started.clone(), work, true)).await;
        assert_eq!(
            unsettled(&report),
            [("a-fail-a1".to_owned(), Unsettled::GivenUp)]
        );
        assert_eq!(*started.lock().unwrap(), ["fail-a1", "a2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn near_the_cutoff_no_job_starts_and_one_still_running_counts_as_failed() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let records = vec![
            record("a", "a1", 1),
            record("a", "a2", 1),
            record("b", "b1", 1),
        ];
        // Time for one job of each group to start; each runs past the cutoff.
        let budget = Duration::from_secs(2);
        let cutoff = Instant::now() + Duration::from_secs(3);
        let report = settle(
            records,
            Some(cutoff),
            budget,
            runner(started.clone(), Duration::from_secs(10), false),
        )
        .await;
        assert_eq!(Instant::now(), cutoff, "reported at the cutoff");
        assert_eq!(
            unsettled(&report),
            [
                ("a-a1".to_owned(), Unsettled::Failed),
                ("a-a2".to_owned(), Unsettled::Deferred),
                ("b-b1".to_owned(), Unsettled::Failed),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_is_no_job_is_dropped_and_the_group_goes_on() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let mut garbage = record("a", "a0", 1);
        garbage.body = Some("not a job".into());
        let records = vec![garbage, record("a", "a1", 1)];
        let work = Duration::from_millis(10);
        let report = settle(records, None, work, runner(started.clone(), work, false)).await;
        assert!(report.unsettled.is_empty(), "{:?}", unsettled(&report));
        assert_eq!(*started.lock().unwrap(), ["a1"]);
    }
}
