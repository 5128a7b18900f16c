//! A reply that outlives the attempt producing it (invariant 7): a producer that died, a worker
//! killed mid-stream, an orchestrator redelivered by SQS; each reply is restarted with `reset`
//! and stored once.

use std::time::Duration;

use serde_json::{Value, json};
use shared::db::Scope;
use shared::db::agents::Provider;
use shared::db::messages::{self, MessageRole, MessageStatus, PageFrom};
use shared::domain::PageLimit;

use crate::helpers::harness::Harness;
use crate::helpers::orchestrator::{
    conversation_with, of_type, orchestrator, records_for, replies, run, stored,
};
use crate::helpers::streams::{assembled, slow_model};

#[tokio::test]
async fn a_reply_whose_producer_died_restarts_with_reset_and_is_stored_once() {
    let h = Harness::new().await;
    let llm = slow_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let records = records_for(&h, "tab", &["tell me"]).await;

    // The first attempt dies mid-stream (its future dropped, as a killed process stops).
    let dying = tokio::time::timeout(Duration::from_millis(500), run(&state, records.clone()));
    assert!(dying.await.is_err(), "still streaming when it died");
    let left = stored(&h, conversation).await;
    assert_eq!(left.last().unwrap().status, MessageStatus::Streaming);

    // The queue delivers the job again.
    assert!(run(&state, records).await.is_empty());
    let all = replies(&h, conversation).await;
    assert_eq!(all.len(), 1, "one stored reply");
    assert_eq!(all[0].content, "The answer comes in six pieces.");
    assert_eq!(all[0].status, MessageStatus::Complete);
    assert_eq!(
        all[0].id,
        left.last().unwrap().id,
        "the same reply, restarted"
    );
    let frames = h.api.frames_to("tab");
    let resets: Vec<&Value> = of_type(&frames, "chunk")
        .into_iter()
        .filter(|c| c["reset"] == true)
        .collect();
    assert_eq!(resets.len(), 1, "clients are told to start over once");
    assert_eq!(resets[0]["offset"], 0);
    assert_eq!(assembled(&frames, &json!(all[0].id)), all[0].content);
    assert_eq!(llm.requests().len(), 2);
}

/// A worker process killed (SIGKILL) while a reply streams: the next worker takes the reply
/// over, the socket is told `reset`, and the conversation ends with the whole reply once.
#[tokio::test]
async fn a_worker_killed_mid_stream_leaves_a_reply_the_next_worker_restarts() {
    use crate::helpers::local::{Env, authenticated, next, send};
    use crate::helpers::{TestDb, seed};

    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    // Two seconds a reply: "piece0 piece1 … piece19 ".
    let model = tests::streaming::start_model(20, Duration::from_millis(100))
        .await
        .unwrap();
    let conversation = crate::helpers::model_conversation(&db, &s).await;
    let env = Env::new(&test);
    let bin = std::env::var("KONSTRUCT_LOCAL_BIN").unwrap();
    let model_env = [("OPENAI_BASE_URL", model.as_str())];
    let start = |args: &'static [&'static str]| {
        tests::stack::Server::start(
            &bin,
            &env.database_url,
            &env.redis_url,
            &env.prefix,
            args,
            &model_env,
        )
    };
    let gateway = start(&["serve", "--listen", "127.0.0.1:0", "--no-worker"])
        .await
        .unwrap();
    let worker = start(&["worker"]).await.unwrap();
    let mut socket = authenticated(&gateway.address, &s, conversation).await;

    send(
        &mut socket,
        json!({ "type": "message", "text": "long one" }),
    )
    .await;
    let mut frames = Vec::new();
    while !frames.iter().any(|f: &Value| f["type"] == "chunk") {
        frames.push(
            next(&mut socket, Duration::from_secs(10))
                .await
                .expect("a chunk"),
        );
    }
    worker.stop().await;
    // The same consumer name: the new worker finds the dead one's pending entry first.
    let worker = start(&["worker"]).await.unwrap();
    let response = loop {
        let frame = next(&mut socket, Duration::from_secs(15))
            .await
            .expect("frames until the response");
        frames.push(frame.clone());
        if frame["type"] == "response" {
            break frame;
        }
    };

    let whole: String = (0..20).map(|i| format!("piece{i} ")).collect();
    assert_eq!(response["text"], whole);
    let chunks = of_type(&frames, "chunk");
    assert_eq!(
        chunks.iter().filter(|c| c["reset"] == true).count(),
        1,
        "told once to start over: {chunks:?}"
    );
    assert_eq!(assembled(&frames, &response["message_id"]), whole);
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let stored = messages::page(
        &mut tx,
        conversation,
        messages::Branch::All,
        PageFrom::Newest,
        PageLimit::default(),
    )
    .await
    .unwrap();
    let replies: Vec<_> = stored
        .iter()
        .map(|item| &item.message)
        .filter(|m| m.role == MessageRole::Assistant)
        .collect();
    assert_eq!(replies.len(), 1, "one stored reply");
    assert_eq!(replies[0].status, MessageStatus::Complete);
    assert_eq!(replies[0].content, whole);
    worker.stop().await;
    gateway.stop().await;
}

/// The orchestrator dying mid-stream under SQS (moto): the record is not deleted, SQS hands it
/// out again after its visibility timeout (receive count 2), and that receive restarts the reply
/// with `reset` and stores it once.
#[tokio::test]
async fn an_orchestrator_dying_mid_stream_is_redelivered_by_sqs_and_restarts_the_reply() {
    use aws_sdk_sqs::types::MessageSystemAttributeName;

    let h = Harness::new().await;
    let llm = slow_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let ack = h
        .send(
            "tab",
            &json!({ "type": "message", "text": "tell me" }).to_string(),
        )
        .await;
    assert_eq!(ack["type"], "ack");
    let receive = || async {
        let received = h
            .queue
            .client
            .receive_message()
            .queue_url(&h.queue.queue_url)
            .visibility_timeout(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        let message = received.messages.unwrap_or_default().pop()?;
        let attrs = message.attributes.clone().unwrap_or_default();
        let mut record = aws_lambda_events::sqs::SqsMessage::default();
        record.message_id = message.message_id.clone();
        record.receipt_handle = message.receipt_handle.clone();
        record.body = message.body.clone();
        for (name, key) in [
            (MessageSystemAttributeName::MessageGroupId, "MessageGroupId"),
            (
                MessageSystemAttributeName::ApproximateReceiveCount,
                "ApproximateReceiveCount",
            ),
        ] {
            record.attributes.insert(key.into(), attrs[&name].clone());
        }
        Some(record)
    };

    let first = receive().await.expect("the job");
    assert_eq!(first.attributes["ApproximateReceiveCount"], "1");
    // The invocation dies mid-stream: nothing is reported, nothing deleted.
    let dying = tokio::time::timeout(Duration::from_millis(500), run(&state, vec![first]));
    assert!(dying.await.is_err());
    let again = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(record) = receive().await {
            break record;
        }
    };
    assert_eq!(again.attributes["ApproximateReceiveCount"], "2");
    assert!(run(&state, vec![again.clone()]).await.is_empty());
    h.queue
        .client
        .delete_message()
        .queue_url(&h.queue.queue_url)
        .receipt_handle(again.receipt_handle.unwrap())
        .send()
        .await
        .unwrap();

    let all = replies(&h, conversation).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].content, "The answer comes in six pieces.");
    let frames = h.api.frames_to("tab");
    let resets = of_type(&frames, "chunk")
        .into_iter()
        .filter(|c| c["reset"] == true)
        .count();
    assert_eq!(resets, 1);
    assert_eq!(assembled(&frames, &json!(all[0].id)), all[0].content);
}
