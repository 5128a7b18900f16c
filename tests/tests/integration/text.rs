//! Text the database cannot store, and text that shows nothing: refused at the edge before
//! anything happens; agent output made storable before it is streamed or stored; and every text
//! the socket accepts comes back byte for byte from storage, frames and the REST history.

use std::time::Duration;

use axum::body::Body;
use http::Request;
use proptest::prelude::*;
use serde_json::{Value, json};
use shared::api::{self, ApiState};
use shared::config::routes::{Limits, RateLimit};
use shared::db::agents::Provider;
use shared::domain::Role;
use shared::orchestrator::OrchestratorState;
use tower::ServiceExt;

use crate::helpers::aws::{depth, drain};
use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, pieces};
use crate::helpers::local::{Env, authenticated, next, send};
use crate::helpers::orchestrator::{conversation_with, orchestrator, replies, run};
use crate::helpers::{TestDb, seed, token, verifier};

fn message(text: &str) -> String {
    json!({ "type": "message", "text": text }).to_string()
}

#[tokio::test]
async fn nul_and_invisible_only_text_is_refused_before_typing_and_nothing_is_stored() {
    let h = Harness::new().await;
    h.open_session("tab").await;
    for (text, says) in [
        ("a\u{0}b", "NUL"),
        ("\u{0}", "NUL"),
        ("\u{200B}\u{2060}\u{FEFF}", "empty"),
        (" \u{200D}\u{00AD} \n\u{E0001}", "empty"),
    ] {
        let answer = h.send("tab", &message(text)).await;
        assert_eq!(answer["type"], "error", "{text:?}: {answer}");
        assert_eq!(answer["code"], "bad_request", "{text:?}");
        assert!(
            answer["message"].as_str().unwrap().contains(says),
            "{answer}"
        );
    }
    assert!(h.api.posts().is_empty(), "no typing for refused text");
    assert_eq!(h.stored_messages().await, 0);
    assert_eq!(depth(&h.queue).await, 0);
}

/// A model that streams a NUL in the middle of its reply, then answers plainly.
async fn nul_model() -> FakeLlm {
    FakeLlm::start(|request, _| {
        if crate::helpers::llm::last_user_text(request) == "first" {
            Reply::Stream(
                pieces(&["Hello wor\u{0}", "ld!"]),
                Duration::from_millis(150),
            )
        } else {
            Reply::Stream(pieces(&["next answer"]), Duration::ZERO)
        }
    })
    .await
}

#[tokio::test]
async fn a_model_reply_with_nul_is_stored_once_without_it_and_the_conversation_goes_on() {
    let h = Harness::new().await;
    let llm = nul_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;

    assert_eq!(h.send("tab", &message("first")).await["type"], "ack");
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    assert!(run(&state, records).await.is_empty(), "stored, not retried");
    let stored = replies(&h, conversation).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].content, "Hello world!");
    let frames = h.api.frames_to("tab");
    let chunks: String = frames
        .iter()
        .filter(|f| f["type"] == "chunk")
        .map(|f| f["delta"].as_str().unwrap())
        .collect();
    assert_eq!(chunks, "Hello world!", "what streamed is what is stored");
    let responses: Vec<&Value> = frames.iter().filter(|f| f["type"] == "response").collect();
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0]["text"], "Hello world!");

    assert_eq!(h.send("tab", &message("second")).await["type"], "ack");
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    assert!(run(&state, records).await.is_empty());
    let stored = replies(&h, conversation).await;
    assert_eq!(stored[1].content, "next answer", "the conversation goes on");
}

#[tokio::test]
async fn konstruct_local_streams_and_stores_a_model_reply_with_nul_without_it() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let llm = nul_model().await;
    let conversation = crate::helpers::model_conversation(&db, &s).await;
    let env = Env::new(&test);
    let local = crate::helpers::local::Local::start_with_model(
        &env,
        &["serve", "--listen", "127.0.0.1:0"],
        &llm.base_url,
    )
    .await;
    let mut socket = authenticated(&local.address, &s, conversation).await;

    send(&mut socket, json!({ "type": "message", "text": "first" })).await;
    let mut streamed = String::new();
    let response = loop {
        let frame = next(&mut socket, Duration::from_secs(10))
            .await
            .expect("frames until the response");
        match frame["type"].as_str() {
            Some("chunk") => streamed.push_str(frame["delta"].as_str().unwrap()),
            Some("response") => break frame,
            Some("typing" | "ack") => {}
            _ => panic!("unexpected {frame}"),
        }
    };
    assert_eq!(streamed, "Hello world!");
    assert_eq!(response["text"], "Hello world!");

    send(&mut socket, json!({ "type": "message", "text": "second" })).await;
    let response = loop {
        let frame = expect_any(&mut socket).await;
        if frame["type"] == "response" {
            break frame;
        }
    };
    assert_eq!(response["text"], "next answer", "the conversation goes on");
    assert_eq!(
        next(&mut socket, Duration::from_millis(300)).await,
        None,
        "nothing streamed again"
    );
    local.stop().await;
}

async fn expect_any(socket: &mut crate::helpers::local::Socket) -> Value {
    next(socket, Duration::from_secs(10))
        .await
        .expect("a frame")
}

/// Everything a client can see of one message: the stored user text from the history, and the
/// echoed reply rebuilt from its frames.
struct RoundTrip {
    h: Harness,
    state: OrchestratorState,
    router: axum::Router,
    bearer: String,
}

impl RoundTrip {
    async fn new() -> Self {
        let mut h = Harness::new().await;
        h.state.message.limits = Limits {
            connection: RateLimit {
                messages: 1_000_000,
                window_seconds: 1,
            },
            user: RateLimit {
                messages: 1_000_000,
                window_seconds: 1,
            },
        };
        h.open_session("tab").await;
        let llm = FakeLlm::hello().await;
        let state = orchestrator(&h, &llm);
        let router = api::router(ApiState {
            db: h.db.clone(),
            tokens: verifier(),
            delivery: std::sync::Arc::new(shared::delivery::ManagementApi::new(
                crate::helpers::aws::sdk_config(),
            )),
        });
        let bearer = token(h.seed.user, Role::CustomerOperator);
        Self {
            h,
            state,
            router,
            bearer,
        }
    }

    /// Sends `text`; an accepted one must come back unchanged (trimmed) everywhere, a refused
    /// one must leave nothing behind.
    async fn check(&self, text: &str) -> Result<(), String> {
        let h = &self.h;
        let before = h.stored_messages().await;
        let posted = h.api.posts().len();
        let answer = h.send("tab", &message(text)).await;
        if answer["type"] == "error" {
            let code = answer["code"].as_str().unwrap_or_default();
            if !["bad_request", "too_large"].contains(&code) {
                return Err(format!("{text:?} refused with {answer}"));
            }
            if h.stored_messages().await != before || depth(&h.queue).await != 0 {
                return Err(format!(
                    "{text:?} refused but something was stored or queued"
                ));
            }
            if h.api.posts().len() != posted {
                return Err(format!("{text:?} refused after typing"));
            }
            return Ok(());
        }
        let expected = text.trim();
        let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
        if !run(&self.state, records).await.is_empty() {
            return Err(format!("{text:?}: the job failed"));
        }
        let frames: Vec<Value> = h.api.frames_to("tab")[posted..].to_vec();
        let response = frames
            .iter()
            .find(|f| f["type"] == "response")
            .ok_or(format!("{text:?}: no response"))?;
        let reply = match response["text"].as_str() {
            Some(text) => text.to_owned(),
            None => frames
                .iter()
                .filter(|f| f["type"] == "chunk")
                .map(|f| f["delta"].as_str().unwrap_or_default())
                .collect(),
        };
        if reply != format!("Echo: {expected}") {
            return Err(format!("{text:?}: the reply says {reply:?}"));
        }
        let request = Request::get(format!(
            "/api/portal/chat/conversations/{}/messages?limit=2",
            h.seed.conversation
        ))
        .header("authorization", format!("Bearer {}", self.bearer))
        .body(Body::empty())
        .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let history: Vec<Value> = serde_json::from_slice(&body).unwrap();
        if history[0]["content"] != json!(expected)
            || history[1]["content"] != json!(format!("Echo: {expected}"))
        {
            return Err(format!("{text:?}: the history holds {history:?}"));
        }
        Ok(())
    }
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,12}",
        Just("👋🏽".to_owned()),
        Just("\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}".to_owned()),
        Just("e\u{301}\u{302}".to_owned()),
        Just("\u{200F}שלום\u{200E}".to_owned()),
        Just("\u{7}\u{1}\u{1B}[0m\u{7F}".to_owned()),
        Just("\u{200B}".to_owned()),
        Just("\u{FEFF}".to_owned()),
        Just("\u{0}".to_owned()),
        Just(" \t\n".to_owned()),
        Just("\"\\/".to_owned()),
    ]
}

#[test]
fn any_text_the_socket_accepts_round_trips_and_any_it_refuses_leaves_nothing() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let trip = runtime.block_on(RoundTrip::new());
    // The 8000-character boundary, with characters of every UTF-8 length.
    for text in [
        "é".repeat(8000),
        "€".repeat(8000),
        "😀".repeat(8000),
        format!("  {}  ", "\u{7}".repeat(8000)),
        "😀".repeat(8001),
    ] {
        runtime.block_on(trip.check(&text)).unwrap();
    }
    proptest!(ProptestConfig::with_cases(48), |(parts in prop::collection::vec(piece(), 0..10))| {
        let text: String = parts.concat();
        runtime.block_on(trip.check(&text)).map_err(TestCaseError::fail)?;
    });
}
