//! Branches (PROTOCOL §2 "Branches") through the route handlers, the orchestrator and the REST
//! API as the Lambdas run them: regenerate, edit, moving the head, what every tab is told, what
//! the agent sees, what a resuming tab and the history get, and the refusals.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use shared::db::agents::Provider;
use shared::db::messages::{MessageRole, MessageStatus};
use shared::domain::{ConversationId, MessageId, Role};

use crate::helpers::aws::drain;
use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, pieces};
use crate::helpers::orchestrator::{
    conversation_with, of_type, orchestrator, records_for, replies, run, stored, streaming_reply,
};
use crate::helpers::rest::{assert_error, call, history_uri};
use crate::helpers::streams::{assembled, slow_model};
use crate::helpers::token;

/// A model whose every reply names the request it answers: "reply 0", "reply 1", …
async fn numbered_model() -> FakeLlm {
    FakeLlm::start(|_, index| Reply::Stream(pieces(&[&format!("reply {index}")]), Duration::ZERO))
        .await
}

/// Routes a frame and runs the job it queued; returns the frame the route answered with, if any.
async fn route_and_answer(
    h: &Harness,
    state: &shared::orchestrator::OrchestratorState,
    connection: &str,
    frame: Value,
) -> Option<Value> {
    let answer = h.route(connection, &frame.to_string()).await;
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    assert!(run(state, records).await.is_empty());
    answer
}

fn bearer(h: &Harness) -> String {
    token(h.seed.user, Role::CustomerOperator)
}

async fn history(h: &Harness, conversation: ConversationId, query: &str) -> Vec<Value> {
    let response = call(
        &h.db,
        Method::GET,
        &history_uri(conversation, query),
        Some(&bearer(h)),
        None,
    )
    .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    response.body.as_array().unwrap().clone()
}

fn ids(items: &[Value]) -> Vec<Value> {
    items.iter().map(|m| m["id"].clone()).collect()
}

fn contents(items: &[Value]) -> Vec<&str> {
    items
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect()
}

/// The texts of the conversation the agent was given in its request, oldest first (the system
/// prompt left out).
fn context(request: &Value) -> Vec<String> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn regenerate_twice_keeps_three_replies_and_every_tab_follows_the_head() {
    let h = Harness::new().await;
    let llm = numbered_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    h.open_session_on("other", conversation).await;

    assert!(
        run(&state, records_for(&h, "tab", &["question"]).await)
            .await
            .is_empty()
    );
    let question = stored(&h, conversation).await[0].clone();
    let first = replies(&h, conversation).await.remove(0);
    assert_eq!(first.parent_id, Some(question.id));
    assert_eq!(
        question.reply_id,
        Some(first.id),
        "the reply took the id it was given"
    );

    let mut heads = Vec::new();
    for _ in 0..2 {
        let regenerate = json!({ "type": "regenerate", "reply_to": question.id });
        let before = h.api.frames_to("tab").len();
        let answer = route_and_answer(&h, &state, "tab", regenerate).await;
        assert_eq!(answer, None, "the sender is told by a post");
        // Posted before the job is queued: on the Lambda path a route's answer goes out after
        // the function returns, and the reply could come first.
        let posted = h.api.frames_to("tab").split_off(before);
        let kinds: Vec<_> = posted.iter().map(|f| f["type"].as_str().unwrap()).collect();
        assert_eq!(kinds[..2], ["typing", "head"], "{kinds:?}");
        assert_eq!(kinds.last(), Some(&"response"), "{kinds:?}");
        let head = posted[1].clone();
        assert_eq!(head["head_id"], json!(question.id));
        heads.push(head);
    }
    let all = replies(&h, conversation).await;
    assert_eq!(
        all.iter().map(|r| r.content.as_str()).collect::<Vec<_>>(),
        ["reply 0", "reply 1", "reply 2"],
        "every reply kept"
    );
    assert!(
        all.iter()
            .all(|r| r.reply_to == Some(question.id) && r.parent_id == Some(question.id))
    );
    for (head, reply) in heads.iter().zip(&all[1..]) {
        assert_eq!(
            head["reply_id"],
            json!(reply.id),
            "the head frame named the reply to come"
        );
    }
    // Each regenerate asked the agent with the same context: the question alone.
    let requests = llm.requests();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(context(request), ["question"]);
    }

    // The current branch is the newest reply; the history shows its siblings.
    let branch = history(&h, conversation, "").await;
    assert_eq!(contents(&branch), ["question", "reply 2"]);
    let siblings: Vec<Value> = all.iter().map(|r| json!(r.id)).collect();
    assert_eq!(branch[1]["siblings"], json!(siblings));
    assert_eq!(branch[1]["parent_id"], json!(question.id));

    // Switching back, over the socket and over REST: both tabs are told each time.
    let moved = h
        .route(
            "tab",
            &json!({ "type": "head", "message_id": all[0].id }).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(
        moved,
        json!({ "type": "head", "conversation_id": conversation, "head_id": all[0].id })
    );
    assert_eq!(
        contents(&history(&h, conversation, "").await),
        ["question", "reply 0"]
    );
    let response = call(
        &h.db,
        Method::PUT,
        &format!("/api/portal/chat/conversations/{conversation}/head"),
        Some(&bearer(&h)),
        Some(json!({ "message_id": all[1].id })),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert_eq!(response.body["head_id"], json!(all[1].id));
    assert_eq!(
        contents(&history(&h, conversation, "").await),
        ["question", "reply 1"]
    );
    let told: Vec<Value> = of_type(&h.api.frames_to("other"), "head")
        .into_iter()
        .map(|f| f["head_id"].clone())
        .collect();
    assert_eq!(
        told,
        [
            json!(question.id),
            json!(question.id),
            json!(all[0].id),
            json!(all[1].id)
        ],
        "the other tab followed every move"
    );
    let told_here = of_type(&h.api.frames_to("tab"), "head").len();
    assert_eq!(
        told_here, 3,
        "the sender's regenerates and REST's move by post, its head frame as the answer"
    );
    // Every reply reached both tabs whole.
    for tab in ["tab", "other"] {
        let frames = h.api.frames_to(tab);
        for reply in &all {
            assert_eq!(assembled(&frames, &json!(reply.id)), reply.content, "{tab}");
        }
    }
}

#[tokio::test]
async fn an_edit_answers_from_its_own_branch_and_keeps_the_original() {
    let h = Harness::new().await;
    let llm = numbered_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    h.open_session_on("other", conversation).await;
    for text in ["first", "second"] {
        assert!(
            run(&state, records_for(&h, "tab", &[text]).await)
                .await
                .is_empty()
        );
    }
    assert_eq!(context(&llm.requests()[1]), ["first", "reply 0", "second"]);
    let before = stored(&h, conversation).await;
    let first = before[0].clone();

    let client_message_id = uuid::Uuid::new_v4();
    let edit = json!({ "type": "edit", "message_id": first.id, "text": "first, better",
                       "client_message_id": client_message_id });
    let ack = route_and_answer(&h, &state, "tab", edit).await.unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["client_message_id"], json!(client_message_id));
    assert_eq!(ack["parent_id"], Value::Null, "beside the first message");
    assert_eq!(
        context(&llm.requests()[2]),
        ["first, better"],
        "the agent sees the new branch only"
    );

    // The original branch is all there; the current one is the edit and its reply.
    let all = history(&h, conversation, "?branch=all").await;
    assert_eq!(
        contents(&all),
        [
            "first",
            "reply 0",
            "second",
            "reply 1",
            "first, better",
            "reply 2"
        ]
    );
    let branch = history(&h, conversation, "").await;
    assert_eq!(contents(&branch), ["first, better", "reply 2"]);
    assert_eq!(branch[0]["siblings"], json!([first.id, ack["message_id"]]));
    // The other tab saw the message and was told the head moved.
    let frames = h.api.frames_to("other");
    assert_eq!(
        of_type(&frames, "message").last().unwrap()["content"],
        "first, better"
    );
    assert_eq!(
        of_type(&frames, "head").last().unwrap()["head_id"],
        ack["message_id"]
    );

    // Back to the original: the head lands on the newest message through it.
    let moved = h
        .route(
            "tab",
            &json!({ "type": "head", "message_id": first.id }).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(moved["head_id"], json!(before[3].id), "{moved}");
    assert_eq!(
        contents(&history(&h, conversation, "").await),
        ["first", "reply 0", "second", "reply 1"]
    );
    // A message sent now continues the original branch.
    assert!(
        run(&state, records_for(&h, "tab", &["third"]).await)
            .await
            .is_empty()
    );
    assert_eq!(
        context(llm.requests().last().unwrap()),
        ["first", "reply 0", "second", "reply 1", "third"]
    );
}

#[tokio::test]
async fn regenerate_while_the_first_reply_streams_stops_it_and_keeps_what_it_had() {
    let h = Harness::new().await;
    let llm = slow_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let records = records_for(&h, "tab", &["go on"]).await;
    let question = stored(&h, conversation).await[0].id;
    let regenerate = json!({ "type": "regenerate", "reply_to": question }).to_string();
    let job = run(&state, records);
    let asked = async {
        streaming_reply(&h, conversation).await;
        h.route("tab", &regenerate).await
    };
    let (failures, answer) = tokio::join!(job, asked);
    assert!(failures.is_empty());
    assert_eq!(answer, None, "the head is posted, not answered");
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    assert_eq!(records.len(), 1, "one job for the regenerate");
    assert!(run(&state, records).await.is_empty());

    let all = replies(&h, conversation).await;
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[0].status,
        MessageStatus::Cancelled,
        "stopped at its next flush"
    );
    assert!(
        !all[0].content.is_empty() && all[0].content.len() < 31,
        "{:?}",
        all[0].content
    );
    assert_eq!(all[1].status, MessageStatus::Complete);
    assert_eq!(all[1].content, "The answer comes in six pieces.");
    let frames = h.api.frames_to("tab");
    let responses = of_type(&frames, "response");
    assert_eq!(
        responses
            .iter()
            .map(|r| r["stop_reason"].clone())
            .collect::<Vec<_>>(),
        [json!("cancelled"), json!("end")]
    );
    assert_eq!(
        contents(&history(&h, conversation, "").await),
        ["go on", all[1].content.as_str()]
    );
}

#[tokio::test]
async fn a_regenerate_before_the_reply_started_supersedes_it_and_every_request_is_answered_once() {
    let h = Harness::new().await;
    let llm = numbered_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    // The first job has not run when the regenerate comes, and a second message follows.
    let mut records = records_for(&h, "tab", &["question"]).await;
    let question = stored(&h, conversation).await[0].clone();
    let answer = h
        .route(
            "tab",
            &json!({ "type": "regenerate", "reply_to": question.id }).to_string(),
        )
        .await;
    assert_eq!(answer, None);
    records.extend(drain(&h.queue).await.iter().map(|q| q.record()));
    let next = records_for(&h, "tab", &["next"]).await;
    // Delivered twice, as SQS may.
    records.extend(next.clone());
    assert!(run(&state, records.clone()).await.is_empty());
    assert!(run(&state, [records, next].concat()).await.is_empty());

    let all = replies(&h, conversation).await;
    assert_eq!(
        all.iter()
            .map(|r| (r.content.as_str(), r.status))
            .collect::<Vec<_>>(),
        [
            ("", MessageStatus::Cancelled),
            ("reply 0", MessageStatus::Complete),
            ("reply 1", MessageStatus::Complete),
        ],
        "the superseded request is stored never started; the agent was asked twice"
    );
    assert_eq!(llm.requests().len(), 2);
    assert_eq!(context(&llm.requests()[1]), ["question", "reply 0", "next"]);
    // The branch holds all four, in `seq` order as history always is ("next" was stored before
    // the reply it follows started); `parent_id` gives the path's order.
    let branch = history(&h, conversation, "").await;
    assert_eq!(
        contents(&branch),
        ["question", "next", "reply 0", "reply 1"]
    );
    assert_eq!(
        branch[1]["parent_id"], branch[2]["id"],
        "next follows reply 0"
    );
    assert_eq!(branch[2]["parent_id"], branch[0]["id"]);
}

#[tokio::test]
async fn a_tab_that_resumes_lands_on_the_current_branch_with_every_message_once() {
    let h = Harness::new().await;
    let llm = numbered_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    assert!(
        run(&state, records_for(&h, "tab", &["question"]).await)
            .await
            .is_empty()
    );
    let question = stored(&h, conversation).await[0].id;
    // A tab that saw the first exchange drops; meanwhile two regenerates and a switch back.
    let seen = stored(&h, conversation).await.last().unwrap().seq;
    for _ in 0..2 {
        route_and_answer(
            &h,
            &state,
            "tab",
            json!({ "type": "regenerate", "reply_to": question }),
        )
        .await;
    }
    let all = replies(&h, conversation).await;
    h.route(
        "tab",
        &json!({ "type": "head", "message_id": all[1].id }).to_string(),
    )
    .await
    .unwrap();

    h.connect_to("back", &conversation.to_string()).await;
    let frames = h
        .auth_with(
            "back",
            json!({ "type": "auth", "token": bearer(&h), "resume_after": seen }),
        )
        .await;
    assert!(frames.is_none(), "a resuming socket is answered by posts");
    let frames = h.api.frames_to("back");
    assert_eq!(frames[0]["type"], "auth_ok");
    assert_eq!(
        frames[0]["head_id"],
        json!(all[1].id),
        "the branch it lands on"
    );
    let replayed: Vec<&Value> = of_type(&frames, "replay")
        .iter()
        .flat_map(|r| r["messages"].as_array().unwrap())
        .collect();
    let replayed_ids: Vec<Value> = replayed.iter().map(|m| m["id"].clone()).collect();
    assert_eq!(
        replayed_ids,
        [json!(all[1].id), json!(all[2].id)],
        "each missed message once"
    );
    assert!(replayed.iter().all(|m| m["parent_id"] == json!(question)));
}

#[tokio::test]
async fn history_pages_walk_the_current_branch() {
    let h = Harness::new().await;
    let llm = numbered_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    for text in ["a", "b", "c"] {
        assert!(
            run(&state, records_for(&h, "tab", &[text]).await)
                .await
                .is_empty()
        );
    }
    let first = stored(&h, conversation).await[0].id;
    route_and_answer(
        &h,
        &state,
        "tab",
        json!({ "type": "edit", "message_id": first, "text": "a2" }),
    )
    .await;
    for text in ["d", "e"] {
        assert!(
            run(&state, records_for(&h, "tab", &[text]).await)
                .await
                .is_empty()
        );
    }
    // The branch: a2 r3 d r4 e r5; six messages off it.
    let newest = history(&h, conversation, "?limit=2").await;
    assert_eq!(contents(&newest), ["e", "reply 5"]);
    let before = newest[0]["id"].as_str().unwrap();
    let older = history(&h, conversation, &format!("?limit=3&before={before}")).await;
    assert_eq!(contents(&older), ["reply 3", "d", "reply 4"]);
    let before = older[0]["id"].as_str().unwrap();
    let oldest = history(&h, conversation, &format!("?limit=3&before={before}")).await;
    assert_eq!(contents(&oldest), ["a2"]);
    let seq = older[1]["seq"].as_i64().unwrap();
    let after = history(&h, conversation, &format!("?after_seq={seq}&limit=2")).await;
    assert_eq!(contents(&after), ["reply 4", "e"]);
    assert_eq!(
        history(&h, conversation, "?branch=all&limit=200")
            .await
            .len(),
        12
    );
    assert_eq!(
        ids(&history(&h, conversation, "?branch=current").await),
        ids(&history(&h, conversation, "").await)
    );
    let bad = call(
        &h.db,
        Method::GET,
        &history_uri(conversation, "?branch=sideways"),
        Some(&bearer(&h)),
        None,
    )
    .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn branch_frames_are_refused_as_the_contract_says() {
    let h = Harness::new().await;
    let llm = numbered_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.connect_to("anon", &conversation.to_string()).await;
    let nobody = MessageId::new();
    for frame in [
        json!({ "type": "regenerate", "reply_to": nobody }),
        json!({ "type": "edit", "message_id": nobody, "text": "x" }),
        json!({ "type": "head", "message_id": nobody }),
    ] {
        assert_eq!(
            h.send("anon", &frame.to_string()).await["code"],
            "unauthenticated",
            "{frame}"
        );
    }
    h.open_session_on("tab", conversation).await;
    assert!(
        run(&state, records_for(&h, "tab", &["question"]).await)
            .await
            .is_empty()
    );
    let question = stored(&h, conversation).await[0].clone();
    let reply = replies(&h, conversation).await.remove(0);
    let cmid = uuid::Uuid::new_v4();
    for (frame, code) in [
        (
            json!({ "type": "regenerate", "reply_to": nobody }),
            "not_found",
        ),
        (
            json!({ "type": "regenerate", "reply_to": reply.id }),
            "not_found",
        ),
        (
            json!({ "type": "regenerate", "reply_to": "not-a-uuid" }),
            "bad_request",
        ),
        (json!({ "type": "regenerate" }), "bad_request"),
        (
            json!({ "type": "edit", "message_id": nobody, "text": "x", "client_message_id": cmid }),
            "not_found",
        ),
        (
            json!({ "type": "edit", "message_id": reply.id, "text": "x", "client_message_id": cmid }),
            "not_found",
        ),
        (
            json!({ "type": "edit", "message_id": question.id, "text": "  ", "client_message_id": cmid }),
            "bad_request",
        ),
        (
            json!({ "type": "edit", "message_id": question.id, "text": "x".repeat(8001), "client_message_id": cmid }),
            "too_large",
        ),
        (json!({ "type": "head", "message_id": nobody }), "not_found"),
        (json!({ "type": "head" }), "bad_request"),
    ] {
        let refused = h.send("tab", &frame.to_string()).await;
        assert_eq!(refused["code"], code, "{frame} → {refused}");
        if frame["type"] == "edit" {
            assert_eq!(
                refused["client_message_id"],
                json!(cmid),
                "the refusal names the edit"
            );
        }
    }
    assert!(drain(&h.queue).await.is_empty(), "nothing queued");
    assert_eq!(stored(&h, conversation).await.len(), 2, "nothing stored");

    // Another user's message, or a message of another conversation, is not found here.
    let elsewhere = crate::helpers::orchestrator::conversation_with_named(&h, "elsewhere").await;
    h.open_session_on("far", elsewhere).await;
    assert!(
        run(&state, records_for(&h, "far", &["far away"]).await)
            .await
            .is_empty()
    );
    let far = stored(&h, elsewhere).await[0].id;
    for frame in [
        json!({ "type": "regenerate", "reply_to": far }),
        json!({ "type": "edit", "message_id": far, "text": "x" }),
        json!({ "type": "head", "message_id": far }),
    ] {
        assert_eq!(
            h.send("tab", &frame.to_string()).await["code"],
            "not_found",
            "{frame}"
        );
    }
    let put = |message: Value, token: Option<String>| {
        let db = h.db.clone();
        async move {
            call(
                &db,
                Method::PUT,
                &format!("/api/portal/chat/conversations/{conversation}/head"),
                token.as_deref(),
                Some(message),
            )
            .await
        }
    };
    assert_error(
        &put(json!({ "message_id": far }), Some(bearer(&h))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &put(json!({ "message_id": "x" }), Some(bearer(&h))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &put(json!({}), Some(bearer(&h))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &put(json!({ "message_id": question.id }), None).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
    let stranger = crate::helpers::seed_user(&h.db, "stranger").await;
    let theirs = token(stranger, Role::CustomerOperator);
    let refused = put(json!({ "message_id": question.id }), Some(theirs)).await;
    assert!(
        refused.status == StatusCode::FORBIDDEN || refused.status == StatusCode::NOT_FOUND,
        "{}",
        refused.body
    );
}

#[tokio::test]
async fn a_message_has_at_most_twenty_replies_and_versions() {
    let h = Harness::new().await;
    let conversation = {
        let llm = numbered_model().await;
        let _ = orchestrator(&h, &llm);
        conversation_with(&h, Provider::Openai, "gpt-test").await
    };
    h.open_session_on("tab", conversation).await;
    let ack = h
        .send(
            "tab",
            &json!({ "type": "message", "text": "q" }).to_string(),
        )
        .await;
    let question = ack["message_id"].clone();
    // Each regenerate before the reply started stores the one it supersedes.
    // One socket takes the message and nineteen regenerates (its rate limit is twenty frames
    // in ten seconds), a second the twentieth.
    h.open_session_on("tab2", conversation).await;
    let mut answers = Vec::new();
    for i in 0..20 {
        let tab = if i < 19 { "tab" } else { "tab2" };
        let regenerate = json!({ "type": "regenerate", "reply_to": question });
        answers.push(h.route(tab, &regenerate.to_string()).await);
    }
    assert!(answers[..19].iter().all(Option::is_none), "{answers:?}");
    assert_eq!(
        answers[19].as_ref().unwrap()["code"],
        "too_large",
        "{answers:?}"
    );
    let replies = stored(&h, conversation)
        .await
        .into_iter()
        .filter(|m| m.role == MessageRole::Assistant)
        .count();
    assert_eq!(replies, 19, "nineteen stored, the twentieth to come");
}

/// The frames a local socket gets up to and including the first of type `kind`.
async fn until(socket: &mut crate::helpers::local::Socket, kind: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = crate::helpers::local::next(socket, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no {kind} frame; got {frames:?}"));
        let done = frame["type"] == kind;
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

#[tokio::test]
async fn branches_on_the_local_runtime_keep_every_tab_and_a_resuming_one_in_step() {
    use crate::helpers::local::{Env, Local, authenticated, expect, open, send};
    let (test, db) = crate::helpers::TestDb::migrated().await;
    let s = crate::helpers::seed(&db, "acme").await;
    let llm = numbered_model().await;
    let conversation = crate::helpers::model_conversation(&db, &s).await;
    let local = Local::start_with_model(
        &Env::new(&test),
        &["serve", "--listen", "127.0.0.1:0"],
        &llm.base_url,
    )
    .await;
    let mut tab = authenticated(&local.address, &s, conversation).await;
    let mut other = authenticated(&local.address, &s, conversation).await;

    send(&mut tab, json!({ "type": "message", "text": "question" })).await;
    let first = until(&mut tab, "response").await.pop().unwrap();
    assert_eq!(first["text"], "reply 0");
    let question = first["reply_to"].clone();
    until(&mut other, "response").await;

    // Regenerate: the sender gets typing and the head, then the new reply; the other tab too.
    send(
        &mut tab,
        json!({ "type": "regenerate", "reply_to": question }),
    )
    .await;
    let frames = until(&mut tab, "response").await;
    let head = of_type(&frames, "head")[0].clone();
    assert_eq!(head["head_id"], question);
    let second = frames.last().unwrap().clone();
    assert_eq!(second["text"], "reply 1");
    assert_eq!(
        head["reply_id"], second["message_id"],
        "the reply took the id announced"
    );
    let seen = until(&mut other, "response").await;
    assert_eq!(of_type(&seen, "head")[0]["head_id"], question);

    // Back to the first reply, from the tab: the other tab is told.
    send(
        &mut tab,
        json!({ "type": "head", "message_id": first["message_id"] }),
    )
    .await;
    assert_eq!(
        expect(&mut tab, "head").await["head_id"],
        first["message_id"]
    );
    assert_eq!(
        expect(&mut other, "head").await["head_id"],
        first["message_id"]
    );

    // An edit: answered from its own branch; the other tab sees it and the head move.
    send(
        &mut tab,
        json!({ "type": "edit", "message_id": question, "text": "question, again" }),
    )
    .await;
    let frames = until(&mut tab, "response").await;
    let ack = of_type(&frames, "ack")[0].clone();
    assert_eq!(ack["parent_id"], Value::Null);
    assert_eq!(frames.last().unwrap()["text"], "reply 2");
    assert_eq!(context(llm.requests().last().unwrap()), ["question, again"]);
    let seen = until(&mut other, "response").await;
    assert_eq!(
        of_type(&seen, "message")[0]["message_id"],
        ack["message_id"]
    );
    assert_eq!(of_type(&seen, "head")[0]["head_id"], ack["message_id"]);

    // A tab that held nothing resumes: the whole tree once, and the branch it is on.
    let mut back = open(&local.address, conversation).await;
    send(
        &mut back,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator), "resume_after": 0 }),
    )
    .await;
    let ok = expect(&mut back, "auth_ok").await;
    let replay = expect(&mut back, "replay").await;
    let messages = replay["messages"].as_array().unwrap();
    assert_eq!(
        contents(messages),
        [
            "question",
            "reply 0",
            "reply 1",
            "question, again",
            "reply 2"
        ]
    );
    assert_eq!(ok["head_id"], messages[4]["id"], "on the edit's branch");
    assert_eq!(messages[4]["parent_id"], messages[3]["id"]);
    assert_eq!(messages[3]["parent_id"], Value::Null);
    assert_eq!(messages[1]["parent_id"], messages[0]["id"]);
    assert_eq!(messages[2]["parent_id"], messages[0]["id"]);
    local.stop().await;
}
