//! The REST API (PROTOCOL §3) through its axum router, as `chat-api` and the local runtime
//! serve it.

use std::time::Duration;

use axum::body::Body;
use http::{Method, Request, StatusCode, header};
use serde_json::json;
use shared::domain::{ConversationId, Role};

use crate::helpers::rest::send;
use crate::helpers::rest::{assert_error, call, history_uri, list_uri};
use crate::helpers::{TestDb, seed, token};

#[tokio::test]
async fn bad_ids_are_400_and_unknown_conversations_404() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let t = token(s.user, Role::CustomerOperator);
    for (method, uri) in [
        (
            Method::GET,
            "/api/portal/chat/conversations/not-a-uuid/messages".to_owned(),
        ),
        (
            Method::DELETE,
            "/api/portal/chat/conversations/not-a-uuid".to_owned(),
        ),
        (Method::GET, list_uri("12345")),
        (Method::GET, format!("{}&limit=0", list_uri(s.tenant))),
        (Method::GET, format!("{}&limit=501", list_uri(s.tenant))),
    ] {
        let response = call(&db, method, &uri, Some(&t), None).await;
        assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
    }
    let missing = ConversationId::new();
    let response = call(&db, Method::GET, &history_uri(missing, ""), Some(&t), None).await;
    assert_error(&response, StatusCode::NOT_FOUND, "not_found");
    let uri = format!("/api/portal/chat/conversations/{missing}");
    let response = call(&db, Method::DELETE, &uri, Some(&t), None).await;
    assert_error(&response, StatusCode::NOT_FOUND, "not_found");
    let response = call(
        &db,
        Method::GET,
        "/api/portal/chat/nothing-here",
        Some(&t),
        None,
    )
    .await;
    assert_error(&response, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn no_token_or_a_bad_token_is_401() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let expired = crate::helpers::sign(&json!({
        "sub": s.user, "role": "customer_operator", "exp": crate::helpers::now() - 10
    }));
    let uris = [
        (Method::GET, list_uri(s.tenant)),
        (Method::POST, "/api/portal/chat/conversations".to_owned()),
        (Method::GET, history_uri(s.conversation, "")),
        (
            Method::DELETE,
            format!("/api/portal/chat/conversations/{}", s.conversation),
        ),
    ];
    for (method, uri) in uris {
        for t in [None, Some("garbage"), Some(expired.as_str())] {
            let response = call(&db, method.clone(), &uri, t, None).await;
            assert_error(&response, StatusCode::UNAUTHORIZED, "unauthenticated");
            assert_eq!(response.headers[header::WWW_AUTHENTICATE], "Bearer");
        }
    }
    let request = Request::get(list_uri(s.tenant))
        .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
        .body(Body::empty())
        .unwrap();
    assert_error(
        &send(&db, request).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
}

#[tokio::test]
async fn health_and_openapi_need_no_token() {
    let (_test, db) = TestDb::migrated().await;
    let response = call(&db, Method::GET, "/healthz", None, None).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body["status"], "ok");

    let response = call(
        &db,
        Method::GET,
        "/api/portal/chat/openapi.json",
        None,
        None,
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    let doc = response.body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/portal/chat/conversations",
        "/api/portal/chat/conversations/{id}/messages",
        "/api/portal/chat/conversations/{id}",
        "/api/portal/chat/openapi.json",
        "/healthz",
    ] {
        assert!(paths.contains_key(path), "{path} documented");
    }
    let create = &doc["paths"]["/api/portal/chat/conversations"]["post"];
    for status in ["200", "201", "400", "401", "403", "404"] {
        assert!(
            create["responses"].get(status).is_some(),
            "POST documents {status}"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// The health check takes no token: however often it is called, the database is pinged at
/// most once per interval (`Db::HEALTH_TTL`; a second here).
#[tokio::test]
async fn health_pings_the_database_at_most_once_per_interval() {
    const TTL: Duration = Duration::from_secs(1);
    let (test, db) = TestDb::migrated().await;
    let db = db.with_health_ttl(TTL);
    assert_eq!(
        call(&db, Method::GET, "/healthz", None, None).await.status,
        StatusCode::OK
    );
    test.pool.close().await;
    // Within the interval the answer is the one just found, without a query.
    for _ in 0..20 {
        let response = call(&db, Method::GET, "/healthz", None, None).await;
        assert_eq!(response.status, StatusCode::OK);
    }
    tokio::time::sleep(TTL).await;
    let response = call(&db, Method::GET, "/healthz", None, None).await;
    assert_error(&response, StatusCode::SERVICE_UNAVAILABLE, "internal");
}

#[tokio::test]
async fn health_is_503_when_the_database_does_not_answer() {
    let (test, db) = TestDb::migrated().await;
    test.pool.close().await;
    let response = call(&db, Method::GET, "/healthz", None, None).await;
    assert_error(&response, StatusCode::SERVICE_UNAVAILABLE, "internal");
}
