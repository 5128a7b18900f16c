//! The local worker: Redis stream → SQS-shaped batches → the same batch handler; only what
//! succeeded is acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shared::db::agents::Provider;
use shared::db::{Scope, conversations};
use shared::domain::ConversationId;
use shared::queue::{JobQueue, RedisQueue};
use shared::worker::{GROUP, Pass, Worker};

use crate::helpers::{redis_prefix, seed_agent_with};
use crate::llm::{FakeLlm, Reply, last_user_text, pieces};
use crate::orchestrator::{orchestrator, queued_jobs, replies};
use crate::ws::Harness;

fn worker(prefix: &str) -> Worker {
    let queue = RedisQueue::new(&std::env::var("REDIS_URL").unwrap(), prefix).unwrap();
    let mut worker = Worker::new(queue, "worker-1");
    worker.block = Duration::from_millis(50);
    worker.retry_delay = Duration::from_millis(10);
    worker
}

async fn answered(h: &Harness, conversation: ConversationId) -> Vec<String> {
    replies(h, conversation)
        .await
        .into_iter()
        .map(|m| m.content)
        .collect()
}

async fn pending(worker: &Worker) -> i64 {
    let mut conn = worker.queue.connection().await.unwrap();
    let summary: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(worker.queue.stream_key())
        .arg(GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    summary.0
}

#[tokio::test]
async fn the_worker_answers_queued_jobs_and_acknowledges_them() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let worker = worker(&redis_prefix());
    for job in queued_jobs(&h, "tab", &["one", "two", "three"]).await {
        worker.queue.enqueue(&job).await.unwrap();
    }

    let pass = worker.run_once(&state).await.unwrap();
    assert_eq!(
        pass,
        Pass {
            succeeded: 3,
            failed: 0,
            dead_lettered: 0
        }
    );
    assert_eq!(
        answered(&h, h.seed.conversation).await,
        vec!["Echo: one", "Echo: two", "Echo: three"]
    );
    assert_eq!(pending(&worker).await, 0, "all acknowledged");
    assert_eq!(
        worker.run_once(&state).await.unwrap(),
        Pass::default(),
        "nothing left"
    );
}

#[tokio::test]
async fn a_failed_job_holds_its_conversation_back_until_it_succeeds() {
    let h = Harness::new().await;
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let llm = FakeLlm::start(move |request, _| {
        if last_user_text(request).contains("flaky") && !flag.load(Ordering::SeqCst) {
            Reply::Status(503)
        } else {
            Reply::Stream(
                pieces(&["answer to ", &last_user_text(request)]),
                Duration::ZERO,
            )
        }
    })
    .await;
    let mut state = orchestrator(&h, &llm);
    state.retry.max_attempts = 1;
    let agent = seed_agent_with(&h.db, h.seed.tenant, "llm", Provider::Openai, "gpt-test").await;
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    let conv = conversations::get_or_create(&mut tx, h.seed.tenant, agent, h.seed.user)
        .await
        .unwrap()
        .row
        .id;
    tx.commit().await.unwrap();
    h.open_session_on("llm-tab", conv).await;
    h.open_session("echo-tab").await;
    let worker = worker(&redis_prefix());
    let held = queued_jobs(&h, "llm-tab", &["flaky first", "then this"]).await;
    let other = queued_jobs(&h, "echo-tab", &["elsewhere"]).await;
    for job in held.iter().chain(&other) {
        worker.queue.enqueue(job).await.unwrap();
    }

    let pass = worker.run_once(&state).await.unwrap();
    assert_eq!((pass.succeeded, pass.failed), (1, 2));
    assert!(
        answered(&h, conv).await.is_empty(),
        "the second waits for the first"
    );
    assert_eq!(
        answered(&h, h.seed.conversation).await,
        vec!["Echo: elsewhere"]
    );
    assert_eq!(pending(&worker).await, 2);

    healthy.store(true, Ordering::SeqCst);
    let pass = worker.run_once(&state).await.unwrap();
    assert_eq!((pass.succeeded, pass.failed), (2, 0));
    assert_eq!(
        answered(&h, conv).await,
        vec!["answer to flaky first", "answer to then this"],
        "in the order they were sent"
    );
    assert_eq!(pending(&worker).await, 0);
}

#[tokio::test]
async fn an_unparseable_entry_is_dead_lettered_after_its_deliveries() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let mut worker = worker(&redis_prefix());
    worker.max_deliveries = 2;
    let mut conn = worker.queue.connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(worker.queue.stream_key())
        .arg("*")
        .arg("group")
        .arg("nowhere")
        .arg("body")
        .arg("{ not json")
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut dead = 0;
    for _ in 0..4 {
        dead += worker.run_once(&state).await.unwrap().dead_lettered;
    }
    assert_eq!(dead, 1);
    assert_eq!(pending(&worker).await, 0);
    let dead_entries: i64 = redis::cmd("XLEN")
        .arg(worker.dead_letter_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead_entries, 1);
}

#[tokio::test]
async fn entries_of_a_worker_that_died_are_claimed_after_the_visibility_timeout() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let prefix = redis_prefix();
    let mut survivor = worker(&prefix);
    survivor.consumer = "worker-2".into();
    survivor.visibility_timeout = Duration::from_millis(200);
    for job in queued_jobs(&h, "tab", &["orphan"]).await {
        survivor.queue.enqueue(&job).await.unwrap();
    }
    // Another worker reads the entry, then dies before acknowledging it.
    let mut conn = survivor.queue.connection().await.unwrap();
    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(survivor.queue.stream_key())
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("worker-dead")
        .arg("STREAMS")
        .arg(survivor.queue.stream_key())
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();

    assert_eq!(
        survivor.run_once(&state).await.unwrap().succeeded,
        0,
        "not yet timed out"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(survivor.run_once(&state).await.unwrap().succeeded, 1);
    assert_eq!(
        answered(&h, h.seed.conversation).await,
        vec!["Echo: orphan"]
    );
    assert_eq!(pending(&survivor).await, 0);
}

#[tokio::test]
async fn run_stops_on_shutdown() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let worker = worker(&redis_prefix());
    for job in queued_jobs(&h, "tab", &["before shutdown"]).await {
        worker.queue.enqueue(&job).await.unwrap();
    }
    let deadline = tokio::time::sleep(Duration::from_millis(500));
    tokio::time::timeout(Duration::from_secs(5), worker.run(&state, deadline))
        .await
        .expect("run returns once shutdown resolves")
        .unwrap();
    assert_eq!(
        answered(&h, h.seed.conversation).await,
        vec!["Echo: before shutdown"]
    );
}
