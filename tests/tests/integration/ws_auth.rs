//! Authorization on the WebSocket routes (PROTOCOL §1): who may open which conversation at
//! `$connect` and `auth`, what a refused token gets, and the check repeated on every message and
//! every delivery.

use serde_json::{Value, json};
use shared::db::Scope;
use shared::domain::{ConversationId, Role};
use shared::ws::Route;

use crate::helpers::aws::drain;
use crate::helpers::harness::{Harness, event, frame_of};
use crate::helpers::harness::{assert_nothing_stored_or_queued, message_frame};
use crate::helpers::seed::owner;
use crate::helpers::{expire_sockets, now, seed_user, sign, token};

/// A refused `auth`: the error reaches the socket, the socket is closed, nothing is bound.
async fn assert_auth_refused(h: &Harness, connection: &str, token: &str, code: &str) {
    h.connect(connection).await;
    assert_eq!(
        h.auth(connection, token).await,
        None,
        "no route response after a close"
    );
    let frames = h.api.frames_to(connection);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "error");
    assert_eq!(frames[0]["code"], code, "{}", frames[0]);
    assert!(
        h.api.deletes().contains(&connection.to_owned()),
        "the socket is closed"
    );
    let row = h.connection(connection).await.unwrap();
    assert!(row.binding().is_none(), "nothing bound");
    let answer = h.send(connection, &message_frame("hi")).await;
    assert_eq!(answer["code"], "unauthenticated");
}

#[tokio::test]
async fn forged_expired_and_wrong_algorithm_tokens_are_refused() {
    let h = Harness::new().await;
    let user = h.seed.user;
    let expired = sign(&json!({ "sub": user, "role": "customer_operator", "exp": now() - 5 }));
    let forged = {
        let good = token(user, Role::CustomerOperator);
        let (head, _) = good.rsplit_once('.').unwrap();
        format!("{head}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    };
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({ "sub": user, "role": "customer_operator", "exp": now() + 60 }),
        &jsonwebtoken::EncodingKey::from_secret(crate::helpers::SECRET.as_bytes()),
    )
    .unwrap();
    for (i, bad) in [expired, forged, hs512, "not-a-jwt".to_owned()]
        .iter()
        .enumerate()
    {
        assert_auth_refused(&h, &format!("bad{i}"), bad, "unauthenticated").await;
    }
    assert_nothing_stored_or_queued(&h).await;
}

#[tokio::test]
async fn another_users_conversation_and_a_foreign_tenant_are_forbidden() {
    let h = Harness::new().await;
    // A member of the tenant, but not the owner.
    let colleague = seed_user(&h.db, "colleague").await;
    crate::helpers::seed_member(
        &h.db,
        h.seed.tenant,
        colleague,
        shared::domain::TenantRole::CustomerAdmin,
    )
    .await;
    assert_auth_refused(
        &h,
        "c1",
        &token(colleague, Role::CustomerAdmin),
        "forbidden",
    )
    .await;

    // The owner, after leaving the tenant.
    let mut tx = owner(&h.db)
        .begin(Scope::Tenant(h.seed.tenant))
        .await
        .unwrap();
    tests::stack::revoke_membership(&mut tx, h.seed.tenant, h.seed.user)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_auth_refused(
        &h,
        "c2",
        &token(h.seed.user, Role::CustomerOperator),
        "forbidden",
    )
    .await;
    assert_nothing_stored_or_queued(&h).await;
}

#[tokio::test]
async fn a_platform_admin_may_open_any_conversation() {
    let h = Harness::new().await;
    let admin = seed_user(&h.db, "root").await;
    h.connect("c1").await;
    let ok = h
        .auth("c1", &token(admin, Role::PlatformAdmin))
        .await
        .unwrap();
    assert_eq!(
        ok,
        json!({ "type": "auth_ok", "conversation_id": h.seed.conversation, "user_id": admin,
                "last_seq": 0, "head_id": null })
    );
    let binding = h.connection("c1").await.unwrap().binding().unwrap();
    assert_eq!(
        (binding.tenant_id, binding.role),
        (h.seed.tenant, Role::PlatformAdmin)
    );
}

#[tokio::test]
async fn an_unknown_conversation_is_not_found_at_auth() {
    let h = Harness::new().await;
    let missing = ConversationId::new().to_string();
    assert_eq!(h.connect_to("c1", &missing).await.status_code, 200);
    let t = token(h.seed.user, Role::CustomerOperator);
    h.auth("c1", &t).await;
    assert_eq!(h.api.frames_to("c1")[0]["code"], "not_found");
    assert!(h.api.deletes().contains(&"c1".to_owned()));
}

#[tokio::test]
async fn connect_refuses_a_missing_or_malformed_conversation_id() {
    let h = Harness::new().await;
    for (i, query) in [
        json!(null),
        json!({}),
        json!({ "conversation_id": "nope" }),
        json!({ "conversation_id": "" }),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("c{i}");
        let response = Route::Connect
            .handle(&h.state, event(&id, "$connect", None, query.clone()))
            .await;
        assert_eq!(response.status_code, 400, "{query}");
        assert_eq!(frame_of(&response).unwrap()["code"], "bad_request");
        assert!(
            h.connection(&id).await.is_none(),
            "{query}: nothing recorded"
        );
    }
}

/// The `response` frames a connection has been posted so far.
fn responses(h: &Harness, connection: &str) -> Vec<Value> {
    h.api
        .frames_to(connection)
        .into_iter()
        .filter(|f| f["type"] == "response")
        .collect()
}

/// Sends a message on `connection`, then runs the orchestrator on what was queued.
async fn converse(
    h: &Harness,
    state: &shared::orchestrator::OrchestratorState,
    connection: &str,
    text: &str,
) -> Value {
    let answer = h.send(connection, &message_frame(text)).await;
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    if !records.is_empty() {
        assert!(
            crate::helpers::orchestrator::run(state, records)
                .await
                .is_empty()
        );
    }
    answer
}

#[tokio::test]
async fn authorization_is_checked_on_every_message_and_every_delivery() {
    let h = Harness::new().await;
    let llm = crate::helpers::llm::FakeLlm::hello().await;
    let state = crate::helpers::orchestrator::orchestrator(&h, &llm);
    let user = h.seed.user;
    let admin = seed_user(&h.db, "root").await;
    // One tab with a token about to expire, another with a long one, and a platform admin.
    h.connect("short").await;
    let exp = now() + 3000;
    let short = sign(&json!({ "sub": user, "role": "customer_operator", "exp": exp }));
    assert_eq!(h.auth("short", &short).await.unwrap()["type"], "auth_ok");
    h.open_session("long").await;
    h.connect("admin").await;
    let ok = h.auth("admin", &token(admin, Role::PlatformAdmin)).await;
    assert_eq!(ok.unwrap()["type"], "auth_ok");

    assert_eq!(
        converse(&h, &state, "short", "while fresh").await["type"],
        "ack"
    );
    for tab in ["short", "long", "admin"] {
        assert_eq!(responses(&h, tab).len(), 1, "{tab}");
    }

    // The short token expires: its messages are refused, nothing else reaches it.
    assert_eq!(expire_sockets(&h.db, h.seed.tenant, exp).await, 1);
    let stored = h.stored_messages().await;
    let posted = h.api.frames_to("short").len();
    let refused = converse(&h, &state, "short", "after expiry").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "unauthenticated");
    assert!(refused["message"].as_str().unwrap().contains("expired"));
    assert_eq!(h.stored_messages().await, stored, "nothing stored");
    assert_eq!(
        converse(&h, &state, "long", "from the other tab").await["type"],
        "ack"
    );
    assert_eq!(
        h.api.frames_to("short").len(),
        posted,
        "no typing, no reply to the expired socket"
    );
    assert_eq!(responses(&h, "long").len(), 2);
    assert_eq!(responses(&h, "admin").len(), 2);

    // A fresh auth frame on the same socket renews it.
    let ok = h.auth("short", &token(user, Role::CustomerOperator)).await;
    assert_eq!(ok.unwrap()["type"], "auth_ok");
    assert_eq!(
        converse(&h, &state, "short", "renewed").await["type"],
        "ack"
    );
    assert_eq!(responses(&h, "short").len(), 2);

    // The user leaves the tenant while a job is queued: its reply is stored and reaches the
    // platform admin only, and the user's next message is refused.
    assert_eq!(
        h.send("long", &message_frame("just before leaving")).await["type"],
        "ack"
    );
    let mut tx = owner(&h.db)
        .begin(Scope::Tenant(h.seed.tenant))
        .await
        .unwrap();
    tests::stack::revoke_membership(&mut tx, h.seed.tenant, user)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    assert!(
        crate::helpers::orchestrator::run(&state, records)
            .await
            .is_empty()
    );
    assert_eq!(responses(&h, "admin").len(), 4);
    assert_eq!(responses(&h, "short").len(), 2, "no reply after leaving");
    assert_eq!(responses(&h, "long").len(), 3, "no reply after leaving");
    for tab in ["short", "long"] {
        let refused = h.send(tab, &message_frame("still here?")).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
    }
}
