//! The orchestrator under Lambda's SQS FIFO event source (`tests::event_source`, over moto): a
//! batch holding more of one conversation than an invocation can answer, and a job that fails
//! on every attempt. The queue's visibility timeout is the template's six minutes, so a record
//! left to wait it out would time the test out.
//!
//! Times are the scenario divided by five (a 3 s agent instead of 15 s, an 8 s function
//! timeout instead of 40 s): the same number of jobs fit an invocation.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use shared::db::Scope;
use shared::db::messages::MessageStatus;
use shared::domain::ConversationId;
use shared::job::Job;
use shared::orchestrator::{OrchestratorState, SqsRedrive, invoke};
use shared::queue::{JobQueue, SqsQueue};
use tests::event_source::{EventSource, Function};
use tokio::time::Instant;

use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, last_user_text, pieces};
use crate::helpers::orchestrator::{
    conversation_with, of_type, orchestrator, queued_jobs, replies,
};
use crate::helpers::within;
use shared::db::agents::Provider;

/// A work queue as the template makes it (visibility six minutes, redrive to a FIFO dead-letter
/// queue after `backstop` receives), and its dead-letter queue.
async fn work_queues(backstop: u32) -> (SqsQueue, SqsQueue) {
    let client = crate::helpers::aws::fifo_queue().await.client;
    let (work, dead) = tests::aws_sim::fifo_queues(&client, backstop)
        .await
        .unwrap();
    let queue = |queue_url| SqsQueue {
        client: client.clone(),
        queue_url,
    };
    (queue(work), queue(dead))
}

/// The orchestrator as its function runs it: the batch, then the records it did not settle
/// sent back through its own queue.
fn function(state: OrchestratorState) -> Function {
    let state = Arc::new(state);
    Arc::new(move |event, deadline| {
        let state = state.clone();
        Box::pin(async move { invoke(&state, event, Some(deadline)).await })
    })
}

fn redrive(work: &SqsQueue, dead: &SqsQueue, retry_after: Duration) -> SqsRedrive {
    SqsRedrive {
        client: work.client.clone(),
        queue_url: work.queue_url.clone(),
        dead_letter_url: Some(dead.queue_url.clone()),
        retry_after,
    }
}

async fn deferrals(h: &Harness, job: &Job) -> i32 {
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    sqlx::query_scalar("select job_deferrals from web_conversation_messages where id = $1")
        .bind(job.message_id.as_uuid())
        .fetch_one(&mut *tx)
        .await
        .unwrap()
}

async fn wait_for_replies(h: &Harness, conversation: ConversationId, n: usize, limit: Duration) {
    within(limit, &format!("{n} replies"), || async {
        replies(h, conversation).await.len() >= n
    })
    .await;
}

/// Waits for `n` invocations to have returned: a reply is stored before its invocation sends
/// back what it did not settle and returns.
async fn wait_for_invocations(source: &EventSource, n: usize) {
    within(
        Duration::from_secs(30),
        &format!("{n} invocations returned"),
        || async { source.invocations().len() >= n },
    )
    .await;
}

/// Four messages of one conversation arrive in one batch. Two fit the first invocation; the
/// other two go back at once (not after the six-minute visibility timeout), come in the next
/// batch on their second receive with one deferral counted each (so still on their first
/// attempt), and are answered in order.
#[tokio::test]
async fn four_messages_in_one_batch_are_all_answered_without_waiting_out_the_visibility_timeout() {
    let agent = Duration::from_secs(3);
    let h = Harness::new().await;
    let llm = FakeLlm::start(move |request, _| {
        Reply::Stream(pieces(&["re: ", &last_user_text(request)]), agent / 2)
    })
    .await;
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = queued_jobs(&h, "tab", &["one", "two", "three", "four"]).await;
    let (work, dead) = work_queues(20).await;
    for job in &jobs {
        work.enqueue(job).await.unwrap();
    }
    let mut state = orchestrator(&h, &llm);
    state.retry.attempt_timeout = Duration::from_secs(30);
    state.job_budget = Duration::from_millis(3200);
    state.redrive = Some(redrive(&work, &dead, Duration::from_secs(1)));
    let mut source = EventSource::new(work.client.clone(), &work.queue_url, Duration::from_secs(8));
    source.max_concurrency = 2;
    let started = Instant::now();
    let _pollers = source.start(function(state));

    wait_for_replies(&h, conversation, 4, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    wait_for_invocations(&source, 2).await;

    let answered: Vec<_> = replies(&h, conversation).await;
    assert!(answered.iter().all(|r| r.status == MessageStatus::Complete));
    let reply_to: Vec<_> = answered.iter().map(|r| r.reply_to.unwrap()).collect();
    let asked: Vec<_> = jobs.iter().map(|j| j.message_id).collect();
    assert_eq!(reply_to, asked, "answered in the order they were sent");
    let texts: Vec<_> = answered.iter().map(|r| r.content.as_str()).collect();
    assert_eq!(texts, ["re: one", "re: two", "re: three", "re: four"]);
    // A wide stall detector: a record left to its visibility timeout would take 360 s.
    assert!(elapsed < Duration::from_secs(40), "answered in {elapsed:?}");

    let invocations = source.invocations();
    let receives: Vec<Vec<u32>> = invocations
        .iter()
        .map(|i| i.records.iter().map(|(_, n)| *n).collect())
        .collect();
    assert_eq!(
        receives,
        vec![vec![1, 1, 1, 1], vec![2, 2]],
        "one batch of four, then the two deferred on their second receive"
    );
    assert_eq!(invocations[0].failed.as_ref().unwrap().len(), 2);
    assert_eq!(invocations[1].failed.as_deref(), Some(&[][..]));
    let counted = [
        deferrals(&h, &jobs[0]).await,
        deferrals(&h, &jobs[1]).await,
        deferrals(&h, &jobs[2]).await,
        deferrals(&h, &jobs[3]).await,
    ];
    assert_eq!(counted, [0, 0, 1, 1], "a receive not started is a deferral");
    assert_eq!(crate::helpers::aws::depth(&work).await, 0);
    assert_eq!(crate::helpers::aws::depth(&dead).await, 0);
    assert!(of_type(&h.api.frames_to("tab"), "error").is_empty());
}

/// A job that fails on every attempt, with another message of its conversation behind it: the
/// failing one is attempted `max_receives` times, a little apart, its user told once, and it
/// goes to the dead-letter queue; the one behind it waits without using up attempts (its
/// receives meanwhile are deferrals) and is answered in the batch that gives the first up.
#[tokio::test]
async fn a_job_failing_every_attempt_tells_the_user_once_then_is_dead_lettered() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|request, _| {
        if last_user_text(request).contains("doomed") {
            Reply::Status(503)
        } else {
            Reply::Stream(pieces(&["fine"]), Duration::ZERO)
        }
    })
    .await;
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = queued_jobs(&h, "tab", &["doomed", "after"]).await;
    let (work, dead) = work_queues(20).await;
    for job in &jobs {
        work.enqueue(job).await.unwrap();
    }
    let mut state = orchestrator(&h, &llm);
    state.max_receives = 3;
    state.redrive = Some(redrive(&work, &dead, Duration::from_secs(1)));
    let source = EventSource::new(
        work.client.clone(),
        &work.queue_url,
        Duration::from_secs(60),
    );
    let _pollers = source.start(function(state));

    wait_for_replies(&h, conversation, 2, Duration::from_secs(60)).await;
    wait_for_invocations(&source, 3).await;

    let answered = replies(&h, conversation).await;
    assert_eq!(answered.len(), 2, "the doomed one's reply ends failed");
    assert_eq!(answered[0].reply_to, Some(jobs[0].message_id));
    assert_eq!(answered[0].status, MessageStatus::Failed);
    assert_eq!(answered[1].reply_to, Some(jobs[1].message_id));
    assert_eq!(answered[1].content, "fine");
    let frames = h.api.frames_to("tab");
    let errors = of_type(&frames, "error");
    assert_eq!(errors.len(), 1, "told once: {errors:?}");
    assert_eq!(errors[0]["code"], "agent_failed");

    let doomed_receives: Vec<u32> = source
        .invocations()
        .iter()
        .flat_map(|i| i.records.clone())
        .filter(|(id, _)| id == &source.invocations()[0].records[0].0)
        .map(|(_, n)| n)
        .collect();
    assert_eq!(doomed_receives, [1, 2, 3], "three attempts, then no more");
    assert_eq!(
        deferrals(&h, &jobs[1]).await,
        2,
        "waited two receives, answered on the third"
    );
    assert_eq!(deferrals(&h, &jobs[0]).await, 0);

    let dead_letters = dead
        .client
        .receive_message()
        .queue_url(&dead.queue_url)
        .max_number_of_messages(10)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(dead_letters.len(), 1);
    let job = Job::from_body(dead_letters[0].body.as_deref().unwrap()).unwrap();
    assert_eq!(job.message_id, jobs[0].message_id);
    assert_eq!(crate::helpers::aws::depth(&work).await, 0);
}
