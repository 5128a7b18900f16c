//! `chat-api` as Lambda runs it: API Gateway HTTP API (payload v2) events from
//! `tests/fixtures/events/chat-api/` through `lambda_http`'s adapter into the router.
//!
//! The fixtures are signed with the local development secret below and name fixed ids, so
//! they also work with `cargo lambda invoke chat-api --data-file …` against a database seeded
//! with those ids.

use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, Context, LambdaEvent};
use serde_json::{Value, json};
use shared::api::{self, ApiState};
use shared::db::Db;
use tower::ServiceExt;

use crate::helpers::TestDb;
use crate::helpers::fixtures::{AGENT, USER};
use crate::helpers::fixtures::{fixture_verifier, seed_fixture_ids};

async fn invoke(db: &Db, fixture: &str) -> (u16, Value) {
    let path = format!(
        "{}/fixtures/events/chat-api/{fixture}",
        env!("CARGO_MANIFEST_DIR")
    );
    let event: LambdaRequest =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        matches!(event, LambdaRequest::ApiGatewayV2(_)),
        "{fixture} is an HTTP API v2 event"
    );
    let state = ApiState {
        db: db.clone(),
        tokens: fixture_verifier(),
        delivery: std::sync::Arc::new(shared::delivery::ManagementApi::new(
            crate::helpers::aws::sdk_config(),
        )),
    };
    let adapter = Adapter::from(api::router(state));
    let response = adapter
        .oneshot(LambdaEvent::new(event, Context::default()))
        .await
        .unwrap();
    let response = serde_json::to_value(response).unwrap();
    let status = response["statusCode"].as_u64().unwrap() as u16;
    let body = match response["body"].as_str() {
        Some(text) if !text.is_empty() => serde_json::from_str(text).unwrap(),
        _ => Value::Null,
    };
    (status, body)
}

#[tokio::test]
async fn http_api_v2_events_drive_the_router_through_lambda_http() {
    let (_test, db) = TestDb::migrated().await;
    seed_fixture_ids(&db).await;

    let (status, body) = invoke(&db, "create-conversation.json").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["agent_id"], AGENT);
    assert_eq!(body["user_id"], USER);

    let (status, body) = invoke(&db, "list-conversations.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["agent_name"], "Fixture agent");

    let (status, body) = invoke(&db, "forged-token.json").await;
    assert_eq!((status, &body["code"]), (401, &json!("unauthenticated")));

    let (status, body) = invoke(&db, "healthz.json").await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")));
}
