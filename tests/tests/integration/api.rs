//! The REST API (PROTOCOL §3) through its axum router, as `chat-api` and the local runtime
//! serve it.

use axum::body::Body;
use http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use shared::api::{self, ApiState};
use shared::db::{Db, Scope, conversations, messages};
use shared::domain::{ConversationId, MessageText, Role, TenantRole};
use tower::ServiceExt;

use crate::helpers::{Seed, TestDb, seed, seed_agent, seed_member, seed_user, token, verifier};

pub struct Response {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Value,
}

pub async fn call(
    db: &Db,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Response {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    send(db, request).await
}

pub async fn send(db: &Db, request: Request<Body>) -> Response {
    let state = ApiState {
        db: db.clone(),
        tokens: verifier(),
    };
    let response = api::router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    Response {
        status,
        headers,
        body,
    }
}

fn assert_error(response: &Response, status: StatusCode, code: &str) {
    assert_eq!(response.status, status, "{}", response.body);
    assert_eq!(response.body["code"], code, "{}", response.body);
    assert!(
        response.body["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{}",
        response.body
    );
}

async fn add_messages(db: &Db, s: &Seed, texts: &[&str]) -> Vec<String> {
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let conversation = conversations::find(&mut tx, s.conversation)
        .await
        .unwrap()
        .unwrap();
    let mut ids = Vec::new();
    for text in texts {
        let stored = messages::insert_user(
            &mut tx,
            &conversation,
            &MessageText::parse(text).unwrap(),
            None,
        )
        .await
        .unwrap();
        ids.push(stored.row.id.to_string());
    }
    tx.commit().await.unwrap();
    ids
}

fn list_uri(tenant: impl std::fmt::Display) -> String {
    format!("/api/portal/chat/conversations?tenant_id={tenant}")
}

fn history_uri(conversation: ConversationId, query: &str) -> String {
    format!("/api/portal/chat/conversations/{conversation}/messages{query}")
}

#[tokio::test]
async fn test_create_conversation() {
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

#[tokio::test]
async fn test_chat_rbac_enforcement() {
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

#[tokio::test]
async fn test_platform_admin_cross_tenant() {
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
async fn test_list_conversation_history() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let texts: Vec<String> = (0..7).map(|i| format!("message {i}")).collect();
    let ids = add_messages(
        &db,
        &s,
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let t = token(s.user, Role::CustomerOperator);
    let get = |query: String| {
        let db = db.clone();
        let t = t.clone();
        async move {
            call(
                &db,
                Method::GET,
                &history_uri(s.conversation, &query),
                Some(&t),
                None,
            )
            .await
        }
    };
    let ids_of = |r: &Response| -> Vec<String> {
        r.body
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let all = get(String::new()).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(ids_of(&all), ids, "ascending created_at");
    let first = &all.body[0];
    assert_eq!(first["role"], "user");
    assert_eq!(first["content"], "message 0");
    assert!(first["created_at"].is_string());

    let newest = get("?limit=3".into()).await;
    assert_eq!(ids_of(&newest), ids[4..7]);
    let older = get(format!("?limit=3&before={}", ids[4])).await;
    assert_eq!(ids_of(&older), ids[1..4]);
    let rest = get(format!("?limit=3&before={}", ids[1])).await;
    assert_eq!(ids_of(&rest), ids[0..1]);

    for bad in [
        "?limit=0",
        "?limit=1000",
        "?limit=-1",
        "?limit=ten",
        "?before=nope",
    ] {
        let response = get(bad.into()).await;
        assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
    }
    let response = get(format!("?before={}", uuid::Uuid::new_v4())).await;
    assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
}

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
/// most once per `Db::HEALTH_TTL`.
#[tokio::test]
async fn health_pings_the_database_at_most_once_per_interval() {
    let (test, db) = TestDb::migrated().await;
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
    tokio::time::sleep(Db::HEALTH_TTL).await;
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

/// History by `seq`: each message carries it with its status; `after_seq` catches up from a
/// `seq`, and a bad one or one beside `before` is a 400.
#[tokio::test]
async fn history_carries_seq_and_status_and_catches_up_after_a_seq() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let ids = add_messages(&db, &s, &["one", "two", "three", "four", "five"]).await;
    let t = token(s.user, Role::CustomerOperator);
    let history = |query: String| {
        let uri = history_uri(s.conversation, &query);
        let (db, t) = (db.clone(), t.clone());
        async move { call(&db, Method::GET, &uri, Some(&t), None).await }
    };
    let field = |r: &Response, name: &str| -> Vec<Value> {
        r.body
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[name].clone())
            .collect()
    };

    let all = history(String::new()).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(field(&all, "seq"), [1, 2, 3, 4, 5].map(|n| json!(n)));
    assert!(field(&all, "status").iter().all(|s| s == "complete"));
    assert!(field(&all, "reply_to").iter().all(Value::is_null));

    let after = history("?after_seq=2&limit=2".into()).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    assert_eq!(
        field(&after, "content"),
        [json!("three"), json!("four")],
        "just after seq 2"
    );

    for query in [
        "?after_seq=-1".to_owned(),
        "?after_seq=x".to_owned(),
        format!("?after_seq=1&before={}", ids[3]),
    ] {
        assert_error(
            &history(query).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
}
