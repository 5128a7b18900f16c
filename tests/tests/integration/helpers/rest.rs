//! Calling the REST router (`shared::api::router`) in-process as `chat-api` serves it, and
//! checking its error bodies.

use axum::body::Body;
use http::{Method, Request, StatusCode, header};
use serde_json::Value;
use shared::api::{self, ApiState};
use shared::db::{Db, Scope, conversations};
use shared::domain::{ConversationId, MessageText};
use tower::ServiceExt;

use crate::helpers::{Seed, verifier};

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
        delivery: std::sync::Arc::new(shared::delivery::ManagementApi::new(
            crate::helpers::aws::sdk_config(),
        )),
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

pub fn assert_error(response: &Response, status: StatusCode, code: &str) {
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

pub async fn add_messages(db: &Db, s: &Seed, texts: &[&str]) -> Vec<String> {
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let conversation = conversations::find(&mut tx, s.conversation)
        .await
        .unwrap()
        .unwrap();
    let mut ids = Vec::new();
    for text in texts {
        let stored =
            tests::stack::store_history(&mut tx, &conversation, &MessageText::parse(text).unwrap())
                .await
                .unwrap();
        ids.push(stored.id.to_string());
    }
    tx.commit().await.unwrap();
    ids
}

pub fn list_uri(tenant: impl std::fmt::Display) -> String {
    format!("/api/portal/chat/conversations?tenant_id={tenant}")
}

pub fn history_uri(conversation: ConversationId, query: &str) -> String {
    format!("/api/portal/chat/conversations/{conversation}/messages{query}")
}
