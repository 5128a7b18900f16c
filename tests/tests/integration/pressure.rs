//! The orchestrator at its limits: an invocation's deadline, failures that retrying cannot
//! fix, slow sockets, and output without end.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use shared::agent::Bedrock;
use shared::db::agents::Provider;
use shared::db::messages::MessageStatus;
use shared::db::{Scope, conversations};
use shared::delivery::{ConnectionsFanout, PostBudget};
use shared::domain::ConversationId;
use shared::orchestrator::{Unsettled, handle};
use tokio::time::Instant;

use crate::helpers::aws::sdk_config;
use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, last_user_text, pieces};
use crate::helpers::orchestrator::{
    agents, conversation_with, of_type, on_receive, orchestrator, records_for, replies, run,
};
use crate::helpers::seed::owner;
use crate::helpers::seed_agent_with;
use crate::helpers::streams::assembled;

fn failures_of(response: aws_lambda_events::sqs::SqsBatchResponse) -> Vec<String> {
    response
        .batch_item_failures
        .into_iter()
        .map(|f| f.item_identifier)
        .collect()
}

/// Two conversations: one whose three jobs take 1 s each, one whose agent never answers. With
/// 5 s before the cutoff (the deadline less its 1 s margin) and a 3.5 s job budget, two jobs
/// of the first fit (the second may start up to 1.5 s in) and the third cannot (2 s in at the
/// earliest); the stalled one is cut short by the deadline. The response comes before the
/// deadline, failing exactly the unfinished records.
#[tokio::test]
async fn a_batch_that_cannot_finish_before_the_deadline_fails_only_what_it_did_not_finish() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|request, _| {
        if last_user_text(request).contains("stall") {
            Reply::Stall
        } else {
            Reply::Stream(
                pieces(&["done: ", &last_user_text(request)]),
                Duration::from_millis(500),
            )
        }
    })
    .await;
    let mut state = orchestrator(&h, &llm);
    state.retry.attempt_timeout = Duration::from_secs(60);
    state.job_budget = Duration::from_millis(3500);
    let quick = conversation_with(&h, Provider::Openai, "gpt-test").await;
    let stuck = conversation_with_agent(&h, "stuck agent").await;
    h.open_session_on("quick-tab", quick).await;
    h.open_session_on("stuck-tab", stuck).await;
    let quick_records = records_for(&h, "quick-tab", &["one", "two", "three"]).await;
    let stuck_records = records_for(&h, "stuck-tab", &["stall please"]).await;
    let mut batch = aws_lambda_events::sqs::SqsEvent::default();
    batch.records = quick_records
        .iter()
        .chain(&stuck_records)
        .cloned()
        .collect();

    let deadline = Instant::now() + Duration::from_secs(6);
    let report = handle(&state, batch, Some(deadline)).await;
    assert!(Instant::now() < deadline, "answered before the deadline");

    let id = |r: &aws_lambda_events::sqs::SqsMessage| r.message_id.clone().unwrap();
    assert_eq!(
        failures_of(report.response()),
        vec![id(&quick_records[2]), id(&stuck_records[0])],
        "the job not started and the one cut short"
    );
    let kinds: Vec<_> = report.unsettled.iter().map(|(_, k)| *k).collect();
    assert_eq!(
        kinds,
        vec![Unsettled::Deferred, Unsettled::Failed],
        "the one not started is a deferral (no attempt used), the one cut short an attempt"
    );
    let answered: Vec<String> = replies(&h, quick)
        .await
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(answered, ["done: one", "done: two"]);
    assert!(replies(&h, stuck).await.is_empty());
    assert!(
        of_type(&h.api.frames_to("stuck-tab"), "error").is_empty(),
        "not told: the next receive may answer"
    );
}

/// A conversation of the seeded user with a new OpenAI-backed agent of this name.
async fn conversation_with_agent(h: &Harness, name: &str) -> ConversationId {
    crate::helpers::orchestrator::conversation_with_named(h, name).await
}

#[tokio::test]
async fn an_inactive_agent_is_told_at_once_and_not_retried() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let agent = seed_agent_with(
        &h.db,
        h.seed.tenant,
        "retired",
        Provider::Openai,
        "gpt-test",
    )
    .await;
    let mut tx = owner(&h.db)
        .begin(Scope::Tenant(h.seed.tenant))
        .await
        .unwrap();
    let conversation = conversations::get_or_create(&mut tx, h.seed.tenant, agent, h.seed.user)
        .await
        .unwrap()
        .row
        .id;
    sqlx::query("update agents set is_active = false where id = $1")
        .bind(agent)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    h.open_session_on("tab", conversation).await;
    let records = records_for(&h, "tab", &["anyone there?"]).await;

    assert!(run(&state, records).await.is_empty(), "not retried");
    assert!(llm.requests().is_empty(), "the model is never asked");
    let failed = replies(&h, conversation).await;
    assert_eq!(
        failed.len(),
        1,
        "its reply ends failed, empty: nothing answers for it"
    );
    assert_eq!(failed[0].status, MessageStatus::Failed);
    assert_eq!(failed[0].content, "");
    let frames = h.api.frames_to("tab");
    let errors = of_type(&frames, "error");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], "agent_failed");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("switched off"),
        "{}",
        errors[0]
    );
}

/// The model's error body names the key and the URL; the user sees neither.
#[tokio::test]
async fn a_provider_error_never_shows_its_details_in_a_frame() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| Reply::Status(401)).await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let records = records_for(&h, "tab", &["hello"]).await;

    assert!(run(&state, records).await.is_empty(), "a 401 is permanent");
    let frames = h.api.frames_to("tab");
    let errors = of_type(&frames, "error");
    assert_eq!(errors.len(), 1);
    let message = errors[0]["message"].as_str().unwrap();
    for secret in ["sk-test", "http", "401", "scripted"] {
        assert!(!message.contains(secret), "{message:?} shows {secret}");
    }
}

/// Twelve sockets, one stuck: posts run at most three at a time, every open socket gets the
/// reply, and the stuck one costs its own timeout only.
#[tokio::test]
async fn fan_out_is_bounded_and_a_stuck_socket_delays_no_other() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let mut state = orchestrator(&h, &llm);
    state.fanout = Arc::new(shared::delivery::ConnectionsFanout {
        concurrency: 3,
        post_timeout: Duration::from_millis(500),
        ..shared::delivery::ConnectionsFanout::new(
            h.db.clone(),
            Arc::new(shared::delivery::ManagementApi::new(
                crate::helpers::aws::sdk_config(),
            )),
        )
    });
    let tabs: Vec<String> = (0..12).map(|i| format!("tab-{i:02}")).collect();
    for tab in &tabs {
        h.open_session(tab).await;
    }
    h.api.stall("tab-00");
    h.api.set_latency(Duration::from_millis(20));
    // The other tabs are shown the message (the route's own bounded fan-out) before it is queued.
    let records = records_for(&h, "tab-01", &["to everyone"]).await;
    h.api.reset_max_in_flight();

    let started = Instant::now();
    assert!(run(&state, records).await.is_empty());
    let took = started.elapsed();

    assert!(
        h.api.max_in_flight() <= 3,
        "{} at once",
        h.api.max_in_flight()
    );
    for tab in &tabs[1..] {
        assert_eq!(
            of_type(&h.api.frames_to(tab), "response").len(),
            1,
            "{tab} got the reply"
        );
    }
    // Twelve posts of 20 ms three at a time, plus one timeout: far from a stall per socket.
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn both_providers_get_an_output_limit_and_an_agent_cannot_exceed_the_maximum() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let mut state = orchestrator(&h, &llm);
    state.output.default_max_tokens = 300;
    state.output.max_tokens = 2000;
    let plain = conversation_with(&h, Provider::Openai, "gpt-test").await;
    let greedy_agent =
        seed_agent_with(&h.db, h.seed.tenant, "greedy", Provider::Openai, "gpt-test").await;
    let bedrock = conversation_with(&h, Provider::Bedrock, "amazon.nova-lite-v1:0").await;
    let mut tx = owner(&h.db)
        .begin(Scope::Tenant(h.seed.tenant))
        .await
        .unwrap();
    sqlx::query("update agents set settings = '{\"max_tokens\": 100000}' where id = $1")
        .bind(greedy_agent)
        .execute(&mut *tx)
        .await
        .unwrap();
    let greedy = conversations::get_or_create(&mut tx, h.seed.tenant, greedy_agent, h.seed.user)
        .await
        .unwrap()
        .row
        .id;
    tx.commit().await.unwrap();
    for (tab, conversation) in [("plain", plain), ("greedy", greedy), ("bedrock", bedrock)] {
        h.open_session_on(tab, conversation).await;
        let records = records_for(&h, tab, &["limits?"]).await;
        assert!(run(&state, records).await.is_empty());
    }

    let asked: Vec<Value> = llm
        .requests()
        .iter()
        .map(|r| r["max_tokens"].clone())
        .collect();
    assert_eq!(
        asked,
        [json!(300), json!(2000)],
        "the default, then the maximum"
    );
    let (_, converse) = &llm.bedrock_requests()[0];
    assert_eq!(converse["inferenceConfig"]["maxTokens"], 300);
}

/// A model that would go on and on: the stored reply stops at the size cap, on a character
/// boundary, the chunks sent agree with it, and the response says `length`.
#[tokio::test]
async fn a_reply_over_the_size_cap_is_cut_and_ends_with_length() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| {
        // Apart enough that each piece is its own flush.
        Reply::Stream(
            pieces(&[&"ä".repeat(300), &"ö".repeat(300), &"ü".repeat(300)]),
            Duration::from_millis(150),
        )
    })
    .await;
    let mut state = orchestrator(&h, &llm);
    state.output.max_reply_bytes = 1001;
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let records = records_for(&h, "tab", &["talk forever"]).await;

    assert!(run(&state, records).await.is_empty());
    let stored = replies(&h, conversation).await;
    assert_eq!(stored.len(), 1);
    let text = &stored[0].content;
    assert_eq!(text.len(), 1000, "cut on a character boundary");
    assert_eq!(*text, format!("{}{}", "ä".repeat(300), "ö".repeat(200)));
    let frames = h.api.frames_to("tab");
    let streamed: String = of_type(&frames, "chunk")
        .iter()
        .map(|c| c["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, *text, "what streamed is what was stored");
    let response = of_type(&frames, "response")[0].clone();
    assert_eq!(response["stop_reason"], "length");
    assert_eq!(response["text"], json!(text));
}

/// The model's own stop at its limit, and the tokens it reports, reach the `response` (and
/// come back the same when the stored reply is sent again).
#[tokio::test]
async fn the_models_stop_reason_and_usage_reach_the_response() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| Reply::CutOff(pieces(&["I was about to say"]))).await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let records = records_for(&h, "tab", &["finish this"]).await;

    assert!(run(&state, records.clone()).await.is_empty());
    assert!(run(&state, records).await.is_empty(), "delivered again");
    let frames = h.api.frames_to("tab");
    let responses = of_type(&frames, "response");
    assert_eq!(responses.len(), 2);
    for response in responses {
        assert_eq!(response["stop_reason"], "length");
        assert_eq!(
            response["usage"],
            json!({ "input_tokens": 21, "output_tokens": 1 })
        );
    }
}

#[tokio::test]
async fn a_bedrock_model_outside_the_allow_list_is_refused_without_a_call() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let mut state = orchestrator(&h, &llm);
    let mut providers = agents(&llm);
    providers.bedrock = {
        let client = aws_sdk_bedrockruntime::Client::from_conf(
            aws_sdk_bedrockruntime::config::Builder::from(&crate::helpers::aws::sdk_config())
                .endpoint_url(&llm.endpoint)
                .build(),
        );
        Bedrock::new(client).allowing(vec!["amazon.nova-lite-v1:0".into()])
    };
    state.agents = Arc::new(providers);
    let allowed = conversation_with(&h, Provider::Bedrock, "amazon.nova-lite-v1:0").await;
    let costly = conversation_with_agent_model(&h, "anthropic.claude-opus-4-v1:0").await;
    h.open_session_on("allowed", allowed).await;
    h.open_session_on("costly", costly).await;

    for tab in ["allowed", "costly"] {
        let records = records_for(&h, tab, &["which model?"]).await;
        assert!(run(&state, records).await.is_empty(), "{tab}: not retried");
    }
    let called: Vec<String> = llm.bedrock_requests().into_iter().map(|(m, _)| m).collect();
    assert_eq!(called, ["amazon.nova-lite-v1:0"]);
    assert_eq!(replies(&h, allowed).await.len(), 1);
    let failed = replies(&h, costly).await;
    assert_eq!(failed.len(), 1, "its reply ends failed, empty");
    assert_eq!(failed[0].status, MessageStatus::Failed);
    let frames = h.api.frames_to("costly");
    assert_eq!(of_type(&frames, "error")[0]["code"], "agent_failed");
}

/// A second Bedrock conversation (the seeded user has one per agent).
async fn conversation_with_agent_model(h: &Harness, model: &str) -> ConversationId {
    let agent = seed_agent_with(&h.db, h.seed.tenant, "costly", Provider::Bedrock, model).await;
    crate::helpers::conversation_for(&h.db, h.seed.tenant, agent, h.seed.user).await
}

/// On the queue's last receive a transient failure is told; before it, never.
#[tokio::test]
async fn a_transient_failure_is_told_only_on_the_last_receive() {
    let h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| Reply::Status(503)).await;
    let mut state = orchestrator(&h, &llm);
    state.retry.max_attempts = 1;
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let record = records_for(&h, "tab", &["busy?"]).await.remove(0);

    for receive in 1..state.max_receives {
        assert_eq!(
            run(&state, vec![on_receive(record.clone(), receive)])
                .await
                .len(),
            1
        );
    }
    assert!(of_type(&h.api.frames_to("tab"), "error").is_empty());
    assert_eq!(
        run(&state, vec![on_receive(record, state.max_receives)])
            .await
            .len(),
        1,
        "still failed: the queue moves it to the dead-letter queue"
    );
    assert_eq!(of_type(&h.api.frames_to("tab"), "error").len(), 1);
}

/// The account's `@connections` quota reached: the management API answers 429
/// (`LimitExceededException`) to posts past 20 a second (burst 4) while a reply streams 20
/// pieces 25 ms apart to two tabs. Throttled posts are retried with backoff, so each tab gets
/// every chunk once, in order (each starting where the last ended), and one response.
#[tokio::test]
async fn throttled_posts_are_retried_so_every_tab_gets_every_chunk_once_in_order() {
    let h = Harness::new().await;
    let words: Vec<String> = (0..20).map(|i| format!("w{i} ")).collect();
    let script = words.clone();
    let llm =
        FakeLlm::start(move |_, _| Reply::Stream(script.clone(), Duration::from_millis(25))).await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab-a", conversation).await;
    h.open_session_on("tab-b", conversation).await;
    let records = records_for(&h, "tab-a", &["go"]).await;
    h.api.set_quota(20.0, 4.0);

    assert!(run(&state, records).await.is_empty());

    assert!(h.api.throttled() > 0, "the quota was reached");
    let stored = replies(&h, conversation).await;
    assert_eq!(stored[0].content, words.concat());
    for tab in ["tab-a", "tab-b"] {
        let frames = h.api.frames_to(tab);
        let mut held = 0;
        let mut text = String::new();
        for chunk in of_type(&frames, "chunk") {
            assert_eq!(
                chunk["offset"],
                json!(held),
                "{tab}: contiguous, none twice"
            );
            let delta = chunk["delta"].as_str().unwrap();
            held += delta.chars().count();
            text.push_str(delta);
        }
        assert_eq!(text, stored[0].content, "{tab}: every chunk");
        let responses = of_type(&frames, "response");
        assert_eq!(responses.len(), 1, "{tab}: one response");
        assert_eq!(responses[0]["text"], json!(stored[0].content));
    }
}

/// A chunk whose post fails after all its retries (the management API answers one tab's next
/// five posts 429) is carried by the next flush: the next chunk starts where that tab missed,
/// for both tabs, and each tab's text, assembled as the protocol says (an overlapping chunk
/// gives only its new part), is the whole reply, nothing twice.
#[tokio::test]
async fn a_chunk_whose_post_failed_is_carried_by_the_next_flush() {
    let h = Harness::new().await;
    let words: Vec<String> = (0..20).map(|i| format!("w{i} ")).collect();
    let script = words.clone();
    let llm =
        FakeLlm::start(move |_, _| Reply::Stream(script.clone(), Duration::from_millis(25))).await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab-a", conversation).await;
    h.open_session_on("tab-b", conversation).await;
    let records = records_for(&h, "tab-a", &["go"]).await;
    // Five attempts of the first chunk to tab-b: its post fails after its retries.
    h.api.refuse_next("tab-b", 5);

    assert!(run(&state, records).await.is_empty());

    assert_eq!(h.api.throttled(), 5);
    let stored = replies(&h, conversation).await;
    let reply = json!(stored[0].id);
    assert_eq!(stored[0].content, words.concat());
    for tab in ["tab-a", "tab-b"] {
        let frames = h.api.frames_to(tab);
        let chunks_only: Vec<Value> = frames
            .iter()
            .filter(|f| f["type"] == "chunk")
            .cloned()
            .collect();
        assert_eq!(
            assembled(&chunks_only, &reply),
            stored[0].content,
            "{tab}: the chunks alone give the whole reply"
        );
        assert_eq!(of_type(&frames, "response").len(), 1, "{tab}");
    }
    let tab_b = h.api.frames_to("tab-b");
    assert_eq!(
        of_type(&tab_b, "chunk")[0]["offset"],
        json!(0),
        "tab-b's first chunk starts where it missed"
    );
    let tab_a = h.api.frames_to("tab-a");
    let offsets: Vec<u64> = of_type(&tab_a, "chunk")
        .iter()
        .map(|c| c["offset"].as_u64().unwrap())
        .collect();
    assert!(
        offsets.windows(2).any(|w| w[1] <= w[0]),
        "tab-a got the carried text again, as an overlap it skips: {offsets:?}"
    );
}

/// A reply's `response` whose post fails after all its retries (one tab's next fifteen posts are
/// answered 429: the chunk's, perhaps a tail's, and the response's own) is posted to that tab
/// again seconds later, since no later flush carries it: each tab gets exactly one response,
/// with the whole reply.
#[tokio::test]
async fn a_response_whose_post_failed_is_posted_again() {
    let h = Harness::new().await;
    let llm =
        FakeLlm::start(|_, _| Reply::Stream(pieces(&["whole ", "reply"]), Duration::ZERO)).await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab-a", conversation).await;
    h.open_session_on("tab-b", conversation).await;
    let records = records_for(&h, "tab-a", &["go"]).await;
    h.api.refuse_next("tab-b", 15);

    assert!(run(&state, records).await.is_empty());

    assert_eq!(h.api.throttled(), 15, "every refusal was used");
    for tab in ["tab-a", "tab-b"] {
        let frames = h.api.frames_to(tab);
        let responses = of_type(&frames, "response");
        assert_eq!(responses.len(), 1, "{tab}: one response");
        assert_eq!(responses[0]["text"], json!("whole reply"), "{tab}");
    }
}

/// The posting budget: with this process's share at 10 posts a second, a reply streamed for
/// 2 s to two tabs (about 20 flushes, 40 posts, unmetered) never makes more than the budget
/// allows in any second (10 a second, 10 at once); once posts wait, its chunks coalesce to one
/// a second; each tab still gets the whole reply and one response.
#[tokio::test]
async fn posts_stay_within_the_budget_and_chunks_coalesce_under_it() {
    let h = Harness::new().await;
    let words: Vec<String> = (0..80).map(|i| format!("w{i} ")).collect();
    let script = words.clone();
    let llm =
        FakeLlm::start(move |_, _| Reply::Stream(script.clone(), Duration::from_millis(25))).await;
    let mut state = orchestrator(&h, &llm);
    state.retry.attempt_timeout = Duration::from_secs(30);
    let mut fanout = ConnectionsFanout::new(
        h.db.clone(),
        Arc::new(shared::delivery::ManagementApi::new(sdk_config())),
    );
    fanout.budget = Some(Arc::new(PostBudget::new(NonZeroU32::new(10).unwrap())));
    state.fanout = Arc::new(fanout);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab-a", conversation).await;
    h.open_session_on("tab-b", conversation).await;
    let records = records_for(&h, "tab-a", &["go"]).await;
    let before = h.api.posts().len();

    assert!(run(&state, records).await.is_empty());

    let posts = &h.api.posts()[before..];
    for (i, first) in posts.iter().enumerate() {
        let within = posts[i..]
            .iter()
            .take_while(|p| p.at.duration_since(first.at) < Duration::from_secs(1))
            .count();
        assert!(within <= 20, "{within} posts within a second of post {i}");
    }
    let stored = replies(&h, conversation).await;
    let reply = json!(stored[0].id);
    for tab in ["tab-a", "tab-b"] {
        let frames = h.api.frames_to(tab);
        assert_eq!(assembled(&frames, &reply), stored[0].content, "{tab}");
        assert_eq!(of_type(&frames, "response").len(), 1, "{tab}");
    }
    let chunks = of_type(&h.api.frames_to("tab-a"), "chunk").len();
    assert!(
        chunks <= 14,
        "about 20 flushes unmetered; under the budget they coalesced into {chunks}"
    );
}
