//! The AWS-shaped stack (`tests::aws_sim`): the function binaries under the Lambda emulator,
//! the orchestrator on Lambda's SQS FIFO event source over moto, PgBouncer in transaction mode
//! in front of Postgres, and a network delay on every hop. A conversation as a user has it.

use std::time::Duration;

use serde_json::json;
use shared::db::agents::Provider;
use shared::domain::Role;
use tests::aws_sim::{AwsSim, Latencies, Settings};

use crate::helpers::local::{next, send};
use crate::helpers::{TestDb, conversation_for, redis_prefix, seed, seed_agent_with, token};

fn settings(test: &TestDb) -> Settings {
    let env = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name}: run through `make test`"))
    };
    Settings {
        pooled_database_url: test.pooled_url(),
        database_url: test.url.clone(),
        redis_url: env("REDIS_URL"),
        redis_prefix: redis_prefix(),
        moto_endpoint: env("MOTO_ENDPOINT"),
        bin_dir: env("KONSTRUCT_BIN_DIR").into(),
        model_base_url: None,
        latencies: Latencies::default(),
        orchestrator_concurrency: 2,
        route_concurrency: 4,
        post_budget: Some(500),
        management_quota: None,
    }
}

type Tab =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A socket opened at `url` and authenticated with `token` (`auth_ok` read).
async fn authenticated_tab(url: &str, token: &str) -> Tab {
    let (mut tab, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connected");
    send(&mut tab, json!({ "type": "auth", "token": token })).await;
    let ok = next(&mut tab, Duration::from_secs(30))
        .await
        .expect("auth answered");
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    tab
}

/// Two messages, one after the other, each answered through every AWS piece: `$connect` and
/// `auth` by their functions, `typing`, `ack` and the reply posted back through the
/// connection-management API, the jobs through SQS and the event source.
#[tokio::test]
async fn a_conversation_runs_on_the_aws_shaped_stack() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let sim = AwsSim::start(&settings(&test)).await.unwrap();

    let url = format!("ws://{}/ws?conversation_id={}", sim.address, s.conversation);
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connected");
    send(
        &mut socket,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    let ok = next(&mut socket, Duration::from_secs(30))
        .await
        .expect("auth answered");
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    for text in ["first", "second"] {
        send(&mut socket, json!({ "type": "message", "text": text })).await;
        let mut seen = Vec::new();
        while let Some(frame) = next(&mut socket, Duration::from_secs(30)).await {
            seen.push(frame["type"].as_str().unwrap_or_default().to_owned());
            if frame["type"] == "response" {
                assert_eq!(frame["text"], format!("Echo: {text}"));
                break;
            }
        }
        assert_eq!(seen, ["typing", "ack", "response"], "{text}");
    }
    assert!(
        sim.lambda.cold_starts() >= 4,
        "each function ran in its own environment"
    );
    // The reply is posted before its invocation returns.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.source.invocations().len() < 2 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let invocations = sim.source.invocations();
    assert_eq!(
        invocations.len(),
        2,
        "one orchestrator invocation per message"
    );
    assert!(
        invocations
            .iter()
            .all(|i| i.failed.as_deref() == Some(&[][..]))
    );
}

/// The `ws-auth` binary with a socket that closes right after its `auth` (with `resume_after`):
/// its replay is posted to a gone connection (410). Once, `ws-auth` held its transaction and
/// the conversation's lock across that post while the 410's delete (and `$disconnect`'s)
/// waited for it: `auth` hung until its timeout and the other tab's next message with it. Now
/// the other tab's messages go on being answered.
#[tokio::test]
async fn a_tab_closing_during_its_resume_holds_nothing_on_the_lambda_path() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let sim = AwsSim::start(&settings(&test)).await.unwrap();
    let url = format!("ws://{}/ws?conversation_id={}", sim.address, s.conversation);
    let token = token(s.user, Role::CustomerOperator);
    let mut tab = authenticated_tab(&url, &token).await;

    for round in 0..3 {
        let (mut leaving, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connected");
        send(
            &mut leaving,
            json!({ "type": "auth", "token": token, "resume_after": 0 }),
        )
        .await;
        drop(leaving);

        let text = format!("still here {round}");
        send(&mut tab, json!({ "type": "message", "text": text })).await;
        let mut answered = false;
        while let Some(frame) = next(&mut tab, Duration::from_secs(20)).await {
            if frame["type"] == "response" {
                assert_eq!(frame["text"], format!("Echo: {text}"));
                answered = true;
                break;
            }
        }
        assert!(
            answered,
            "round {round}: the other tab's message was answered"
        );
    }
}

/// The account's `@connections` quota inside the stack: the management API answers 429 past
/// 10 posts a second (burst 2) while a reply streams 20 pieces 25 ms apart to two tabs, with
/// no posting budget to keep under it. Throttled posts are retried, so each tab assembles the
/// whole reply from its chunks, in order and nothing twice, and gets one response.
#[tokio::test]
async fn throttled_posts_lose_no_chunk_on_the_aws_shaped_stack() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let agent = seed_agent_with(&db, s.tenant, "streams", Provider::Openai, "bench").await;
    let conversation = conversation_for(&db, s.tenant, agent, s.user).await;
    let model = tests::streaming::start_model(20, Duration::from_millis(25))
        .await
        .unwrap();
    let sim = AwsSim::start(&Settings {
        model_base_url: Some(model),
        post_budget: None,
        management_quota: Some((10, 2)),
        ..settings(&test)
    })
    .await
    .unwrap();
    let url = format!("ws://{}/ws?conversation_id={conversation}", sim.address);
    let token = token(s.user, Role::CustomerOperator);
    let mut tabs = Vec::new();
    for _ in 0..2 {
        tabs.push(authenticated_tab(&url, &token).await);
    }
    send(&mut tabs[0], json!({ "type": "message", "text": "go" })).await;

    for (n, tab) in tabs.iter_mut().enumerate() {
        let mut text = String::new();
        let mut responses = Vec::new();
        while let Some(frame) = next(tab, Duration::from_secs(30)).await {
            match frame["type"].as_str() {
                Some("chunk") => {
                    let offset = frame["offset"].as_u64().unwrap() as usize;
                    let held = text.chars().count();
                    assert!(offset <= held, "tab {n}: a chunk past a gap: {frame}");
                    let delta = frame["delta"].as_str().unwrap();
                    text.extend(delta.chars().skip(held - offset));
                }
                Some("response") => {
                    responses.push(frame);
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(responses.len(), 1, "tab {n}: the response came");
        assert_eq!(responses[0]["text"].as_str().unwrap(), text, "tab {n}");
        assert!(!text.is_empty());
        // Nothing more: no response twice.
        while let Some(frame) = next(tab, Duration::from_millis(500)).await {
            assert_ne!(frame["type"], "response", "tab {n}: {frame}");
        }
    }
    assert!(sim.throttled().await.unwrap() > 0, "the quota was reached");
}
