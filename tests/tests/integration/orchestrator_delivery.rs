//! How the orchestrator's reply reaches sockets: streamed chunks in order, several tabs, a gone
//! socket, Redis in local mode, and replies too long for one frame.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use shared::db::agents::Provider;
use shared::delivery::{ManagementApi, RedisFanout, parse_published};
use shared::domain::ConnectionId;
use shared::redis_keys::webchat_response_key;

use crate::helpers::aws::sdk_config;
use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, last_user_text, pieces};
use crate::helpers::redis_client;

use crate::helpers::orchestrator::jobs_from;
use crate::helpers::orchestrator::{conversation_with, of_type, orchestrator, replies, run};

#[tokio::test]
async fn streamed_chunks_arrive_in_order_and_add_up_to_the_stored_reply() {
    let h = Harness::new().await;
    let words = [
        "The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "lazy ", "dog.",
    ];
    let llm =
        FakeLlm::start(move |_, _| Reply::Stream(pieces(&words), Duration::from_millis(60))).await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = jobs_from(&h, "tab", &["tell me"]).await;

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());

    let stored = replies(&h, conversation).await;
    assert_eq!(stored[0].content, words.concat());
    let frames = h.api.frames_to("tab");
    let chunks = of_type(&frames, "chunk");
    assert!(
        chunks.len() >= 2,
        "pieces 60 ms apart are batched into several chunks: {chunks:?}"
    );
    let joined: String = chunks
        .iter()
        .map(|c| c["delta"].as_str().unwrap())
        .collect();
    assert_eq!(joined, stored[0].content);
    assert!(
        chunks
            .iter()
            .all(|c| c["message_id"] == json!(stored[0].id))
    );
    let last_chunk = frames.iter().rposition(|f| f["type"] == "chunk").unwrap();
    let response = frames.iter().position(|f| f["type"] == "response").unwrap();
    assert!(response > last_chunk, "the response comes after the chunks");
    assert_eq!(frames[response]["text"], stored[0].content);

    // What the model was asked: the system prompt, then the conversation.
    let request = &llm.requests()[0];
    assert_eq!(request["model"], "gpt-test");
    assert_eq!(request["stream"], true);
    assert_eq!(request["temperature"], 0.2);
    assert_eq!(
        request["messages"][0],
        json!({ "role": "system", "content": "You are helpful." })
    );
    assert_eq!(last_user_text(request), "tell me");
}

#[tokio::test]
async fn a_gone_socket_is_forgotten_and_the_other_still_gets_the_reply() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("closed-tab").await;
    h.open_session("open-tab").await;
    let jobs = jobs_from(&h, "open-tab", &["anyone?"]).await;
    // The first tab closes without its $disconnect having arrived.
    use shared::delivery::Delivery;
    ManagementApi::new(sdk_config())
        .close(
            &h.api.endpoint,
            &shared::domain::ConnectionId::parse("closed-tab").unwrap(),
        )
        .await
        .unwrap();

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());
    assert!(
        h.connection("closed-tab").await.is_none(),
        "the gone socket is forgotten"
    );
    assert!(h.connection("open-tab").await.is_some());
    assert_eq!(of_type(&h.api.frames_to("open-tab"), "response").len(), 1);
}

/// The original system's `test_send_response_web_publishes_to_redis`.
#[tokio::test]
async fn in_local_mode_the_reply_is_published_on_the_conversations_redis_channel() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let mut state = orchestrator(&h, &llm);
    state.fanout = Arc::new(RedisFanout::new(&std::env::var("REDIS_URL").unwrap()).unwrap());
    h.open_session("tab").await;
    let jobs = jobs_from(&h, "tab", &["over redis"]).await;
    let mut pubsub = redis_client().get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(webchat_response_key(h.seed.tenant, h.seed.conversation))
        .await
        .unwrap();

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());

    let message = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("a response is published")
        .unwrap();
    let payload = message.get_payload::<String>().unwrap();
    let (to, frame) = parse_published(&payload).expect("recipients, then the frame");
    assert_eq!(
        to,
        [ConnectionId::parse("tab").unwrap()],
        "the authorized socket"
    );
    let frame: Value = serde_json::from_str(frame).unwrap();
    assert_eq!(frame["type"], "response");
    assert_eq!(frame["text"], "Echo: over redis");
    assert_eq!(frame["conversation_id"], json!(h.seed.conversation));
}

/// A gateway's bridge resubscribing after Redis came back still gets the frames published
/// meanwhile; with no gateway at all, the job still ends, its reply stored.
#[tokio::test]
async fn redis_frames_wait_briefly_for_a_gateway_to_resubscribe() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let mut state = orchestrator(&h, &llm);
    state.fanout = Arc::new(RedisFanout::new(&std::env::var("REDIS_URL").unwrap()).unwrap());
    let state = Arc::new(state);
    h.open_session("tab").await;
    let jobs = jobs_from(&h, "tab", &["while resubscribing", "to nobody"]).await;

    let job = tokio::spawn({
        let (state, record) = (state.clone(), jobs[0].record());
        async move { run(&state, vec![record]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut pubsub = redis_client().get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(webchat_response_key(h.seed.tenant, h.seed.conversation))
        .await
        .unwrap();
    let mut heard = Vec::new();
    let mut messages = pubsub.on_message();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(5), messages.next()).await
    {
        let payload = message.get_payload::<String>().unwrap();
        let frame: Value = serde_json::from_str(parse_published(&payload).unwrap().1).unwrap();
        heard.push(frame["type"].as_str().unwrap().to_owned());
        if frame["type"] == "response" {
            break;
        }
    }
    assert_eq!(
        heard,
        ["response"],
        "published before the subscription, not lost"
    );
    assert!(job.await.unwrap().is_empty());
    drop(messages);
    drop(pubsub);

    assert!(
        run(&state, vec![jobs[1].record()]).await.is_empty(),
        "not retried"
    );
    assert_eq!(replies(&h, h.seed.conversation).await.len(), 2);
}

#[tokio::test]
async fn a_reply_too_long_for_one_frame_goes_as_chunks_and_a_textless_response() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    // 7 000 control characters: a legal message whose echo escapes to about 42 KiB of JSON.
    let text = format!("a{}z", "\u{1}".repeat(7_000));
    let jobs = jobs_from(&h, "tab", &[&text]).await;

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());

    let stored = replies(&h, h.seed.conversation).await;
    assert_eq!(stored[0].content, format!("Echo: {text}"));
    let frames = h.api.frames_to("tab");
    let chunks = of_type(&frames, "chunk");
    assert!(chunks.len() >= 2);
    let joined: String = chunks
        .iter()
        .map(|c| c["delta"].as_str().unwrap())
        .collect();
    assert_eq!(joined, stored[0].content);
    let last = frames.last().unwrap();
    assert_eq!(last["type"], "response");
    assert_eq!(last["message_id"], json!(stored[0].id));
    assert_eq!(last.get("text"), None, "the text did not fit");
    for frame in &frames {
        assert!(
            frame.to_string().len() <= 32 * 1024,
            "every frame fits API Gateway's limit"
        );
    }
}
