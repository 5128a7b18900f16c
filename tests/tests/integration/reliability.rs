//! The reliability suite: load and faults against the local stack, with the same accounting
//! every time: every acknowledged message gets exactly one stored reply, delivered on every
//! socket of its conversation, in order.

use std::time::Duration;

use shared::db::{Db, Scope};
use tests::load::{self, Plan, Report};
use tests::stack::{self, DatabaseUrls, Seat, Server};

use crate::helpers::redis_prefix;
use tests::services::{OwnPostgres, OwnRedis};

fn local_bin() -> String {
    std::env::var("KONSTRUCT_LOCAL_BIN").expect(
        "KONSTRUCT_LOCAL_BIN is not set: run the tests through `make test`, which builds it",
    )
}

/// No user message has two stored replies; with `all`, every stored user message has one.
async fn assert_replies(db: &Db, seats: &[Seat], all: bool) {
    let mut tx = db.begin(Scope::Tenant(seats[0].tenant)).await.unwrap();
    let (users, answered, doubled): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from web_conversation_messages where role = 'user'),
                (select count(distinct reply_to) from web_conversation_messages where role = 'assistant'),
                (select count(*) from (select reply_to from web_conversation_messages
                                       where role = 'assistant' group by reply_to
                                       having count(*) > 1) d)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(doubled, 0, "no user message has two replies");
    if all {
        assert_eq!(users, answered, "every stored user message has a reply");
    }
}

fn assert_clean(report: &Report) {
    assert!(
        report.errors.is_empty(),
        "error frames: {:?}",
        report.errors
    );
    assert!(report.clean(), "{report:#?}");
}

#[tokio::test]
async fn load_100_sockets_x_20_messages_each_answered_once_in_order() {
    let (url, db, seats) = stack::seeded_database(&DatabaseUrls::from_env(), 100)
        .await
        .unwrap();
    let server = Server::start(
        &local_bin(),
        &url,
        &std::env::var("REDIS_URL").unwrap(),
        &redis_prefix(),
        &["serve", "--listen", "127.0.0.1:0"],
        &[("DATABASE_MAX_CONNECTIONS", "8")],
    )
    .await
    .unwrap();

    let report = load::run(
        &server.address,
        &seats,
        0,
        Plan::FullSpeed {
            per_conversation: 20,
            window: 4,
        },
        Duration::from_secs(120),
    )
    .await
    .unwrap();

    assert_eq!(report.sent, 2000);
    assert_clean(&report);
    assert_eq!(report.replied, 2000);
    assert_replies(&db, &seats, true).await;
    server.stop().await;
}

#[tokio::test]
async fn a_worker_killed_mid_batch_loses_and_duplicates_no_reply() {
    let (url, db, seats) = stack::seeded_database(&DatabaseUrls::from_env(), 20)
        .await
        .unwrap();
    let redis = std::env::var("REDIS_URL").unwrap();
    let prefix = redis_prefix();
    let gateway = Server::start(
        &local_bin(),
        &url,
        &redis,
        &prefix,
        &["serve", "--listen", "127.0.0.1:0", "--no-worker"],
        &[],
    )
    .await
    .unwrap();
    let first = Server::start(&local_bin(), &url, &redis, &prefix, &["worker"], &[])
        .await
        .unwrap();

    let address = gateway.address.clone();
    let run = tokio::spawn({
        let seats = seats.clone();
        async move {
            load::run(
                &address,
                &seats,
                1,
                Plan::FullSpeed {
                    per_conversation: 15,
                    window: 5,
                },
                Duration::from_secs(120),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL: no chance to finish the batch or acknowledge anything.
    first.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Server::start(&local_bin(), &url, &redis, &prefix, &["worker"], &[])
        .await
        .unwrap();

    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, report.sent);
    assert_eq!(report.lost, 0, "{report:#?}");
    assert_eq!(report.out_of_order, 0, "{report:#?}");
    // A job whose reply was stored but not acknowledged is delivered again: the same reply,
    // possibly twice on a socket (clients de-duplicate by message_id), never a second reply.
    assert_replies(&db, &seats, true).await;
    second.stop().await;
    gateway.stop().await;
}

/// Sends 160 messages at 40 a second over the stack and applies `fault` 1.5 s in. Checks that
/// messages refused during the fault got an `internal` error frame (never silence) and that
/// every acknowledged one was answered, in order, on every socket (a refused one may be answered
/// too, when the fault struck after it was queued); returns what the fault
/// returned. A reply may arrive twice (a job processed but not acknowledged when Redis went away
/// runs again and re-sends its stored reply; clients de-duplicate by message_id): the callers
/// check that no message has two stored replies.
async fn load_through_fault<T>(
    server: &Server,
    seats: &[Seat],
    fault: impl std::future::Future<Output = T>,
) -> T {
    let address = server.address.clone();
    let run = tokio::spawn({
        let seats = seats.to_vec();
        async move {
            let plan = Plan::Rate {
                per_second: 40.0,
                total: 160,
            };
            load::run(&address, &seats, 1, plan, Duration::from_secs(90)).await
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outcome = fault.await;
    let report = run.await.unwrap().unwrap();
    // What the server said of the fault (its bridge, dropped frames, failed jobs): with a
    // failure, where the time and the frames went.
    let said = || {
        let log = server.log.lock().unwrap();
        let lines: Vec<&str> = log
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("bridge"))
            .collect();
        lines.join("\n")
    };
    assert!(report.acked > 0);
    assert_eq!(
        report.acked + report.errors.len(),
        report.sent,
        "{report:#?}"
    );
    assert!(
        report.errors.iter().all(|e| e["code"] == "internal"),
        "{:?}",
        report.errors
    );
    assert_eq!(report.lost, 0, "{report:#?}\nthe server said:\n{}", said());
    assert_eq!(
        report.out_of_order,
        0,
        "{report:#?}\nthe server said:\n{}",
        said()
    );
    // Redis can fail after storing a job and before answering: the sender is told `internal`,
    // and the job is answered anyway.
    assert!(
        report.unacknowledged_replies <= report.errors.len(),
        "{report:#?}"
    );
    outcome
}

#[tokio::test]
async fn acknowledged_messages_survive_a_redis_restart_mid_run() {
    let (url, db, seats) = stack::seeded_database(&DatabaseUrls::from_env(), 10)
        .await
        .unwrap();
    // A Redis that keeps its data, like any deployed one: a restart must not lose queued jobs.
    let redis = OwnRedis::start_persistent().await;
    let server = Server::start(
        &local_bin(),
        &url,
        &redis.url(),
        &redis_prefix(),
        &["serve", "--listen", "127.0.0.1:0"],
        &[],
    )
    .await
    .unwrap();

    // Messages sent while Redis is down are refused; those acknowledged are all answered.
    let redis = load_through_fault(&server, &seats, redis.restart()).await;
    // Those refused while Redis was down are stored but unanswered until the client sends
    // them again (with the same client_message_id): only "never two replies" holds for all.
    assert_replies(&db, &seats, false).await;
    server.stop().await;
    drop(redis);
}

#[tokio::test]
async fn a_flaky_agent_is_retried_and_gives_up_only_when_retries_run_out() {
    use std::collections::HashSet;

    use shared::db::agents::Provider;

    use crate::helpers::harness::Harness;
    use crate::helpers::llm::{FakeLlm, Reply, last_user_text, pieces};
    use crate::helpers::orchestrator::{orchestrator, records_for};

    let mut h = Harness::new().await;
    h.state.message.limits = shared::config::routes::Limits {
        connection: shared::config::routes::RateLimit {
            messages: 1000,
            window_seconds: 10,
        },
        user: shared::config::routes::RateLimit {
            messages: 1000,
            window_seconds: 10,
        },
    };
    // 30 % of calls fail with a 503, about one in thirteen stalls past the attempt timeout,
    // never three in a row; one message's calls always fail.
    let llm = FakeLlm::start(|request, i| {
        if last_user_text(request).contains("doomed") || [1, 4, 7].contains(&(i % 10)) {
            Reply::Status(503)
        } else if i % 13 == 6 {
            Reply::Stall
        } else {
            Reply::Stream(pieces(&["ok: ", &last_user_text(request)]), Duration::ZERO)
        }
    })
    .await;
    let mut state = orchestrator(&h, &llm);
    state.retry.attempt_timeout = Duration::from_millis(300);
    state.retry.max_attempts = 3;
    let flaky =
        crate::helpers::orchestrator::conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", flaky).await;
    let texts: Vec<String> = (0..30).map(|i| format!("question {i}")).collect();
    let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let records = records_for(&h, "tab", &text_refs).await;

    // Delivered as SQS would: failed records again, up to five receives each.
    let mut pending = records.clone();
    for _ in 0..5 {
        if pending.is_empty() {
            break;
        }
        let failed: HashSet<String> = crate::helpers::orchestrator::run(&state, pending.clone())
            .await
            .into_iter()
            .collect();
        pending.retain(|r| failed.contains(r.message_id.as_deref().unwrap()));
    }
    assert!(
        pending.is_empty(),
        "{} records never succeeded",
        pending.len()
    );
    let frames = h.api.frames_to("tab");
    let replies: Vec<&serde_json::Value> =
        frames.iter().filter(|f| f["type"] == "response").collect();
    let distinct: HashSet<&serde_json::Value> = replies.iter().map(|r| &r["reply_to"]).collect();
    assert_eq!(distinct.len(), 30, "every question answered");
    assert!(
        frames.iter().all(|f| f["type"] != "error"),
        "no agent_failed while retries could help"
    );

    // The hopeless one: retried silently, and agent_failed only on the queue's last receive.
    let doomed_conversation =
        crate::helpers::orchestrator::conversation_with_named(&h, "doomed agent").await;
    h.open_session_on("doomed-tab", doomed_conversation).await;
    let doomed = records_for(&h, "doomed-tab", &["doomed question"]).await;
    let before = llm.requests().len();
    for receive in [1, state.max_receives] {
        let record = crate::helpers::orchestrator::on_receive(doomed[0].clone(), receive);
        assert_eq!(
            crate::helpers::orchestrator::run(&state, vec![record])
                .await
                .len(),
            1,
            "reported failed: a 503 may pass"
        );
    }
    assert_eq!(
        llm.requests().len() - before,
        6,
        "three attempts per receive"
    );
    let errors: Vec<serde_json::Value> = h
        .api
        .frames_to("doomed-tab")
        .into_iter()
        .filter(|f| f["type"] == "error")
        .collect();
    assert_eq!(errors.len(), 1, "told once");
    assert!(errors.iter().all(|e| e["code"] == "agent_failed"));
}

#[tokio::test]
async fn acknowledged_messages_survive_a_postgres_restart_mid_run() {
    let postgres = OwnPostgres::start();
    let (url, db, seats) = stack::seeded_database(&postgres.urls(), 10).await.unwrap();
    let server = Server::start(
        &local_bin(),
        &url,
        &std::env::var("REDIS_URL").unwrap(),
        &redis_prefix(),
        &["serve", "--listen", "127.0.0.1:0"],
        &[],
    )
    .await
    .unwrap();

    let started: (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("select pg_postmaster_start_time()")
            .fetch_one(db.pool())
            .await
            .unwrap();
    // Handlers either wait for the pool to reconnect (within its acquire timeout) or answer
    // an error frame; every acknowledged message is answered.
    load_through_fault(&server, &seats, async { postgres.restart() }).await;
    let restarted: (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("select pg_postmaster_start_time()")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(
        restarted.0 > started.0,
        "Postgres restarted while the load ran"
    );
    assert_replies(&db, &seats, false).await;
    server.stop().await;
}
