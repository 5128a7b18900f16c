//! The AWS-shaped stack (`tests::aws_sim`): the function binaries under the Lambda emulator,
//! the orchestrator on Lambda's SQS FIFO event source over moto, PgBouncer in transaction mode
//! in front of Postgres, and a network delay on every hop. A conversation as a user has it.

use std::time::Duration;

use serde_json::json;
use shared::db::agents::Provider;
use shared::domain::Role;
use tests::aws_sim::{AwsSim, Latencies, Settings};

use crate::helpers::local::{next, send};
use crate::helpers::{
    TestDb, conversation_for, eventually, redis_prefix, seed, seed_agent_with, token,
};

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
        // The ack is the route's answer, posted when the function returns: on a busy machine
        // the reply may beat it (the client takes either order).
        if !seen.iter().any(|kind| kind == "ack") {
            let late = next(&mut socket, Duration::from_secs(10)).await;
            seen.push(
                late.map(|f| f["type"].as_str().unwrap_or_default().to_owned())
                    .unwrap_or_default(),
            );
        }
        assert_eq!(seen[0], "typing", "{text}: {seen:?}");
        let mut kinds = seen.clone();
        kinds.sort();
        assert_eq!(kinds, ["ack", "response", "typing"], "{text}: {seen:?}");
    }
    assert!(
        sim.lambda.cold_starts() >= 4,
        "each function ran in its own environment"
    );
    // The reply is posted before its invocation returns.
    eventually("both orchestrator invocations returned", || async {
        sim.source.invocations().len() >= 2
    })
    .await;
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

/// The frames a tab gets up to and including the first `response`.
async fn until_response(tab: &mut Tab) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    while let Some(frame) = next(tab, Duration::from_secs(30)).await {
        let done = frame["type"] == "response";
        seen.push(frame);
        if done {
            return seen;
        }
    }
    panic!("no response; got {seen:?}");
}

/// Regenerate, edit and a move of the head through every AWS piece: the regenerate's job is a
/// request of its own to SQS FIFO's deduplication (it would be dropped as a repeat of the
/// message's), and the other tab follows each move through the connection-management API.
#[tokio::test]
async fn branches_run_on_the_aws_shaped_stack() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let sim = AwsSim::start(&settings(&test)).await.unwrap();
    let url = format!("ws://{}/ws?conversation_id={}", sim.address, s.conversation);
    let bearer = token(s.user, Role::CustomerOperator);
    let mut tab = authenticated_tab(&url, &bearer).await;
    let mut other = authenticated_tab(&url, &bearer).await;

    send(&mut tab, json!({ "type": "message", "text": "first" })).await;
    let first = until_response(&mut tab).await.pop().unwrap();
    until_response(&mut other).await;
    let question = first["reply_to"].clone();

    send(
        &mut tab,
        json!({ "type": "regenerate", "reply_to": question }),
    )
    .await;
    let frames = until_response(&mut tab).await;
    let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["typing", "head", "response"], "{frames:?}");
    let again = frames.last().unwrap();
    assert_eq!(again["text"], "Echo: first");
    assert_eq!(again["reply_to"], question);
    assert_ne!(again["message_id"], first["message_id"], "a second reply");
    assert_eq!(frames[1]["reply_id"], again["message_id"]);
    let seen = until_response(&mut other).await;
    assert_eq!(seen[0]["type"], "head", "{seen:?}");

    send(
        &mut tab,
        json!({ "type": "edit", "message_id": question, "text": "first, edited" }),
    )
    .await;
    let mut frames = until_response(&mut tab).await;
    // The ack is the route's answer, posted when the function returns: the reply may beat it.
    if !frames.iter().any(|f| f["type"] == "ack") {
        frames.extend(next(&mut tab, Duration::from_secs(30)).await);
    }
    let ack = frames.iter().find(|f| f["type"] == "ack").unwrap();
    assert_eq!(ack["parent_id"], serde_json::Value::Null);
    let reply = frames.iter().find(|f| f["type"] == "response").unwrap();
    assert_eq!(reply["text"], "Echo: first, edited");
    let seen = until_response(&mut other).await;
    assert!(
        seen.iter()
            .any(|f| f["type"] == "head" && f["head_id"] == ack["message_id"])
    );

    send(
        &mut tab,
        json!({ "type": "head", "message_id": first["message_id"] }),
    )
    .await;
    for socket in [&mut tab, &mut other] {
        let moved = next(socket, Duration::from_secs(30)).await.unwrap();
        assert_eq!(moved["type"], "head", "{moved}");
        assert_eq!(moved["head_id"], first["message_id"]);
    }
}
