//! Resume and durable streams (PROTOCOL §2 "Resume", invariant 7) through the AWS route
//! handlers and the orchestrator: `seq`, `replay`, the text so far of a reply in progress, a
//! reply that outlives the attempt producing it, several tabs in step, and `cancel`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use shared::db::agents::Provider;
use shared::db::messages::{self, MessageRole, MessageStatus, PageFrom};
use shared::db::{Scope, conversations};
use shared::domain::{MessageText, PageLimit, Role};

use crate::helpers::token;
use crate::llm::{FakeLlm, Reply, pieces};
use crate::orchestrator::{
    conversation_with, of_type, orchestrator, records_for, replies, run, stored,
};
use crate::ws::Harness;

/// The text a client following the protocol holds after these frames: a chunk is applied when
/// its offset is the length held (`reset` starts over), a `response` with text replaces it.
fn assembled(frames: &[Value], message: &Value) -> String {
    let mut text: Vec<char> = Vec::new();
    for frame in frames.iter().filter(|f| f["message_id"] == *message) {
        match frame["type"].as_str() {
            Some("chunk") => {
                if frame["reset"] == true {
                    text.clear();
                }
                if frame["offset"].as_u64() == Some(text.len() as u64) {
                    text.extend(frame["delta"].as_str().unwrap().chars());
                }
            }
            Some("response") => {
                if let Some(whole) = frame["text"].as_str() {
                    text = whole.chars().collect();
                }
            }
            _ => {}
        }
    }
    text.into_iter().collect()
}

#[tokio::test]
async fn seq_is_strictly_increasing_and_gap_free_under_concurrent_writers() {
    let h = Arc::new(Harness::new().await);
    let llm = FakeLlm::hello().await;
    let state = Arc::new(orchestrator(&h, &llm));
    let tabs = ["a", "b", "c", "d"];
    for tab in tabs {
        h.open_session(tab).await;
    }
    // Four tabs send at once while the orchestrator answers what is queued.
    let senders = tabs.map(|tab| {
        let h = h.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..12 {
                let ack = h
                    .send(
                        tab,
                        &json!({ "type": "message", "text": format!("{tab}{i}") }).to_string(),
                    )
                    .await;
                assert_eq!(ack["type"], "ack", "{ack}");
                acked.push(ack["seq"].as_i64().unwrap());
            }
            acked
        })
    });
    let answering = {
        let (h, state) = (h.clone(), state.clone());
        tokio::spawn(async move {
            for _ in 0..20 {
                let records = crate::aws::drain(&h.queue).await;
                let records = records.iter().map(crate::aws::Queued::record).collect();
                assert!(run(&state, records).await.is_empty());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.unwrap());
    }
    answering.await.unwrap();
    let records = crate::aws::drain(&h.queue).await;
    let records = records.iter().map(crate::aws::Queued::record).collect();
    assert!(run(&state, records).await.is_empty());

    let all = stored(&h, h.seed.conversation).await;
    assert_eq!(all.len(), 96, "48 messages and their replies");
    let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=96).collect::<Vec<i64>>(),
        "1, 2, 3, … without a gap"
    );
    let users: HashSet<i64> = all
        .iter()
        .filter(|m| m.role == MessageRole::User)
        .map(|m| m.seq)
        .collect();
    assert_eq!(
        users,
        acked.into_iter().collect(),
        "each ack carried its message's seq"
    );
    for reply in all.iter().filter(|m| m.role == MessageRole::Assistant) {
        let question = all.iter().find(|m| Some(m.id) == reply.reply_to).unwrap();
        assert!(reply.seq > question.seq, "a reply comes after its question");
    }
}

#[tokio::test]
async fn a_resuming_socket_gets_what_it_missed_then_live_frames() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let records = records_for(&h, "tab", &["one", "two", "three"]).await;
    assert!(run(&state, records).await.is_empty());

    h.connect("back").await;
    let token = token(h.seed.user, Role::CustomerOperator);
    let answer = h
        .auth_with(
            "back",
            json!({ "type": "auth", "token": token, "resume_after": 2 }),
        )
        .await;
    assert_eq!(answer, None, "auth_ok and the replay are posted, in order");
    let frames = h.api.frames_to("back");
    assert_eq!(frames[0]["type"], "auth_ok");
    assert_eq!(frames[0]["last_seq"], 6);
    assert_eq!(frames[1]["type"], "replay");
    assert_eq!(frames[1]["recovered"], true);
    assert_eq!(frames[1]["more"], false);
    let replayed: Vec<(i64, String, String)> = frames[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_i64().unwrap(),
                m["content"].as_str().unwrap().to_owned(),
                m["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The three messages were stored before their replies: seq 3 is "three", 4..6 the replies.
    let all = stored(&h, h.seed.conversation).await;
    let after: Vec<(i64, String, String)> = all
        .iter()
        .filter(|m| m.seq > 2)
        .map(|m| (m.seq, m.content.clone(), "complete".to_owned()))
        .collect();
    assert_eq!(replayed, after);
    assert_eq!(replayed.len(), 4);
    assert_eq!(replayed[0].1, "three");
    assert_eq!(frames.len(), 2);

    // Then live: another tab's message and its reply.
    let records = records_for(&h, "tab", &["four"]).await;
    assert!(run(&state, records).await.is_empty());
    let live = &h.api.frames_to("back")[2..];
    assert_eq!(live[0]["type"], "message");
    assert_eq!(live[0]["content"], "four");
    assert_eq!(live[1]["type"], "response");
    assert_eq!(live[1]["text"], "Echo: four");
    assert!(live[1]["seq"].as_i64() > live[0]["seq"].as_i64());
}

#[tokio::test]
async fn too_much_missed_is_not_recovered_and_a_long_replay_is_split_into_frames() {
    let h = Harness::new().await;
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    let conversation = conversations::find(&mut tx, h.seed.conversation)
        .await
        .unwrap()
        .unwrap();
    let text = MessageText::parse(&"a rather long message ".repeat(15)).unwrap();
    for _ in 0..501 {
        messages::insert_user(&mut tx, &conversation, &text, None)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let token = token(h.seed.user, Role::CustomerOperator);

    h.connect("far").await;
    h.auth_with(
        "far",
        json!({ "type": "auth", "token": token, "resume_after": 0 }),
    )
    .await;
    let frames = h.api.frames_to("far");
    assert_eq!(frames[1]["type"], "replay");
    assert_eq!(frames[1]["recovered"], false, "501 missed: reload instead");
    assert_eq!(frames[1]["messages"], json!([]));

    h.connect("near").await;
    h.auth_with(
        "near",
        json!({ "type": "auth", "token": token, "resume_after": 1 }),
    )
    .await;
    let frames = h.api.frames_to("near");
    let replays = of_type(&frames, "replay");
    assert!(replays.len() > 3, "{} frames", replays.len());
    let mut seqs = Vec::new();
    for (i, replay) in replays.iter().enumerate() {
        assert!(
            replay.to_string().len() <= 32 * 1024,
            "within API Gateway's frame"
        );
        assert_eq!(replay["recovered"], true);
        assert_eq!(
            replay["more"],
            i + 1 < replays.len(),
            "more on all but the last"
        );
        seqs.extend(
            replay["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["seq"].as_i64().unwrap()),
        );
    }
    assert_eq!(seqs, (2..=501).collect::<Vec<i64>>());
}

/// A model streaming six pieces 150 ms apart.
async fn slow_model() -> FakeLlm {
    FakeLlm::start(|_, _| {
        Reply::Stream(
            pieces(&["The ", "answer ", "comes ", "in ", "six ", "pieces."]),
            Duration::from_millis(150),
        )
    })
    .await
}

#[tokio::test]
async fn a_tab_joining_mid_stream_gets_the_text_so_far_then_the_tail() {
    let h = Harness::new().await;
    let llm = slow_model().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("first", conversation).await;
    let records = records_for(&h, "first", &["tell me"]).await;

    let job = run(&state, records);
    let join_late = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let streaming = stored(&h, conversation).await;
        let reply = streaming.last().unwrap().clone();
        assert_eq!(
            reply.status,
            MessageStatus::Streaming,
            "stored as it streams"
        );
        assert!(!reply.content.is_empty());
        h.open_session_on("late", conversation).await;
        reply
    };
    let (failures, partial) = tokio::join!(job, join_late);
    assert!(failures.is_empty());

    let reply = replies(&h, conversation).await.remove(0);
    assert_eq!(reply.content, "The answer comes in six pieces.");
    assert_eq!(reply.status, MessageStatus::Complete);
    let late = h.api.frames_to("late");
    assert_eq!(late[0]["type"], "auth_ok", "{late:?}");
    let first_chunk = &late[1];
    assert_eq!(first_chunk["type"], "chunk");
    assert_eq!(first_chunk["offset"], 0);
    assert!(
        first_chunk["delta"]
            .as_str()
            .unwrap()
            .starts_with(&partial.content),
        "the text so far"
    );
    let id = json!(reply.id);
    assert_eq!(assembled(&late, &id), reply.content);
    // No text twice: the chunks after the first continue where it ended.
    let mut expected_offset = 0;
    for chunk in of_type(&late, "chunk") {
        assert_eq!(chunk["offset"], expected_offset, "{late:?}");
        expected_offset += chunk["delta"].as_str().unwrap().chars().count();
    }
    assert_eq!(assembled(&h.api.frames_to("first"), &id), reply.content);
}

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
        tokio::time::sleep(Duration::from_millis(350)).await;
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

/// A reply stored while a socket resumes reaches it exactly once: in the replay, or live.
#[tokio::test]
async fn a_reply_stored_while_a_socket_resumes_reaches_it_exactly_once() {
    let mut h = Harness::new().await;
    h.state.message.limits.connection.messages = 1000;
    h.state.message.limits.user.messages = 1000;
    // A socket per round, none closed.
    h.state.auth.caps.per_user = 1000;
    h.state.auth.caps.per_conversation = 1000;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let token = token(h.seed.user, Role::CustomerOperator);
    for round in 0..25 {
        let records = records_for(&h, "tab", &["race"]).await;
        let before = stored(&h, h.seed.conversation).await.last().unwrap().seq;
        let socket = format!("racer-{round}");
        h.connect(&socket).await;
        let resume = json!({ "type": "auth", "token": token, "resume_after": before });
        let delay = Duration::from_micros(300 * (round % 8));
        let (failures, _) = tokio::join!(run(&state, records), async {
            tokio::time::sleep(delay).await;
            h.auth_with(&socket, resume.clone()).await
        });
        assert!(failures.is_empty());
        let reply = replies(&h, h.seed.conversation).await.pop().unwrap();
        let frames = h.api.frames_to(&socket);
        let replayed = of_type(&frames, "replay")
            .iter()
            .flat_map(|r| r["messages"].as_array().unwrap().clone())
            .filter(|m| m["id"] == json!(reply.id))
            .count();
        let live = of_type(&frames, "response")
            .iter()
            .filter(|r| r["message_id"] == json!(reply.id))
            .count();
        assert_eq!(replayed + live, 1, "round {round}: {frames:?}");
    }
}

/// A worker process killed (SIGKILL) while a reply streams: the next worker takes the reply
/// over, the socket is told `reset`, and the conversation ends with the whole reply once.
#[tokio::test]
async fn a_worker_killed_mid_stream_leaves_a_reply_the_next_worker_restarts() {
    use crate::helpers::{TestDb, seed};
    use crate::local::{Env, authenticated, next, send};

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
        PageFrom::Newest,
        PageLimit::default(),
    )
    .await
    .unwrap();
    let replies: Vec<_> = stored
        .iter()
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
