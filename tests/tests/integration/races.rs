//! Races and costly requests (PROTOCOL §2 "Costs and limits"): no transaction open across a
//! network call, so a socket gone mid-`auth` holds nothing; what is stored while a socket
//! catches up reaches it once; the caps on sockets and the per-user message limit hold under
//! concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use serde_json::{Value, json};
use shared::domain::Role;

use crate::helpers::harness::{Harness, message_frame};
use crate::helpers::llm::FakeLlm;
use crate::helpers::orchestrator::{of_type, orchestrator, records_for, run};
use crate::helpers::token;

/// Far more than any step here takes; only a hang reaches it.
const STALL: Duration = Duration::from_secs(20);

async fn before_stall<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STALL, future)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// A socket that closes before its replay is posted: `auth` finds it gone (410), forgets it,
/// and returns; the conversation is not held, so another tab's next message goes through.
/// (Once, `auth` posted under its transaction and the 410's delete waited for it: a deadlock
/// until the function timed out, and every writer of the conversation behind it.)
#[tokio::test]
async fn a_socket_gone_before_its_replay_holds_nothing() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let records = records_for(&h, "tab", &["one", "two"]).await;
    assert!(run(&state, records).await.is_empty());

    h.connect("gone").await;
    h.api.close("gone");
    let token = token(h.seed.user, Role::CustomerOperator);
    let answer = before_stall(
        "auth to a gone socket",
        h.auth_with(
            "gone",
            json!({ "type": "auth", "token": token, "resume_after": 0 }),
        ),
    )
    .await;
    assert_eq!(answer, None, "the frames were posted (and found gone)");
    assert!(
        h.connection("gone").await.is_none(),
        "forgotten when found gone"
    );

    let ack = before_stall(
        "the other tab's message",
        h.send("tab", &message_frame("three")),
    )
    .await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

/// A message stored while a socket is being sent its replay reaches that socket once, after
/// the replay: the writer leaves a socket that is catching up out, and `auth` reads what was
/// stored meanwhile before it makes the socket live.
#[tokio::test]
async fn a_message_stored_during_a_replay_reaches_the_socket_once_after_it() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    h.open_session("tab").await;
    let records = records_for(&h, "tab", &["one"]).await;
    assert!(run(&state, records).await.is_empty());

    h.connect("back").await;
    // As the first frame to "back" (its auth_ok) arrives, the other tab sends a message.
    let fired = Arc::new(AtomicBool::new(false));
    let (routes, sent) = (h.state.clone(), Arc::new(std::sync::Mutex::new(None)));
    {
        let (fired, sent) = (fired.clone(), sent.clone());
        h.api.probe_with(move || {
            let (fired, routes, sent) = (fired.clone(), routes.clone(), sent.clone());
            async move {
                if !fired.swap(true, Ordering::SeqCst) {
                    let body = message_frame("meanwhile");
                    let response = shared::ws::Route::Message
                        .handle(
                            &routes,
                            crate::helpers::harness::event(
                                "tab",
                                "message",
                                Some(&body),
                                json!(null),
                            ),
                        )
                        .await;
                    *sent.lock().unwrap() = crate::helpers::harness::frame_of(&response);
                }
                Value::Null
            }
            .boxed()
        });
    }
    let token = token(h.seed.user, Role::CustomerOperator);
    let answer = before_stall(
        "auth while another tab writes",
        h.auth_with(
            "back",
            json!({ "type": "auth", "token": token, "resume_after": 0 }),
        ),
    )
    .await;
    assert_eq!(answer, None);
    let ack = sent
        .lock()
        .unwrap()
        .clone()
        .expect("the other tab's message was sent");
    assert_eq!(ack["type"], "ack", "{ack}");

    let frames = h.api.frames_to("back");
    assert_eq!(frames[0]["type"], "auth_ok");
    assert_eq!(frames[1]["type"], "replay");
    let carrying: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            f["message_id"] == ack["message_id"]
                || f["messages"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["id"] == ack["message_id"]))
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(carrying.len(), 1, "once: {frames:?}");
    assert!(carrying[0] >= 1, "after auth_ok: {frames:?}");
    let seqs: Vec<i64> = of_type(&frames, "replay")
        .iter()
        .flat_map(|r| r["messages"].as_array().unwrap().clone())
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in seq order: {seqs:?}"
    );
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "every one"
    );

    // Live from then on.
    let ack = h.send("tab", &message_frame("later")).await;
    let live = h.api.frames_to("back");
    assert_eq!(live.last().unwrap()["message_id"], ack["message_id"]);
}

/// 50 sockets of one user authenticate at once with a cap of 5: exactly 5 are bound.
#[tokio::test]
async fn concurrent_binds_of_one_user_stop_at_the_cap() {
    let mut h = Harness::new().await;
    h.state.auth.caps.per_user = 5;
    let h = Arc::new(h);
    let sockets: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    for socket in &sockets {
        h.connect(socket).await;
    }
    let token = token(h.seed.user, Role::CustomerOperator);
    let binds = sockets.iter().map(|socket| {
        let (h, token, socket) = (h.clone(), token.clone(), socket.clone());
        tokio::spawn(async move { h.auth(&socket, &token).await })
    });
    let answers = before_stall("50 binds", futures::future::join_all(binds)).await;
    let bound = answers
        .into_iter()
        .filter(|a| {
            a.as_ref()
                .unwrap()
                .as_ref()
                .is_some_and(|a| a["type"] == "auth_ok")
        })
        .count();
    assert_eq!(bound, 5);
    let refused = sockets
        .iter()
        .filter(|s| {
            h.api
                .frames_to(s)
                .iter()
                .any(|f| f["type"] == "error" && f["code"] == "rate_limited")
        })
        .count();
    assert_eq!(refused, 45);
}

/// 100 messages at once over 5 sockets of one user, with a per-user limit of 20: exactly 20
/// are accepted.
#[tokio::test]
async fn concurrent_messages_of_one_user_stop_at_the_limit() {
    let mut h = Harness::new().await;
    h.state.message.limits.user.messages = 20;
    h.state.message.limits.connection.messages = 1000;
    let h = Arc::new(h);
    let sockets: Vec<String> = (0..5).map(|i| format!("tab{i}")).collect();
    for socket in &sockets {
        h.open_session(socket).await;
    }
    let sends = (0..100).map(|i| {
        let (h, socket) = (h.clone(), sockets[i % 5].clone());
        tokio::spawn(async move { h.send(&socket, &message_frame(&format!("m{i}"))).await })
    });
    let answers = before_stall("100 messages", futures::future::join_all(sends)).await;
    let kinds: Vec<String> = answers
        .iter()
        .map(|a| a.as_ref().unwrap()["type"].as_str().unwrap().to_owned())
        .collect();
    let acked = kinds.iter().filter(|k| *k == "ack").count();
    assert_eq!(acked, 20, "{kinds:?}");
    assert_eq!(h.stored_messages().await, 20);
}

/// A message just under a client frame's 32 KiB once escaped (5,420 × U+0001, each sent as
/// `\u0001`, and a `client_message_id`) would make a `message` frame over 32 KiB for the other tabs: it is announced
/// without its text, which they read by `seq`, and no frame posted is over the limit.
#[tokio::test]
async fn a_message_too_long_for_the_other_tabs_frame_is_announced_without_its_text() {
    let h = Harness::new().await;
    h.open_session("writer").await;
    h.open_session("reader").await;
    let text = "\u{1}".repeat(5_420);
    let body = json!({
        "type": "message", "text": text, "client_message_id": uuid::Uuid::new_v4(),
    })
    .to_string();
    assert!(
        body.len() < 32 * 1024,
        "the client's frame fits: {}",
        body.len()
    );
    let ack = h.send("writer", &body).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let shown = h.api.frames_to("reader");
    let shown = shown.last().unwrap();
    assert_eq!(shown["type"], "message");
    assert_eq!(shown["message_id"], ack["message_id"]);
    assert_eq!(shown["seq"], ack["seq"]);
    assert!(shown.get("content").is_none(), "no text");
    for post in h.api.posts() {
        assert!(post.frame.to_string().len() <= 32 * 1024);
    }
}

/// Two tabs' messages stored as `seq` 1 and 2 whose jobs were queued 2 then 1 (two `message`
/// invocations racing): the orchestrator answers 1 first, then 2 with 1's reply in its
/// context; the job for 1, arriving last, stores nothing new.
#[tokio::test]
async fn jobs_queued_out_of_order_are_answered_in_seq_order() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let conversation = crate::helpers::orchestrator::conversation_with(
        &h,
        shared::db::agents::Provider::Openai,
        "gpt-test",
    )
    .await;
    h.open_session_on("tab", conversation).await;
    let mut records = records_for(&h, "tab", &["first", "second"]).await;
    let first = records.remove(0);
    assert!(run(&state, records).await.is_empty(), "the second's job");
    assert!(
        run(&state, vec![first]).await.is_empty(),
        "the first's job, last"
    );

    let asked: Vec<String> = llm
        .requests()
        .iter()
        .map(|r| {
            let messages = r["messages"].as_array().unwrap();
            messages.last().unwrap()["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(asked, ["first", "second"], "asked in seq order, once each");
    let second_context = llm.requests()[1]["messages"].to_string();
    assert!(
        second_context.contains("Hello world"),
        "the first reply is in the second's context"
    );
    let stored = crate::helpers::orchestrator::stored(&h, conversation).await;
    let order: Vec<(String, String)> = stored
        .iter()
        .map(|m| (format!("{:?}", m.role), m.content.clone()))
        .collect();
    assert_eq!(
        order,
        [
            ("User".into(), "first".into()),
            ("User".into(), "second".into()),
            ("Assistant".into(), "Hello world".into()),
            ("Assistant".into(), "Hello world".into()),
        ]
    );
    let replies = crate::helpers::orchestrator::replies(&h, conversation).await;
    assert_eq!(
        replies[0].reply_to,
        Some(stored[0].id),
        "the first answered first"
    );
    assert_eq!(replies[1].reply_to, Some(stored[1].id));
}

/// A reply whose producer died with no retry to follow stays `streaming` no longer than the
/// sweeper allows: unwritten past `REPLY_STALE_SECONDS`, it ends `failed` with its text, and
/// the conversation's sockets get its `response`. One still being written is left alone.
#[tokio::test]
async fn a_reply_whose_producer_is_gone_ends_failed_and_the_sockets_are_told() {
    use shared::db::message_path::{self, ReplyWrite};
    use shared::db::messages::MessageStatus;
    use shared::db::{Scope, conversations};
    use shared::domain::MessageId;

    let h = Harness::new().await;
    h.open_session("tab").await;
    let mut asked = Vec::new();
    for text in ["orphaned", "alive"] {
        let ack = h.send("tab", &message_frame(text)).await;
        asked.push(serde_json::from_value::<MessageId>(ack["message_id"].clone()).unwrap());
    }
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    let conversation = conversations::find(&mut tx, h.seed.conversation)
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();
    let mut written = Vec::new();
    for (reply_to, text) in asked.iter().zip(["half a sen", "still going"]) {
        let stored = message_path::write_reply(
            &h.db,
            &conversation,
            ReplyWrite {
                id: MessageId::new(),
                reply_to: *reply_to,
                producer: uuid::Uuid::new_v4(),
                text,
                status: MessageStatus::Streaming,
                stop: None,
                usage: None,
            },
        )
        .await
        .unwrap();
        written.push(stored.reply.id);
    }
    // The first one's producer last wrote ten minutes ago.
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    sqlx::query(
        "update web_conversation_messages set written_at = now() - interval '10 minutes'
         where id = $1",
    )
    .bind(written[0])
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let ended = shared::ws::sweep::end_stale_replies(h.state.edge(), Duration::from_secs(360))
        .await
        .unwrap();
    assert_eq!(ended, 1);
    let stored = crate::helpers::orchestrator::stored(&h, h.seed.conversation).await;
    let orphan = stored.iter().find(|m| m.id == written[0]).unwrap();
    assert_eq!(orphan.status, MessageStatus::Failed);
    assert_eq!(orphan.content, "half a sen", "what it had is kept");
    let alive = stored.iter().find(|m| m.id == written[1]).unwrap();
    assert_eq!(
        alive.status,
        MessageStatus::Streaming,
        "a live producer's is left alone"
    );
    let frames = h.api.frames_to("tab");
    let response = frames.last().unwrap();
    assert_eq!(response["type"], "response");
    assert_eq!(response["message_id"], json!(written[0]));
    assert_eq!(response["stop_reason"], "error");
    assert_eq!(
        shared::ws::sweep::end_stale_replies(h.state.edge(), Duration::from_secs(360))
            .await
            .unwrap(),
        0,
        "once"
    );
}

/// `auth` frames count as messages do: on one socket against the connection's window, and
/// across a user's sockets against the user's window; past either, `rate_limited` and the
/// socket is closed.
#[tokio::test]
async fn auth_frames_count_against_the_connection_and_user_limits() {
    let mut h = Harness::new().await;
    h.state.auth.limits.connection.messages = 3;
    h.state.auth.limits.user.messages = 5;
    let token = token(h.seed.user, Role::CustomerOperator);
    h.connect("renewer").await;
    for n in 1..=3 {
        let ok = h.auth("renewer", &token).await;
        assert_eq!(ok.unwrap()["type"], "auth_ok", "auth {n} on one socket");
    }
    assert_eq!(
        h.auth("renewer", &token).await,
        None,
        "the fourth is refused"
    );
    let refused = h.api.frames_to("renewer");
    assert_eq!(refused.last().unwrap()["code"], "rate_limited");
    assert!(
        h.api.deletes().contains(&"renewer".to_owned()),
        "and the socket closed"
    );

    // Three frames bound (a refused one binds nothing, and the socket is closed): two more
    // sockets may authenticate, not three.
    for socket in ["fourth", "fifth"] {
        h.connect(socket).await;
        assert_eq!(h.auth(socket, &token).await.unwrap()["type"], "auth_ok");
    }
    h.connect("sixth").await;
    assert_eq!(h.auth("sixth", &token).await, None);
    assert_eq!(
        h.api.frames_to("sixth").last().unwrap()["code"],
        "rate_limited"
    );
}

/// A refused `message` frame's `error` carries its `client_message_id` (PROTOCOL §2), so the
/// client knows which pending message was refused, whatever the refusal: bad text, a rate
/// limit. A frame without one gets an error without one.
#[tokio::test]
async fn a_refusal_names_the_message_it_refuses() {
    let mut h = Harness::new().await;
    h.state.message.limits.connection.messages = 1;
    h.open_session("tab").await;
    let id = uuid::Uuid::new_v4().to_string();
    let empty = json!({ "type": "message", "text": "   ", "client_message_id": id });
    let refused = h.send("tab", &empty.to_string()).await;
    assert_eq!(refused["code"], "bad_request");
    assert_eq!(refused["client_message_id"], json!(id));

    let first =
        json!({ "type": "message", "text": "one", "client_message_id": uuid::Uuid::new_v4() });
    assert_eq!(h.send("tab", &first.to_string()).await["type"], "ack");
    let id = uuid::Uuid::new_v4().to_string();
    let second = json!({ "type": "message", "text": "two", "client_message_id": id });
    let refused = h.send("tab", &second.to_string()).await;
    assert_eq!(refused["code"], "rate_limited");
    assert_eq!(refused["client_message_id"], json!(id));

    let anonymous = h.send("tab", &message_frame("three")).await;
    assert_eq!(anonymous["code"], "rate_limited");
    assert!(anonymous.get("client_message_id").is_none());
}
