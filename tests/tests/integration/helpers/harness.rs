//! The WebSocket routes' handlers as API Gateway invokes them: a [`Harness`] holds a migrated
//! database with a seed, moto's SQS queue, the wire-level connection-management API and the
//! routes' state, and drives `$connect`, `auth` and frames through [`Route::handle`].

use std::sync::Arc;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use serde_json::{Value, json};
use shared::config::routes::{Limits, SocketCaps};
use shared::db::{Db, Scope, connections};
use shared::domain::{ConnectionId, ConversationId, Role};
use shared::queue::SqsQueue;
use shared::ws::{Edge, Route, WsState};

use crate::helpers::aws::{ManagementApi, depth, fifo_queue, sdk_config};
use crate::helpers::{Seed, TestDb, seed, token, verifier};

pub fn event(
    connection: &str,
    route: &str,
    body: Option<&str>,
    query: Value,
) -> ApiGatewayWebsocketProxyRequest {
    serde_json::from_value(json!({
        "requestContext": {
            "routeKey": route,
            "eventType": Route::for_key(route).event_type(),
            "connectionId": connection,
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "stage": "test",
            "apiId": "abc123",
            "requestId": "req",
            "connectedAt": 0,
            "requestTimeEpoch": 0,
        },
        "queryStringParameters": query,
        "body": body,
        "isBase64Encoded": false,
    }))
    .unwrap()
}

pub fn frame_of(response: &ApiGatewayProxyResponse) -> Option<Value> {
    match &response.body {
        Some(Body::Text(text)) => Some(serde_json::from_str(text).unwrap()),
        _ => None,
    }
}

pub struct Harness {
    pub _test: TestDb,
    pub db: Db,
    pub api: ManagementApi,
    pub queue: SqsQueue,
    pub state: WsState,
    pub seed: Seed,
}

impl Harness {
    pub async fn new() -> Self {
        let (test, db) = TestDb::migrated().await;
        Self::with_db(test, db).await
    }

    /// The same, with the routes and the orchestrator (whatever a test builds on `h.db`)
    /// reaching Postgres through PgBouncer in transaction mode, as the functions reach RDS
    /// Proxy: `pool` connections per process, statements unnamed.
    pub async fn through_pooler(pool: u32) -> Self {
        let (test, _) = TestDb::migrated().await;
        let db = test.pooled(pool);
        Self::with_db(test, db).await
    }

    async fn with_db(test: TestDb, db: Db) -> Self {
        let seed = seed(&db, "acme").await;
        let api = ManagementApi::start().await;
        let queue = fifo_queue().await;
        let state = WsState::new(
            Edge {
                db: db.clone(),
                delivery: Arc::new(shared::delivery::ManagementApi::new(sdk_config())),
                management_endpoint: Some(api.endpoint.clone()),
            },
            verifier(),
            Arc::new(queue.clone()),
            Limits::default(),
            SocketCaps::default(),
        );
        Self {
            _test: test,
            db,
            api,
            queue,
            state,
            seed,
        }
    }

    pub async fn connect_to(
        &self,
        connection: &str,
        conversation: &str,
    ) -> ApiGatewayProxyResponse {
        self.api.open(connection);
        let query = json!({ "conversation_id": conversation });
        Route::Connect
            .handle(&self.state, event(connection, "$connect", None, query))
            .await
    }

    pub async fn connect(&self, connection: &str) -> ApiGatewayProxyResponse {
        self.connect_to(connection, &self.seed.conversation.to_string())
            .await
    }

    /// The `auth` route's own answer, if any (failures are posted, then the socket closed).
    pub async fn auth(&self, connection: &str, token: &str) -> Option<Value> {
        self.auth_with(connection, json!({ "type": "auth", "token": token }))
            .await
    }

    /// An `auth` frame as given; the route's own answer, if any (a socket owed a `replay` or
    /// a reply's text so far gets `auth_ok` and those posted instead).
    pub async fn auth_with(&self, connection: &str, frame: Value) -> Option<Value> {
        let body = frame.to_string();
        let response = Route::Auth
            .handle(
                &self.state,
                event(connection, "auth", Some(&body), json!(null)),
            )
            .await;
        frame_of(&response)
    }

    pub async fn open_session(&self, connection: &str) {
        self.open_session_on(connection, self.seed.conversation)
            .await;
    }

    pub async fn open_session_on(&self, connection: &str, conversation: ConversationId) {
        let response = self.connect_to(connection, &conversation.to_string()).await;
        assert_eq!(response.status_code, 200);
        let answer = self
            .auth(connection, &token(self.seed.user, Role::CustomerOperator))
            .await;
        // Posted with what the socket is owed (a reply streaming now), or the route's answer.
        let ok = answer.unwrap_or_else(|| self.api.frames_to(connection)[0].clone());
        assert_eq!(ok["type"], "auth_ok", "{ok}");
    }

    /// Sends a raw frame down the route API Gateway would pick and returns the route response.
    pub async fn send(&self, connection: &str, body: &str) -> Value {
        self.route(connection, body)
            .await
            .expect("the message route answers this frame")
    }

    /// Sends a raw frame down its route; the route response, if any (`cancel` has none).
    pub async fn route(&self, connection: &str, body: &str) -> Option<Value> {
        let key = shared::ws::route_key(body);
        let response = Route::for_key(key)
            .handle(&self.state, event(connection, key, Some(body), json!(null)))
            .await;
        frame_of(&response)
    }

    pub async fn stored_messages(&self) -> i64 {
        let mut tx = self
            .db
            .begin(Scope::Tenant(self.seed.tenant))
            .await
            .unwrap();
        sqlx::query_scalar("select count(*) from web_conversation_messages")
            .fetch_one(&mut *tx)
            .await
            .unwrap()
    }

    pub async fn connection(&self, id: &str) -> Option<connections::Connection> {
        let id = ConnectionId::parse(id).unwrap();
        let mut tx = self.db.begin(Scope::Connection(&id)).await.unwrap();
        connections::find(&mut tx, &id).await.unwrap()
    }
}

pub fn message_frame(text: &str) -> String {
    json!({ "type": "message", "text": text }).to_string()
}

pub async fn assert_nothing_stored_or_queued(h: &Harness) {
    assert_eq!(h.stored_messages().await, 0, "nothing stored");
    assert_eq!(depth(&h.queue).await, 0, "nothing queued");
}
