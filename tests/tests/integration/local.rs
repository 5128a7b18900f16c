//! The local runtime end to end: `konstruct-local` started as a real process, real WebSocket
//! clients, real Postgres and Redis.

use std::time::Duration;

use serde_json::json;
use shared::db::agents::Provider;
use shared::db::{Db, Scope, conversations};
use shared::domain::{ConversationId, Role};

use crate::helpers::local::{
    Env, Local, OwnRedis, authenticated, converse, expect, http_get, next, open, send,
};
use crate::helpers::seed::owner;
use crate::helpers::{Seed, TestDb, seed, seed_agent_with, token};

#[tokio::test]
async fn connect_auth_message_gives_typing_ack_response_and_history() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let mut socket = open(&local.address, s.conversation).await;
    send(
        &mut socket,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    let ok = expect(&mut socket, "auth_ok").await;
    assert_eq!(ok["conversation_id"], json!(s.conversation));

    send(&mut socket, json!({ "type": "message", "text": "hello local", "client_message_id": uuid::Uuid::new_v4() })).await;
    expect(&mut socket, "typing").await;
    let ack = expect(&mut socket, "ack").await;
    let response = expect(&mut socket, "response").await;
    assert_eq!(response["text"], "Echo: hello local");
    assert_eq!(response["reply_to"], ack["message_id"]);

    let history = http_get(
        &local.address,
        &format!("/api/portal/chat/conversations/{}/messages", s.conversation),
        &token(s.user, Role::CustomerOperator),
    )
    .await;
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(
        (history[0]["role"].as_str(), history[0]["content"].as_str()),
        (Some("user"), Some("hello local"))
    );
    assert_eq!(history[1]["content"], "Echo: hello local");

    // Pings are answered, unknown frames get an error, and the socket stays open.
    send(&mut socket, json!({ "type": "ping" })).await;
    expect(&mut socket, "pong").await;
    send(&mut socket, json!({ "type": "shout" })).await;
    assert_eq!(expect(&mut socket, "error").await["code"], "bad_request");
    send(&mut socket, json!({ "type": "ping" })).await;
    expect(&mut socket, "pong").await;
    local.stop().await;
}

#[tokio::test]
async fn both_tabs_get_the_reply_and_another_conversation_gets_nothing() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let other_agent = seed_agent_with(&db, s.tenant, "other", Provider::Echo, "").await;
    let other = other_conversation(&db, &s, other_agent).await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let mut tab1 = authenticated(&local.address, &s, s.conversation).await;
    let mut tab2 = authenticated(&local.address, &s, s.conversation).await;
    let mut elsewhere = authenticated(&local.address, &s, other).await;

    send(&mut tab1, json!({ "type": "message", "text": "to both" })).await;
    expect(&mut tab1, "typing").await;
    expect(&mut tab1, "ack").await;
    assert_eq!(expect(&mut tab1, "response").await["text"], "Echo: to both");
    let shown = expect(&mut tab2, "message").await;
    assert_eq!(
        (shown["content"].as_str(), shown["role"].as_str()),
        (Some("to both"), Some("user")),
        "the other tab shows the message: {shown}"
    );
    assert_eq!(expect(&mut tab2, "response").await["text"], "Echo: to both");
    assert_eq!(next(&mut elsewhere, Duration::from_millis(700)).await, None);
    local.stop().await;
}

async fn other_conversation(db: &Db, s: &Seed, agent: shared::domain::AgentId) -> ConversationId {
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let id = conversations::get_or_create(&mut tx, s.tenant, agent, s.user)
        .await
        .unwrap()
        .row
        .id;
    tx.commit().await.unwrap();
    id
}

#[tokio::test]
async fn gateway_and_worker_as_separate_processes_meet_through_redis() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let env = Env::new(&test);
    let gateway = Local::start(&env, &["serve", "--listen", "127.0.0.1:0", "--no-worker"]).await;
    let mut socket = authenticated(&gateway.address, &s, s.conversation).await;
    send(&mut socket, json!({ "type": "message", "text": "queued" })).await;
    expect(&mut socket, "typing").await;
    expect(&mut socket, "ack").await;
    assert_eq!(
        next(&mut socket, Duration::from_millis(700)).await,
        None,
        "no worker yet"
    );

    let worker = Local::start(&env, &["worker", "--consumer", "separate"]).await;
    let response = expect(&mut socket, "response").await;
    assert_eq!(response["text"], "Echo: queued");
    worker.stop().await;
    gateway.stop().await;
}

#[tokio::test]
async fn replies_still_arrive_after_redis_restarts() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let redis = OwnRedis::start().await;
    let mut env = Env::new(&test);
    env.redis_url = redis.url();
    let local = Local::start(&env, &["serve", "--listen", "127.0.0.1:0"]).await;
    let mut socket = authenticated(&local.address, &s, s.conversation).await;
    send(&mut socket, json!({ "type": "message", "text": "before" })).await;
    expect(&mut socket, "typing").await;
    expect(&mut socket, "ack").await;
    assert_eq!(
        expect(&mut socket, "response").await["text"],
        "Echo: before"
    );

    let redis = redis.restart().await;

    // The first attempts may meet a connection that has not noticed the restart yet; the
    // client sees an error frame and sends again, as the page does.
    let mut answered = None;
    for attempt in 0..20 {
        send(
            &mut socket,
            json!({ "type": "message", "text": format!("after {attempt}") }),
        )
        .await;
        let mut acked = false;
        while let Some(frame) = next(&mut socket, Duration::from_secs(3)).await {
            match frame["type"].as_str() {
                Some("ack") => acked = true,
                Some("response") => {
                    answered = Some(frame);
                    break;
                }
                Some("error") => break,
                _ => {}
            }
        }
        if answered.is_some() || acked {
            if answered.is_none() {
                answered = Some(expect(&mut socket, "response").await);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let answered = answered.expect("a message after the restart got its reply");
    assert!(
        answered["text"]
            .as_str()
            .unwrap()
            .starts_with("Echo: after"),
        "{answered}"
    );
    local.stop().await;
    drop(redis);
}

/// The streaming benchmark's client against konstruct-local (what `make bench` times): each
/// reply's chunks, applied by offset, are its text, and the first chunk comes before the reply
/// ends.
#[tokio::test]
async fn streamed_replies_reach_one_user_whole_one_after_another() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let model = tests::streaming::start_model(8, Duration::from_millis(30))
        .await
        .unwrap();
    let conversation = crate::helpers::model_conversation(&db, &s).await;
    let env = Env::new(&test);
    let local = Local::start_with_model(&env, &["serve", "--listen", "127.0.0.1:0"], &model).await;
    let seat = tests::stack::Seat {
        tenant: s.tenant,
        user: s.user,
        conversation,
        token: token(s.user, Role::CustomerOperator),
    };
    let seen = tests::streaming::one_after_another(&local.address, &seat, 3)
        .await
        .unwrap();
    assert_eq!(seen.replies, 3);
    assert_eq!(seen.first_chunk.len(), 3, "every reply streamed");
    assert!(seen.chunk_gap.len() >= 3, "in several chunks");
    assert!(
        seen.first_chunk.max() < seen.reply.min(),
        "the first chunk before the end"
    );
    local.stop().await;
}

#[tokio::test]
async fn an_expired_or_removed_user_gets_no_more_frames_and_may_authenticate_again() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let exp = crate::helpers::now() + 3000;
    let short =
        crate::helpers::sign(&json!({ "sub": s.user, "role": "customer_operator", "exp": exp }));
    let mut expiring = open(&local.address, s.conversation).await;
    send(&mut expiring, json!({ "type": "auth", "token": short })).await;
    expect(&mut expiring, "auth_ok").await;
    let mut other = authenticated(&local.address, &s, s.conversation).await;

    assert_eq!(crate::helpers::expire_sockets(&db, s.tenant, exp).await, 1);
    send(
        &mut expiring,
        json!({ "type": "message", "text": "expired?" }),
    )
    .await;
    let refused = expect(&mut expiring, "error").await;
    assert_eq!(refused["code"], "unauthenticated", "{refused}");
    assert_eq!(
        converse(&mut other, "from the other tab").await["text"],
        "Echo: from the other tab"
    );
    assert_eq!(
        next(&mut expiring, Duration::from_millis(500)).await,
        None,
        "the expired socket gets nothing"
    );

    // A fresh token on the same socket continues the session.
    send(
        &mut expiring,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    expect(&mut expiring, "auth_ok").await;
    assert_eq!(
        converse(&mut expiring, "renewed").await["text"],
        "Echo: renewed"
    );
    assert_eq!(expect(&mut other, "message").await["content"], "renewed");
    assert_eq!(
        expect(&mut other, "response").await["text"],
        "Echo: renewed"
    );

    // Removed from the tenant: refused, and nothing more arrives.
    let mut tx = owner(&db).begin(Scope::Tenant(s.tenant)).await.unwrap();
    tests::stack::revoke_membership(&mut tx, s.tenant, s.user)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for socket in [&mut expiring, &mut other] {
        send(socket, json!({ "type": "message", "text": "still here?" })).await;
        assert_eq!(expect(socket, "error").await["code"], "forbidden");
    }
    local.stop().await;
}

/// A stall detector, not a benchmark: small frames one after another must not wait on a timer
/// (Nagle's algorithm against a delayed ACK costs ~40 ms a frame, so a stalled median is past
/// 55 ms). The margin is wide: a debug build on a machine busy with the rest of the suite (two
/// soaks in Chromium among it) has answered in a median of up to 26 ms.
#[tokio::test]
async fn an_idle_stack_answers_one_user_without_a_stall() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let url = format!("ws://{}/chat/ws/{}", local.address, s.conversation);
    // As a browser does, the client disables Nagle on its side.
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .unwrap();
    send(
        &mut socket,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    expect(&mut socket, "auth_ok").await;
    let mut round_trips = Vec::new();
    // Within the rate limit of 20 messages per 10 s.
    for n in 0..16 {
        let sent = std::time::Instant::now();
        converse(&mut socket, &format!("m{n}")).await;
        // The first message prepares the statements on fresh connections.
        if n > 0 {
            round_trips.push(sent.elapsed());
        }
    }
    round_trips.sort();
    let median = round_trips[round_trips.len() / 2];
    assert!(
        median < Duration::from_millis(45),
        "median message → response {median:?}: something waits on a timer ({round_trips:?})"
    );
    local.stop().await;
}
