//! The local worker: Redis stream → conversation lanes → the same batch handler; only what
//! succeeded is acknowledged, and one slow conversation holds back only itself.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shared::db::agents::Provider;
use shared::domain::ConversationId;
use shared::orchestrator::OrchestratorState;
use shared::queue::{JobQueue, RedisQueue};
use shared::worker::{GROUP, Worker};

use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, last_user_text, pieces};
use crate::helpers::orchestrator::{
    conversation_with, conversation_with_named, orchestrator, queued_jobs, replies,
};
use crate::helpers::{eventually, redis_prefix};

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

/// Runs the worker until `until` completes, then shuts it down; returns what `until` returned.
async fn running<T>(
    worker: &Worker,
    state: &OrchestratorState,
    until: impl Future<Output = T>,
) -> T {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = worker.run(state, async {
        let _ = stopped.await;
    });
    let check = async {
        let out = until.await;
        let _ = stop.send(());
        out
    };
    let (ran, out) = tokio::join!(run, check);
    ran.unwrap();
    out
}

/// Waits until `check` holds, for at most 15 s.
async fn dead_letters(worker: &Worker) -> i64 {
    let mut conn = worker.queue.connection().await.unwrap();
    redis::cmd("XLEN")
        .arg(worker.dead_letter_key())
        .query_async(&mut conn)
        .await
        .unwrap()
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

    running(&worker, &state, async {
        eventually("three replies, all acknowledged", || async {
            answered(&h, h.seed.conversation).await.len() == 3 && pending(&worker).await == 0
        })
        .await;
    })
    .await;
    assert_eq!(
        answered(&h, h.seed.conversation).await,
        vec!["Echo: one", "Echo: two", "Echo: three"]
    );
    assert_eq!(dead_letters(&worker).await, 0);
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
    state.max_receives = 1000;
    let conv = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("llm-tab", conv).await;
    h.open_session("echo-tab").await;
    let mut worker = worker(&redis_prefix());
    worker.retry_delay = Duration::from_millis(50);
    let held = queued_jobs(&h, "llm-tab", &["flaky first", "then this"]).await;
    let other = queued_jobs(&h, "echo-tab", &["elsewhere"]).await;
    for job in held.iter().chain(&other) {
        worker.queue.enqueue(job).await.unwrap();
    }

    running(&worker, &state, async {
        eventually("the other conversation answered", || async {
            answered(&h, h.seed.conversation).await == ["Echo: elsewhere"]
        })
        .await;
        // Several tries of the failing job later, its conversation is still held back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            answered(&h, conv).await.is_empty(),
            "the second waits for the first"
        );
        assert_eq!(pending(&worker).await, 2);

        healthy.store(true, Ordering::SeqCst);
        eventually("both answered", || async {
            answered(&h, conv).await.len() == 2 && pending(&worker).await == 0
        })
        .await;
    })
    .await;
    assert_eq!(
        answered(&h, conv).await,
        vec!["answer to flaky first", "answer to then this"],
        "in the order they were sent"
    );
}

#[tokio::test]
async fn a_slow_conversation_does_not_hold_back_the_others() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|request, _| {
        if last_user_text(request) == "slow" {
            // Two pieces 2.5 s apart: 5 s in all.
            Reply::Stream(pieces(&["slow ", "answer"]), Duration::from_millis(2500))
        } else {
            Reply::Stream(pieces(&["quick answer"]), Duration::ZERO)
        }
    })
    .await;
    let mut state = orchestrator(&h, &llm);
    state.retry.attempt_timeout = Duration::from_secs(30);
    let slow = conversation_with(&h, Provider::Openai, "gpt-test").await;
    let quick = conversation_with_named(&h, "quick agent").await;
    h.open_session_on("slow-tab", slow).await;
    h.open_session_on("quick-tab", quick).await;
    let worker = worker(&redis_prefix());
    let started = Instant::now();
    // The slow conversation's job is queued first.
    for job in queued_jobs(&h, "slow-tab", &["slow"]).await {
        worker.queue.enqueue(&job).await.unwrap();
    }
    for job in queued_jobs(&h, "quick-tab", &["quick"]).await {
        worker.queue.enqueue(&job).await.unwrap();
    }

    let (quick_at, slow_at) = running(&worker, &state, async {
        eventually("the quick reply", || async {
            !answered(&h, quick).await.is_empty()
        })
        .await;
        let quick_at = started.elapsed();
        eventually("the slow reply", || async {
            !answered(&h, slow).await.is_empty()
        })
        .await;
        (quick_at, started.elapsed())
    })
    .await;
    assert!(
        quick_at < Duration::from_millis(2000),
        "the quick reply came after {quick_at:?}, behind the slow one"
    );
    assert!(slow_at >= Duration::from_millis(4500), "{slow_at:?}");
    assert_eq!(answered(&h, slow).await, ["slow answer"]);
}

#[tokio::test]
async fn an_unparseable_entry_is_dropped_at_once_not_retried() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let worker = worker(&redis_prefix());
    let mut conn = worker.queue.connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(worker.queue.stream_key())
        .arg("*")
        .arg("group")
        .arg(h.seed.conversation.to_string())
        .arg("body")
        .arg("{ not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The same conversation's next job is not held back behind it.
    for job in queued_jobs(&h, "tab", &["after the garbage"]).await {
        worker.queue.enqueue(&job).await.unwrap();
    }

    running(&worker, &state, async {
        eventually("the next job answered", || async {
            answered(&h, h.seed.conversation).await == ["Echo: after the garbage"]
        })
        .await;
    })
    .await;
    assert_eq!(pending(&worker).await, 0, "acknowledged");
    assert_eq!(dead_letters(&worker).await, 0, "dropped, not retried");
}

/// A failure that may pass is retried silently; on its last delivery the user is told, and
/// the entry goes to the dead-letter stream.
#[tokio::test]
async fn a_job_failing_on_every_delivery_tells_the_user_once_then_is_dead_lettered() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| Reply::Status(503)).await;
    let mut state = orchestrator(&h, &llm);
    state.retry.max_attempts = 1;
    state.max_receives = 3;
    let conv = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conv).await;
    let mut worker = worker(&redis_prefix());
    worker.retry_delay = Duration::from_millis(50);
    for job in queued_jobs(&h, "tab", &["never answered"]).await {
        worker.queue.enqueue(&job).await.unwrap();
    }

    running(&worker, &state, async {
        eventually("the entry dead-lettered", || async {
            dead_letters(&worker).await == 1 && pending(&worker).await == 0
        })
        .await;
    })
    .await;
    assert_eq!(llm.requests().len(), 3, "one attempt per delivery");
    let errors: Vec<_> = h
        .api
        .frames_to("tab")
        .into_iter()
        .filter(|f| f["type"] == "error")
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "told once, on the last delivery: {errors:?}"
    );
    assert_eq!(errors[0]["code"], "agent_failed");
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
    survivor.visibility_timeout = Duration::from_millis(500);
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
    let read_at = Instant::now();

    running(&survivor, &state, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            answered(&h, h.seed.conversation).await.is_empty(),
            "not yet timed out"
        );
        eventually("the orphan answered", || async {
            answered(&h, h.seed.conversation).await == ["Echo: orphan"]
                && pending(&survivor).await == 0
        })
        .await;
    })
    .await;
    assert!(read_at.elapsed() >= Duration::from_millis(500));
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

/// An entry waiting in its lane to be tried again, longer than the visibility timeout, is not
/// claimed back by its own worker: each claim counts a delivery, and the entry would reach the
/// dead-letter stream without its second attempt.
#[tokio::test]
async fn a_worker_does_not_claim_its_own_waiting_entries() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, index| {
        if index == 0 {
            Reply::Status(500)
        } else {
            Reply::Stream(pieces(&["second try"]), Duration::ZERO)
        }
    })
    .await;
    let mut state = orchestrator(&h, &llm);
    state.retry.max_attempts = 1;
    state.max_receives = 3;
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let mut worker = worker(&redis_prefix());
    worker.visibility_timeout = Duration::from_millis(100);
    worker.retry_delay = Duration::from_millis(1500);
    for job in queued_jobs(&h, "tab", &["flaky"]).await {
        worker.queue.enqueue(&job).await.unwrap();
    }
    running(&worker, &state, async {
        eventually("the reply", || async {
            !answered(&h, conversation).await.is_empty()
        })
        .await;
    })
    .await;
    assert_eq!(answered(&h, conversation).await, ["second try"]);
    assert_eq!(dead_letters(&worker).await, 0);
    assert_eq!(llm.requests().len(), 2, "tried twice");
}
