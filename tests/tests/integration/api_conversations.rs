//! The REST API's conversations (PROTOCOL §3): create, list and reset, under tenant RBAC and
//! for a platform admin across tenants.

use axum::body::Body;
use http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use shared::api::{self};
use shared::db::{Scope, conversations};
use shared::domain::{Role, TenantRole};

use crate::helpers::rest::send;
use crate::helpers::rest::{add_messages, assert_error, call, history_uri, list_uri};
use crate::helpers::{TestDb, seed, seed_agent, seed_member, seed_user, token};

/// The original system's `test_create_conversation`.
#[tokio::test]
async fn create_makes_the_callers_conversation_once_and_finds_it_again() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let agent = seed_agent(&db, s.tenant, "second agent").await;
    let t = token(s.user, Role::CustomerOperator);
    let body = json!({ "tenant_id": s.tenant, "agent_id": agent });

    let first = call(
        &db,
        Method::POST,
        "/api/portal/chat/conversations",
        Some(&t),
        Some(body.clone()),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    for field in [
        "id",
        "tenant_id",
        "agent_id",
        "user_id",
        "created_at",
        "updated_at",
    ] {
        assert!(first.body.get(field).is_some(), "{field} in {}", first.body);
    }
    assert_eq!(first.body["user_id"], json!(s.user));
    assert_eq!(first.body["agent_id"], json!(agent));

    let again = call(
        &db,
        Method::POST,
        "/api/portal/chat/conversations",
        Some(&t),
        Some(body),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["id"], first.body["id"]);
}

#[tokio::test]
async fn create_refuses_an_agent_outside_the_tenant_with_404() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    let t = token(a.user, Role::CustomerOperator);
    for agent in [json!(b.agent), json!(uuid::Uuid::new_v4())] {
        let response = call(
            &db,
            Method::POST,
            "/api/portal/chat/conversations",
            Some(&t),
            Some(json!({ "tenant_id": a.tenant, "agent_id": agent })),
        )
        .await;
        assert_error(&response, StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test]
async fn create_refuses_malformed_bodies_with_400_and_huge_ones_with_413() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let t = token(s.user, Role::CustomerOperator);
    let bad_bodies = [
        json!({}),
        json!({ "tenant_id": s.tenant }),
        json!({ "tenant_id": "nope", "agent_id": s.agent }),
        json!({ "tenant_id": s.tenant, "agent_id": s.agent, "user_id": s.user }),
        json!([1, 2]),
        json!("text"),
    ];
    for body in bad_bodies {
        let response = call(
            &db,
            Method::POST,
            "/api/portal/chat/conversations",
            Some(&t),
            Some(body.clone()),
        )
        .await;
        assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
    }
    let raw = |body: &str, content_type: &str| {
        Request::post("/api/portal/chat/conversations")
            .header(header::AUTHORIZATION, format!("Bearer {t}"))
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let response = send(&db, raw("{\"tenant_id\":", "application/json")).await;
    assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
    let response = send(&db, raw("tenant_id=x", "application/x-www-form-urlencoded")).await;
    assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(api::MAX_BODY_BYTES));
    let response = send(&db, raw(&huge, "application/json")).await;
    assert_error(&response, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
}

/// The original system's `test_chat_rbac_enforcement`.
#[tokio::test]
async fn a_member_is_refused_another_tenants_conversations() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    let t = token(a.user, Role::CustomerAdmin);

    let response = call(&db, Method::GET, &list_uri(b.tenant), Some(&t), None).await;
    assert_error(&response, StatusCode::FORBIDDEN, "forbidden");
    let response = call(
        &db,
        Method::POST,
        "/api/portal/chat/conversations",
        Some(&t),
        Some(json!({ "tenant_id": b.tenant, "agent_id": b.agent })),
    )
    .await;
    assert_error(&response, StatusCode::FORBIDDEN, "forbidden");
    for (method, uri) in [
        (Method::GET, history_uri(b.conversation, "")),
        (
            Method::DELETE,
            format!("/api/portal/chat/conversations/{}", b.conversation),
        ),
    ] {
        let response = call(&db, method, &uri, Some(&t), None).await;
        assert_error(&response, StatusCode::FORBIDDEN, "forbidden");
    }
}

#[tokio::test]
async fn another_members_conversation_is_forbidden_on_history_and_reset() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    add_messages(&db, &s, &["private"]).await;
    let colleague = seed_user(&db, "colleague").await;
    seed_member(&db, s.tenant, colleague, TenantRole::CustomerAdmin).await;
    let t = token(colleague, Role::CustomerAdmin);

    let response = call(
        &db,
        Method::GET,
        &history_uri(s.conversation, ""),
        Some(&t),
        None,
    )
    .await;
    assert_error(&response, StatusCode::FORBIDDEN, "forbidden");
    let uri = format!("/api/portal/chat/conversations/{}", s.conversation);
    let response = call(&db, Method::DELETE, &uri, Some(&t), None).await;
    assert_error(&response, StatusCode::FORBIDDEN, "forbidden");

    // Nor does the colleague's list show it.
    let response = call(&db, Method::GET, &list_uri(s.tenant), Some(&t), None).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, json!([]));

    let owner = token(s.user, Role::CustomerOperator);
    let response = call(
        &db,
        Method::GET,
        &history_uri(s.conversation, ""),
        Some(&owner),
        None,
    )
    .await;
    assert_eq!(
        response.body.as_array().unwrap().len(),
        1,
        "the message is still there"
    );
}

/// The original system's `test_platform_admin_cross_tenant`.
#[tokio::test]
async fn a_platform_admin_reads_every_tenants_conversations() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    add_messages(&db, &b, &["from beta"]).await;
    let admin = token(seed_user(&db, "root").await, Role::PlatformAdmin);

    for s in [&a, &b] {
        let response = call(&db, Method::GET, &list_uri(s.tenant), Some(&admin), None).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.body);
        let ids: Vec<&Value> = response
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["id"])
            .collect();
        assert_eq!(
            ids,
            vec![&json!(s.conversation)],
            "every user's conversations in that tenant"
        );
        let response = call(
            &db,
            Method::GET,
            &history_uri(s.conversation, ""),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(response.status, StatusCode::OK);
    }

    let response = call(
        &db,
        Method::GET,
        "/api/portal/chat/conversations",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let rows = response.body.as_array().unwrap();
    assert_eq!(rows.len(), 2, "without tenant_id the list spans tenants");
    assert_eq!(rows[0]["id"], json!(b.conversation), "newest first");
    assert_eq!(rows[0]["last_message_preview"], "from beta");
    assert_eq!(rows[1]["id"], json!(a.conversation));

    // Anyone else must name the tenant.
    let t = token(a.user, Role::CustomerOperator);
    let response = call(
        &db,
        Method::GET,
        "/api/portal/chat/conversations",
        Some(&t),
        None,
    )
    .await;
    assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn the_list_shows_the_callers_conversations_newest_first_with_agent_and_preview() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let second_agent = seed_agent(&db, s.tenant, "Second").await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let second = conversations::get_or_create(&mut tx, s.tenant, second_agent, s.user)
        .await
        .unwrap()
        .row;
    tx.commit().await.unwrap();
    let long = "é".repeat(300);
    add_messages(&db, &s, &["older", &long]).await;

    let t = token(s.user, Role::CustomerOperator);
    let response = call(&db, Method::GET, &list_uri(s.tenant), Some(&t), None).await;
    assert_eq!(response.status, StatusCode::OK);
    let rows = response.body.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0]["id"],
        json!(s.conversation),
        "the one with the newest message"
    );
    assert_eq!(rows[0]["agent_name"], "acme agent");
    assert_eq!(
        rows[0]["last_message_preview"]
            .as_str()
            .unwrap()
            .chars()
            .count(),
        conversations::PREVIEW_CHARS as usize
    );
    assert_eq!(rows[1]["id"], json!(second.id));
    assert_eq!(rows[1]["agent_name"], "Second");
    assert_eq!(rows[1]["last_message_preview"], Value::Null);
    for field in ["tenant_id", "agent_id", "user_id", "updated_at"] {
        assert!(rows[0].get(field).is_some(), "{field}");
    }

    let response = call(
        &db,
        Method::GET,
        &format!("{}&limit=1", list_uri(s.tenant)),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(response.body.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn reset_deletes_only_that_conversations_messages_and_keeps_it() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let other = seed(&db, "other").await;
    add_messages(&db, &s, &["one", "two"]).await;
    add_messages(&db, &other, &["keep me"]).await;
    let t = token(s.user, Role::CustomerOperator);
    let before = call(&db, Method::GET, &list_uri(s.tenant), Some(&t), None)
        .await
        .body[0]["updated_at"]
        .clone();

    let uri = format!("/api/portal/chat/conversations/{}", s.conversation);
    let response = call(&db, Method::DELETE, &uri, Some(&t), None).await;
    assert_eq!(response.status, StatusCode::NO_CONTENT);
    assert_eq!(response.body, Value::Null);

    let history = call(
        &db,
        Method::GET,
        &history_uri(s.conversation, ""),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(history.body, json!([]));
    let list = call(&db, Method::GET, &list_uri(s.tenant), Some(&t), None).await;
    assert_eq!(
        list.body[0]["id"],
        json!(s.conversation),
        "the conversation stays"
    );
    assert_ne!(list.body[0]["updated_at"], before, "updated_at is bumped");
    assert_eq!(list.body[0]["last_message_preview"], Value::Null);

    let other_token = token(other.user, Role::CustomerOperator);
    let kept = call(
        &db,
        Method::GET,
        &history_uri(other.conversation, ""),
        Some(&other_token),
        None,
    )
    .await;
    assert_eq!(kept.body.as_array().unwrap().len(), 1);
}
