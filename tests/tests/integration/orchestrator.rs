//! The orchestrator against real Postgres, moto's SQS, the wire-level management API and fake
//! model servers: one job, one stored reply, on every socket of the conversation.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::sqs::{SqsEvent, SqsMessage};
use futures::StreamExt;
use serde_json::{Value, json};
use shared::agent::{Agents, Bedrock, Echo, OpenAi, OutputLimits, RetryPolicy};
use shared::db::agents::Provider;
use shared::db::messages::{self, MessageRole, MessageStatus, PageFrom, StopReason};
use shared::db::{Scope, conversations, message_path};
use shared::delivery::{ConnectionsFanout, ManagementApi, RedisFanout, parse_published};
use shared::domain::{ConnectionId, ConversationId, MessageId, PageLimit};
use shared::job::Job;
use shared::orchestrator::{
    ContextLimits, DEFAULT_JOB_BUDGET, DEFAULT_MAX_RECEIVES, OrchestratorState, handle,
};
use shared::redis_keys::webchat_response_key;

use crate::aws::{Queued, drain, sdk_config};
use crate::helpers::{redis_client, seed_agent_with};
use crate::llm::{FakeLlm, Reply, last_user_text, pieces};
use crate::ws::Harness;

/// Every provider, talking to the fake model server.
pub fn agents(llm: &FakeLlm) -> Agents {
    let bedrock = aws_sdk_bedrockruntime::Client::from_conf(
        aws_sdk_bedrockruntime::config::Builder::from(&sdk_config())
            .endpoint_url(&llm.endpoint)
            .build(),
    );
    Agents {
        echo: Echo,
        openai: OpenAi::new(&llm.base_url, Some("sk-test".into())),
        bedrock: Bedrock::new(bedrock),
    }
}

pub fn orchestrator(h: &Harness, llm: &FakeLlm) -> OrchestratorState {
    OrchestratorState {
        db: h.db.clone(),
        fanout: Arc::new(ConnectionsFanout::new(
            h.db.clone(),
            Arc::new(ManagementApi::new(sdk_config())),
        )),
        agents: Arc::new(agents(llm)),
        retry: RetryPolicy {
            attempt_timeout: Duration::from_secs(2),
            max_attempts: 3,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        context: ContextLimits::default(),
        output: OutputLimits::default(),
        max_receives: DEFAULT_MAX_RECEIVES,
        job_budget: DEFAULT_JOB_BUDGET,
    }
}

/// A conversation of the seeded user with a new agent of this provider.
pub async fn conversation_with(h: &Harness, provider: Provider, model: &str) -> ConversationId {
    let agent = seed_agent_with(&h.db, h.seed.tenant, "model agent", provider, model).await;
    crate::helpers::conversation_for(&h.db, h.seed.tenant, agent, h.seed.user).await
}

/// The jobs the message route queued for these messages, as the orchestrator receives them.
pub async fn queued_jobs(h: &Harness, connection: &str, texts: &[&str]) -> Vec<Job> {
    jobs_from(h, connection, texts)
        .await
        .into_iter()
        .map(|q| serde_json::from_value(q.body).unwrap())
        .collect()
}

/// The SQS records the route queued for these messages.
pub async fn records_for(h: &Harness, connection: &str, texts: &[&str]) -> Vec<SqsMessage> {
    jobs_from(h, connection, texts)
        .await
        .iter()
        .map(Queued::record)
        .collect()
}

/// Another OpenAI-backed conversation of the seeded user, with an agent of this name.
pub async fn conversation_with_named(h: &Harness, name: &str) -> ConversationId {
    let agent = seed_agent_with(&h.db, h.seed.tenant, name, Provider::Openai, "gpt-test").await;
    crate::helpers::conversation_for(&h.db, h.seed.tenant, agent, h.seed.user).await
}

/// Sends user messages on a socket and returns the jobs the route queued, in order.
async fn jobs_from(h: &Harness, connection: &str, texts: &[&str]) -> Vec<Queued> {
    for text in texts {
        let ack = h
            .send(
                connection,
                &json!({ "type": "message", "text": text }).to_string(),
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    drain(&h.queue).await
}

fn batch(records: Vec<SqsMessage>) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = records;
    event
}

/// The record as SQS hands it over on its `n`th receive.
pub fn on_receive(mut record: SqsMessage, n: u32) -> SqsMessage {
    record
        .attributes
        .insert("ApproximateReceiveCount".into(), n.to_string());
    record
}

pub async fn run(state: &OrchestratorState, records: Vec<SqsMessage>) -> Vec<String> {
    handle(state, batch(records), None)
        .await
        .batch_item_failures
        .into_iter()
        .map(|f| f.item_identifier)
        .collect()
}

/// Every message of the conversation, oldest first.
pub async fn stored(h: &Harness, conversation: ConversationId) -> Vec<messages::Message> {
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    messages::page(
        &mut tx,
        conversation,
        PageFrom::Newest,
        PageLimit::new(200).unwrap(),
    )
    .await
    .unwrap()
}

/// The conversation's replies that have ended, oldest first.
pub async fn replies(h: &Harness, conversation: ConversationId) -> Vec<messages::Message> {
    stored(h, conversation)
        .await
        .into_iter()
        .filter(|m| m.role == MessageRole::Assistant && m.status != MessageStatus::Streaming)
        .collect()
}

pub fn of_type<'a>(frames: &'a [Value], kind: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == kind).collect()
}

#[tokio::test]
async fn one_job_gives_one_stored_reply_on_both_tabs() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab1").await;
    h.open_session("tab2").await;
    let jobs = jobs_from(&h, "tab1", &["hi there"]).await;

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());

    let stored = replies(&h, h.seed.conversation).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].content, "Echo: hi there");
    let job: Job = serde_json::from_value(jobs[0].body.clone()).unwrap();
    assert_eq!(stored[0].reply_to, Some(job.message_id));
    for tab in ["tab1", "tab2"] {
        let frames = h.api.frames_to(tab);
        let responses = of_type(&frames, "response");
        assert_eq!(responses.len(), 1, "{tab}: {frames:?}");
        assert_eq!(
            *responses[0],
            json!({
                "type": "response",
                "text": "Echo: hi there",
                "seq": 2,
                "stop_reason": "end",
                "conversation_id": h.seed.conversation,
                "message_id": stored[0].id,
                "reply_to": job.message_id,
            })
        );
    }
    assert!(llm.requests().is_empty(), "the echo agent calls no model");
}

#[tokio::test]
async fn a_redelivered_job_is_answered_once_and_delivered_again() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = jobs_from(&h, "tab", &["question"]).await;

    // SQS delivers at least once: the same record twice in a batch, then once more.
    assert!(
        run(&state, vec![jobs[0].record(), jobs[0].record()])
            .await
            .is_empty()
    );
    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());

    assert_eq!(llm.requests().len(), 1, "the agent is asked once");
    let stored = replies(&h, conversation).await;
    assert_eq!(stored.len(), 1, "one stored reply");
    assert_eq!(stored[0].content, "Hello world");
    let frames = h.api.frames_to("tab");
    let responses = of_type(&frames, "response");
    assert_eq!(responses.len(), 3, "each delivery sends the reply");
    assert!(
        responses
            .iter()
            .all(|r| r["message_id"] == json!(stored[0].id))
    );
}

#[tokio::test]
async fn a_reply_stored_but_not_delivered_is_delivered_without_asking_again() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = jobs_from(&h, "tab", &["question"]).await;
    let job: Job = serde_json::from_value(jobs[0].body.clone()).unwrap();
    // As if an earlier run stored the reply and died before sending it.
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    let conv = conversations::find(&mut tx, conversation)
        .await
        .unwrap()
        .unwrap();
    let earlier = message_path::store_reply(
        &mut tx,
        &conv,
        MessageId::new(),
        job.message_id,
        "stored earlier",
        StopReason::End,
        None,
    )
    .await
    .unwrap()
    .reply;
    tx.commit().await.unwrap();

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());
    assert!(llm.requests().is_empty(), "the agent is not asked");
    let frames = h.api.frames_to("tab");
    let responses = of_type(&frames, "response");
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0]["text"], "stored earlier");
    assert_eq!(responses[0]["message_id"], json!(earlier.id));
}

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
async fn a_500_then_success_gives_one_reply() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, i| {
        if i == 0 {
            Reply::Status(500)
        } else {
            Reply::Stream(pieces(&["recovered"]), Duration::ZERO)
        }
    })
    .await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = jobs_from(&h, "tab", &["again?"]).await;

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());
    assert_eq!(llm.requests().len(), 2);
    let stored = replies(&h, conversation).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].content, "recovered");
    assert!(of_type(&h.api.frames_to("tab"), "error").is_empty());
}

#[tokio::test]
async fn a_permanent_400_is_agent_failed_and_the_user_message_stays() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| Reply::Status(400)).await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = jobs_from(&h, "tab", &["bad request"]).await;

    let failures = run(&state, vec![jobs[0].record()]).await;
    assert!(
        failures.is_empty(),
        "retrying cannot help a 400: not reported failed"
    );
    assert_eq!(llm.requests().len(), 1, "a 400 is not retried");
    let frames = h.api.frames_to("tab");
    let errors = of_type(&frames, "error");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], "agent_failed");
    assert!(
        replies(&h, conversation).await.is_empty(),
        "no reply stored"
    );
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    let history = messages::page(
        &mut tx,
        conversation,
        PageFrom::Newest,
        PageLimit::default(),
    )
    .await
    .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        history[0].content, "bad request",
        "the user message is intact"
    );
}

#[tokio::test]
async fn a_stalled_agent_times_out_and_the_record_is_retried_later() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| Reply::Stall).await;
    let mut state = orchestrator(&h, &llm);
    state.retry.attempt_timeout = Duration::from_millis(200);
    state.retry.max_attempts = 2;
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let jobs = jobs_from(&h, "tab", &["hello?"]).await;

    let failures = run(&state, vec![jobs[0].record()]).await;
    assert_eq!(
        failures,
        vec![jobs[0].message_id.clone()],
        "a timeout may pass: retry later"
    );
    assert_eq!(llm.requests().len(), 2);
    assert!(
        of_type(&h.api.frames_to("tab"), "error").is_empty(),
        "not told while a later receive may answer"
    );

    // The queue's last receive: still failed (on to the dead-letter queue), and the user told.
    let last = on_receive(jobs[0].record(), state.max_receives);
    assert_eq!(run(&state, vec![last]).await.len(), 1);
    let frames = h.api.frames_to("tab");
    let errors = of_type(&frames, "error");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], "agent_failed");
}

#[tokio::test]
async fn bedrock_converse_goes_through_the_sdk() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(
        &h,
        Provider::Bedrock,
        "anthropic.claude-3-haiku-20240307-v1:0",
    )
    .await;
    h.open_session_on("tab", conversation).await;
    let jobs = jobs_from(&h, "tab", &["first", "second"]).await;

    assert!(
        run(&state, jobs.iter().map(Queued::record).collect())
            .await
            .is_empty()
    );

    let stored = replies(&h, conversation).await;
    assert_eq!(
        stored
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>(),
        vec!["Bedrock says: first", "Bedrock says: second"]
    );
    let requests = llm.bedrock_requests();
    assert_eq!(requests.len(), 2);
    let (model, request) = &requests[1];
    assert_eq!(model, "anthropic.claude-3-haiku-20240307-v1:0");
    assert_eq!(request["system"], json!([{ "text": "You are helpful." }]));
    let temperature = request["inferenceConfig"]["temperature"].as_f64().unwrap();
    assert!((temperature - 0.2).abs() < 1e-6, "{temperature}");
    let roles: Vec<&str> = request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        vec!["user", "assistant", "user"],
        "the history, alternating"
    );
}

#[tokio::test]
async fn a_failure_fails_the_rest_of_its_group_and_spares_other_groups() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|request, _| {
        if last_user_text(request).contains("FAIL") {
            Reply::Status(503)
        } else {
            Reply::Stream(pieces(&["ok"]), Duration::ZERO)
        }
    })
    .await;
    let state = orchestrator(&h, &llm);
    let conv1 = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("one", conv1).await;
    h.open_session("two").await;
    let first = jobs_from(&h, "one", &["ok 1", "FAIL 2", "after 3"]).await;
    let other = jobs_from(&h, "two", &["other conversation"]).await;
    let records = vec![
        first[0].record(),
        first[1].record(),
        first[2].record(),
        other[0].record(),
    ];

    let failures = run(&state, records).await;

    assert_eq!(
        failures,
        vec![first[1].message_id.clone(), first[2].message_id.clone()]
    );
    let conv1_replies = replies(&h, conv1).await;
    assert_eq!(
        conv1_replies.len(),
        1,
        "only the first of conversation 1 answered"
    );
    let first_job: Job = serde_json::from_value(first[0].body.clone()).unwrap();
    assert_eq!(conv1_replies[0].reply_to, Some(first_job.message_id));
    let conv2_replies = replies(&h, h.seed.conversation).await;
    assert_eq!(conv2_replies.len(), 1);
    assert_eq!(conv2_replies[0].content, "Echo: other conversation");
    assert!(
        !llm.requests()
            .iter()
            .any(|r| last_user_text(r) == "after 3"),
        "the record after the failure was not run"
    );
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

#[tokio::test]
async fn an_unparseable_record_is_dropped_and_the_rest_is_processed() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let jobs = jobs_from(&h, "tab", &["fine"]).await;
    let mut garbage = SqsMessage::default();
    garbage.message_id = Some("garbage-1".into());
    garbage.body = Some("{\"not\": \"a job\"}".into());
    garbage
        .attributes
        .insert("MessageGroupId".into(), "somewhere-else".into());
    let mut empty = SqsMessage::default();
    empty.message_id = Some("empty-1".into());

    // No delivery can make them jobs: retrying would only hold their message groups back.
    let failures = run(&state, vec![garbage, jobs[0].record(), empty]).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(replies(&h, h.seed.conversation).await.len(), 1);
}

#[tokio::test]
async fn test_send_response_web_publishes_to_redis() {
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
