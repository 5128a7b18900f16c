//! Abuse limits that hold (contract §2 `rate_limited`): a user's messages are counted across all
//! their sockets, sockets are capped per user and per conversation, sockets that never
//! authenticate are closed and forgotten, and who wrote each message is on record. Through the
//! functions' handlers (with a wire-level connection-management API) and through
//! `konstruct-local`.

use std::time::Duration;

use serde_json::{Value, json};
use shared::config::routes::RateLimit;
use shared::db::Scope;
use shared::db::agents::Provider;
use shared::db::messages::{MessageRole, MessageView};
use shared::domain::{ConnectionId, Role, UserId};
use shared::ws::sweep;

use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, last_user_text};
use crate::helpers::local::{Env, Local, authenticated, expect, next, open, send};
use crate::helpers::orchestrator::{conversation_with, orchestrator, records_for, run, stored};
use crate::helpers::{Captured, TestDb, seed, seed_user, token};

fn message(text: &str) -> String {
    json!({ "type": "message", "text": text }).to_string()
}

#[tokio::test]
async fn a_users_messages_are_counted_across_all_their_sockets() {
    let mut h = Harness::new().await;
    h.state.message.limits.user = RateLimit {
        messages: 3,
        window_seconds: 60,
    };
    h.open_session("tab-1").await;
    h.open_session("tab-2").await;
    assert_eq!(h.send("tab-1", &message("one")).await["type"], "ack");
    assert_eq!(h.send("tab-2", &message("two")).await["type"], "ack");
    assert_eq!(h.send("tab-1", &message("three")).await["type"], "ack");
    // Each socket is far below its own limit; the user is at theirs.
    let refused = h.send("tab-2", &message("four")).await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    // A new socket does not reset it.
    h.open_session("tab-3").await;
    let refused = h.send("tab-3", &message("five")).await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(h.stored_messages().await, 3);
}

#[tokio::test]
async fn sockets_over_the_per_user_cap_are_refused_and_closed() {
    let mut h = Harness::new().await;
    h.state.auth.caps.per_user = 2;
    h.open_session("tab-1").await;
    h.open_session("tab-2").await;
    assert_eq!(h.connect("tab-3").await.status_code, 200);
    let answer = h
        .auth("tab-3", &token(h.seed.user, Role::CustomerOperator))
        .await;
    assert!(answer.is_none(), "a refused auth is posted, not answered");
    let error = h.api.frames_to("tab-3").pop().expect("an error frame");
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert!(h.api.deletes().contains(&"tab-3".to_owned()), "and closed");
    // Renewing an open socket's token is not a new socket.
    let renewed = h
        .auth("tab-1", &token(h.seed.user, Role::CustomerOperator))
        .await
        .expect("auth_ok");
    assert_eq!(renewed["type"], "auth_ok", "{renewed}");
}

#[tokio::test]
async fn sockets_over_the_per_conversation_cap_are_refused_and_closed() {
    let mut h = Harness::new().await;
    h.state.auth.caps.per_conversation = 2;
    h.open_session("owner-1").await;
    h.open_session("owner-2").await;
    // A platform admin watching the same conversation is one socket too many.
    let admin = seed_user(&h.db, "admin").await;
    assert_eq!(h.connect("admin-1").await.status_code, 200);
    assert!(
        h.auth("admin-1", &token(admin, Role::PlatformAdmin))
            .await
            .is_none()
    );
    let error = h.api.frames_to("admin-1").pop().expect("an error frame");
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert!(h.api.deletes().contains(&"admin-1".to_owned()));
}

#[tokio::test]
async fn sockets_that_never_authenticate_are_swept_and_the_rest_kept() {
    let h = Harness::new().await;
    assert_eq!(h.connect("silent-old").await.status_code, 200);
    assert_eq!(h.connect("silent-new").await.status_code, 200);
    h.open_session("talking-old").await;
    for id in ["silent-old", "talking-old"] {
        let id = ConnectionId::parse(id).unwrap();
        let mut tx = h.db.begin(Scope::Connection(&id)).await.unwrap();
        sqlx::query(
            "update ws_connections set connected_at = now() - interval '1 minute'
             where connection_id = $1",
        )
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    let swept = sweep::sweep(h.state.edge(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert_eq!(h.api.deletes(), vec!["silent-old".to_owned()]);
    assert!(h.connection("silent-old").await.is_none(), "forgotten");
    assert!(
        h.connection("silent-new").await.is_some(),
        "within its deadline"
    );
    assert!(h.connection("talking-old").await.is_some(), "authenticated");
    // Nothing left to do: a second pass closes nothing.
    assert_eq!(
        sweep::sweep(h.state.edge(), Duration::from_secs(10))
            .await
            .unwrap(),
        0
    );
    // An `auth` racing the sweep (sent before the close took effect) binds nothing.
    assert!(
        h.auth("silent-old", &token(h.seed.user, Role::CustomerOperator))
            .await
            .is_none()
    );
    assert!(h.connection("silent-old").await.is_none());
}

#[tokio::test]
async fn a_platform_admins_message_is_stored_as_theirs_and_marked_for_the_agent() {
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    let admin = seed_user(&h.db, "admin").await;
    h.open_session_on("owner", conversation).await;
    let owner_jobs = records_for(&h, "owner", &["from the owner"]).await;
    assert!(run(&state, owner_jobs).await.is_empty());
    assert_eq!(
        h.connect_to("admin", &conversation.to_string())
            .await
            .status_code,
        200
    );
    let ok = h
        .auth("admin", &token(admin, Role::PlatformAdmin))
        .await
        .expect("auth_ok");
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    let admin_jobs = records_for(&h, "admin", &["from support"]).await;
    assert!(run(&state, admin_jobs).await.is_empty());

    // Stored with its author, and shown so in history.
    let authors: Vec<(String, Option<UserId>)> = stored(&h, conversation)
        .await
        .into_iter()
        .map(MessageView::from)
        .filter(|m| m.role == MessageRole::User)
        .map(|m| (m.content, m.author_id))
        .collect();
    assert_eq!(
        authors,
        vec![
            ("from the owner".to_owned(), Some(h.seed.user)),
            ("from support".to_owned(), Some(admin)),
        ]
    );
    // The agent is told which words are not the owner's, as data (the message's `name`), not
    // as text the owner could type.
    let requests = llm.requests();
    assert_eq!(last_user_text(&requests[0]), "from the owner");
    assert_eq!(last_user_text(&requests[1]), "from support");
    let messages = requests[1]["messages"].as_array().unwrap();
    assert_eq!(messages.last().unwrap()["name"], shared::agent::ADMIN_NAME);
    assert!(
        messages
            .iter()
            .filter(|m| m["content"] == "from the owner")
            .all(|m| m.get("name").is_none())
    );
    let earlier: Vec<String> = requests[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        earlier[0], "from the owner",
        "the owner's words stay unmarked"
    );
}

/// The next `ack` or `error` on a socket, past `typing`, other tabs' messages and replies.
async fn answer_to(socket: &mut crate::helpers::local::Socket) -> Value {
    loop {
        let frame = next(socket, Duration::from_secs(10))
            .await
            .expect("an ack or an error");
        if frame["type"] == "ack" || frame["type"] == "error" {
            return frame;
        }
    }
}

/// Through `konstruct-local`: the per-user limit across two sockets and the per-user socket
/// cap, configured as a deployment would.
#[tokio::test]
async fn konstruct_local_holds_the_user_limit_and_the_socket_cap() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let env = Env::new(&test);
    let server = Local::start_with(
        &env,
        &["serve"],
        &[
            ("WS_USER_RATE_LIMIT_MESSAGES", "2"),
            ("WS_MAX_SOCKETS_PER_USER", "2"),
        ],
    )
    .await;
    let address = &server.address;
    let mut one = authenticated(address, &s, s.conversation).await;
    let mut two = authenticated(address, &s, s.conversation).await;
    // Two messages, one from each socket; the third is refused: the user has sent two,
    // whichever socket they used.
    send(&mut one, json!({ "type": "message", "text": "first" })).await;
    assert_eq!(answer_to(&mut one).await["type"], "ack");
    send(&mut two, json!({ "type": "message", "text": "second" })).await;
    assert_eq!(answer_to(&mut two).await["type"], "ack");
    send(&mut one, json!({ "type": "message", "text": "third" })).await;
    let third = answer_to(&mut one).await;
    assert_eq!(third["code"], "rate_limited", "{third}");

    // A third socket of the same user is refused and closed.
    let mut three = open(address, s.conversation).await;
    send(
        &mut three,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    let error = expect(&mut three, "error").await;
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert!(
        next(&mut three, Duration::from_secs(5)).await.is_none(),
        "closed"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_reset_by_someone_other_than_the_owner_is_logged_with_who_did_it() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let admin = seed_user(&db, "admin").await;
    let (logs, _guard) = Captured::start();
    let uri = format!("/api/portal/chat/conversations/{}", s.conversation);

    let own = crate::helpers::rest::call(
        &db,
        http::Method::DELETE,
        &uri,
        Some(&token(s.user, Role::CustomerOperator)),
        None,
    )
    .await;
    assert_eq!(own.status, http::StatusCode::NO_CONTENT);
    assert!(
        !logs.text().contains("reset by someone other"),
        "{}",
        logs.text()
    );

    let by_admin = crate::helpers::rest::call(
        &db,
        http::Method::DELETE,
        &uri,
        Some(&token(admin, Role::PlatformAdmin)),
        None,
    )
    .await;
    assert_eq!(by_admin.status, http::StatusCode::NO_CONTENT);
    let line = logs
        .text()
        .lines()
        .find(|l| l.contains("reset by someone other than its owner"))
        .map(str::to_owned)
        .expect("the reset is logged");
    assert!(line.contains(&format!("reset_by={admin}")), "{line}");
    assert!(line.contains(&format!("owner_id={}", s.user)), "{line}");
    assert!(line.contains("PlatformAdmin"), "{line}");
}
