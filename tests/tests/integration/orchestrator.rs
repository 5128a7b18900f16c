//! The orchestrator against real Postgres, moto's SQS, the wire-level management API and fake
//! model servers: one job, one stored reply, on every socket of the conversation.

use std::time::Duration;

use aws_lambda_events::sqs::SqsMessage;
use serde_json::json;
use shared::db::agents::Provider;
use shared::db::messages::{self, MessageStatus, PageFrom, StopReason};
use shared::db::{Scope, conversations};
use shared::domain::PageLimit;
use shared::job::Job;

use crate::helpers::aws::Queued;
use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, last_user_text, pieces};

use crate::helpers::orchestrator::{
    conversation_with, jobs_from, of_type, on_receive, orchestrator, replies, run,
};

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
    tx.commit().await.unwrap();
    let earlier = tests::stack::store_reply(
        &h.db,
        &conv,
        job.reply_id.unwrap(),
        job.message_id,
        "stored earlier",
        StopReason::End,
        None,
    )
    .await
    .unwrap()
    .reply;

    assert!(run(&state, vec![jobs[0].record()]).await.is_empty());
    assert!(llm.requests().is_empty(), "the agent is not asked");
    let frames = h.api.frames_to("tab");
    let responses = of_type(&frames, "response");
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0]["text"], "stored earlier");
    assert_eq!(responses[0]["message_id"], json!(earlier.id));
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
    let failed = replies(&h, conversation).await;
    assert_eq!(failed.len(), 1, "the reply ends failed, empty");
    assert_eq!(failed[0].status, MessageStatus::Failed);
    assert_eq!(failed[0].content, "");
    let responses = of_type(&frames, "response");
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0]["stop_reason"], "error");
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    let history = messages::page(
        &mut tx,
        conversation,
        messages::Branch::All,
        PageFrom::Newest,
        PageLimit::default(),
    )
    .await
    .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(
        history[0].message.content, "bad request",
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
