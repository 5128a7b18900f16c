//! `cancel` (PROTOCOL §2) through the route handlers and the orchestrator: before the reply
//! starts, mid-stream, and refused where it may not apply.

use std::time::Duration;

use serde_json::json;
use shared::db::agents::Provider;
use shared::db::messages::MessageStatus;

use crate::helpers::harness::Harness;
use crate::helpers::orchestrator::{
    conversation_with, of_type, orchestrator, records_for, replies, run, stored, streaming_reply,
};
use crate::helpers::streams::{assembled, slow_model};

#[tokio::test]
async fn cancel_before_the_start_skips_the_agent_and_mid_stream_keeps_what_it_had() {
    let h = Harness::new().await;
    let llm = slow_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;

    // Before its job starts.
    let early = records_for(&h, "tab", &["never mind"]).await;
    let question = stored(&h, conversation).await.last().unwrap().id;
    let cancel = json!({ "type": "cancel", "reply_to": question }).to_string();
    assert_eq!(
        h.route("tab", &cancel).await,
        None,
        "cancel has no answer of its own"
    );
    assert!(run(&state, early).await.is_empty());
    assert!(llm.requests().is_empty(), "the agent is never asked");
    let reply = replies(&h, conversation).await.remove(0);
    assert_eq!(reply.status, MessageStatus::Cancelled);
    assert_eq!(reply.content, "");
    let frames = h.api.frames_to("tab");
    assert_eq!(of_type(&frames, "response")[0]["stop_reason"], "cancelled");

    // Mid-stream: the next flush sees the flag and the stream stops there.
    let records = records_for(&h, "tab", &["go on then"]).await;
    let question = stored(&h, conversation).await.last().unwrap().id;
    let started = tokio::time::Instant::now();
    let job = run(&state, records);
    let stop = async {
        streaming_reply(&h, conversation).await;
        h.route(
            "tab",
            &json!({ "type": "cancel", "reply_to": question }).to_string(),
        )
        .await
    };
    let (failures, _) = tokio::join!(job, async {
        let _ = tokio::time::timeout(Duration::from_secs(2), stop).await;
    });
    assert!(failures.is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "stopped early"
    );
    let reply = replies(&h, conversation)
        .await
        .into_iter()
        .find(|r| r.reply_to == Some(question))
        .unwrap();
    assert_eq!(reply.status, MessageStatus::Cancelled);
    assert!(
        !reply.content.is_empty() && reply.content.len() < 31,
        "{:?}",
        reply.content
    );
    let frames = h.api.frames_to("tab");
    let response = (*of_type(&frames, "response").last().unwrap()).clone();
    assert_eq!(response["stop_reason"], "cancelled");
    assert_eq!(assembled(&frames, &json!(reply.id)), reply.content);
}

#[tokio::test]
async fn cancel_is_refused_before_auth_and_for_a_message_not_in_the_conversation() {
    let h = Harness::new().await;
    h.connect("anon").await;
    let cancel = json!({ "type": "cancel", "reply_to": uuid::Uuid::new_v4() }).to_string();
    assert_eq!(h.send("anon", &cancel).await["code"], "unauthenticated");
    h.open_session("tab").await;
    assert_eq!(h.send("tab", &cancel).await["code"], "not_found");
    let bad = json!({ "type": "cancel", "reply_to": "not-a-uuid" }).to_string();
    assert_eq!(h.send("tab", &bad).await["code"], "bad_request");
}
