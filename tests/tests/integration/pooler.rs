//! The functions behind a pooler that multiplexes transactions: PgBouncer in transaction mode
//! (started by `make test`, pool of 20 server connections), standing in for RDS Proxy. Where RDS
//! Proxy would pin a session (a named prepared statement), PgBouncer fails outright, so these are
//! the stricter test.

use std::time::Duration;

use serde_json::json;
use shared::db::Scope;
use shared::db::agents::Provider;
use shared::db::messages::MessageStatus;
use shared::domain::Role;
use sqlx::Connection;
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;

use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, last_user_text, pieces};
use crate::helpers::orchestrator::{
    conversation_with, of_type, orchestrator, records_for, replies, run,
};
use crate::helpers::rest;
use crate::helpers::{TestDb, token};

/// The pooler is strict: sqlx's default (statements prepared under a name, kept per connection)
/// breaks as soon as two clients share a server connection, which is why the functions prepare
/// unnamed statements behind a pooler.
#[tokio::test]
async fn named_prepared_statements_break_behind_pgbouncer() {
    let (test, _) = TestDb::migrated().await;
    let options = PgConnectOptions::from_str(&test.pooled_url())
        .unwrap()
        .extra_float_digits(None);
    let mut failures = Vec::new();
    // Several clients, each preparing its first statement (`sqlx_s_1`) in a transaction of its
    // own, then another: they land on the pooler's server connections in turn.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(sqlx::PgConnection::connect_with(&options).await.unwrap());
    }
    for round in 0..3 {
        for client in &mut clients {
            let result: Result<i64, _> =
                sqlx::query_scalar("select $1::bigint + count(*) from pg_class")
                    .bind(round)
                    .fetch_one(&mut *client)
                    .await;
            if let Err(e) = result {
                failures.push(e.to_string());
            }
        }
    }
    assert!(
        failures.iter().any(|e| e.contains("prepared statement")),
        "PgBouncer in transaction mode refuses named statements: {failures:?}"
    );
}

/// The AWS path end to end through PgBouncer: `$connect`, `auth` on two tabs, two messages,
/// the orchestrator streaming both replies, the REST history, `$disconnect`. Nothing fails.
#[tokio::test]
async fn the_aws_path_runs_through_pgbouncer_in_transaction_mode() {
    let h = Harness::through_pooler(2).await;
    let llm = FakeLlm::start(|request, _| {
        Reply::Stream(
            pieces(&["you said ", &last_user_text(request)]),
            Duration::from_millis(20),
        )
    })
    .await;
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab-a", conversation).await;
    h.open_session_on("tab-b", conversation).await;
    let records = records_for(&h, "tab-a", &["one", "two"]).await;
    let state = orchestrator(&h, &llm);
    assert!(run(&state, records).await.is_empty(), "every job answered");

    let answered = replies(&h, conversation).await;
    let texts: Vec<_> = answered.iter().map(|r| r.content.as_str()).collect();
    assert_eq!(texts, ["you said one", "you said two"]);
    assert!(answered.iter().all(|r| r.status == MessageStatus::Complete));
    let frames = h.api.frames_to("tab-b");
    assert_eq!(of_type(&frames, "response").len(), 2);
    assert!(!of_type(&frames, "chunk").is_empty());
    assert_eq!(
        of_type(&frames, "message").len(),
        2,
        "the other tab kept in step"
    );

    let history = rest::call(
        &h.db,
        http::Method::GET,
        &format!("/api/portal/chat/conversations/{conversation}/messages"),
        Some(&token(h.seed.user, Role::CustomerOperator)),
        None,
    )
    .await;
    assert_eq!(history.status, 200, "{:?}", history.body);
    assert_eq!(history.body.as_array().unwrap().len(), 4);

    let gone = h
        .route("tab-a", &json!({ "type": "ping" }).to_string())
        .await;
    assert_eq!(gone.unwrap()["type"], "pong");
    let response = shared::ws::Route::Disconnect
        .handle(
            &h.state,
            crate::helpers::harness::event("tab-a", "$disconnect", None, json!(null)),
        )
        .await;
    assert_eq!(response.status_code, 200);
    assert!(h.connection("tab-a").await.is_none());
}

/// Function concurrency far above the pooler's pool: 60 processes' worth of pools (two
/// connections each, 120 client connections) run 600 tenant-scoped transactions at once
/// through PgBouncer. Every one succeeds, and Postgres never sees more server connections for
/// the database than the pooler's pool of 20.
#[tokio::test]
async fn many_function_instances_share_the_poolers_server_connections() {
    let h = Harness::through_pooler(2).await;
    let tenant = h.seed.tenant;
    let instances: Vec<_> = (0..60).map(|_| h._test.pooled(2)).collect();
    // The migrator watches: every runtime-role connection to the database is the pooler's.
    let watcher = h._test.migrator.clone();
    let database: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&watcher)
        .await
        .unwrap();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watch = {
        let peak = peak.clone();
        let database = database.clone();
        tokio::spawn(async move {
            loop {
                let n: i64 = sqlx::query_scalar(
                    "select count(*) from pg_stat_activity \
                     where datname = $1 and usename = 'konstruct_app'",
                )
                .bind(&database)
                .fetch_one(&watcher)
                .await
                .unwrap();
                peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let work = instances.iter().flat_map(|db| {
        (0..10).map(move |_| async move {
            let mut tx = db.begin(Scope::Tenant(tenant)).await?;
            let n: i64 = shared::db::query_scalar("select count(*) from web_conversations")
                .fetch_one(&mut *tx)
                .await?;
            shared::db::query("select pg_sleep(0.005)")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, shared::Error>(n)
        })
    });
    let results = futures::future::join_all(work).await;
    watch.abort();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 600 failed: {:?}",
        failed.len(),
        failed.first()
    );
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak > 0, "the watcher saw the pooler's connections");
    assert!(
        peak <= 20,
        "at most the pool's 20 server connections: saw {peak}"
    );
}
