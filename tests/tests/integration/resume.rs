//! Resume and durable streams (PROTOCOL §2 "Resume", invariant 7) through the AWS route
//! handlers and the orchestrator: `seq`, `replay`, the text so far of a reply in progress, a
//! reply that outlives the attempt producing it, several tabs in step, and `cancel`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shared::db::agents::Provider;
use shared::db::messages::{MessageRole, MessageStatus};
use shared::db::{Scope, conversations};
use shared::domain::{MessageText, Role};

use crate::helpers::harness::Harness;
use crate::helpers::llm::FakeLlm;
use crate::helpers::orchestrator::{
    conversation_with, of_type, orchestrator, records_for, replies, run, stored, streaming_reply,
};
use crate::helpers::streams::{assembled, slow_model};
use crate::helpers::token;

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
                let records = crate::helpers::aws::drain(&h.queue).await;
                let records = records
                    .iter()
                    .map(crate::helpers::aws::Queued::record)
                    .collect();
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
    let records = crate::helpers::aws::drain(&h.queue).await;
    let records = records
        .iter()
        .map(crate::helpers::aws::Queued::record)
        .collect();
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

/// A message sent just before a drop is matched to its pending bubble by `client_message_id`:
/// the replay carries it, as the history does.
#[tokio::test]
async fn a_replayed_message_carries_its_client_message_id() {
    let h = Harness::new().await;
    h.open_session("tab").await;
    let id = uuid::Uuid::new_v4().to_string();
    let ack = h
        .send(
            "tab",
            &json!({ "type": "message", "text": "just before the drop", "client_message_id": id })
                .to_string(),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    h.connect("back").await;
    let token = token(h.seed.user, Role::CustomerOperator);
    h.auth_with(
        "back",
        json!({ "type": "auth", "token": token, "resume_after": 0 }),
    )
    .await;
    let frames = h.api.frames_to("back");
    assert_eq!(frames[1]["type"], "replay");
    let replayed = &frames[1]["messages"][0];
    assert_eq!(replayed["content"], "just before the drop");
    assert_eq!(replayed["client_message_id"], id);
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
        tests::stack::store_history(&mut tx, &conversation, &text)
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
        // Stored as it streams.
        let reply = streaming_reply(&h, conversation).await;
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
