//! The WebSocket routes as API Gateway invokes them, against real Postgres, moto's SQS and a
//! wire-level connection-management API.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use futures::FutureExt;
use serde_json::{Value, json};
use shared::db::{Db, Scope, connections, memberships};
use shared::delivery::Posted;
use shared::domain::{ClientMessageId, ConnectionId, ConversationId, Role};
use shared::frame::ServerFrame;
use shared::job::Job;
use shared::queue::{JobQueue, RedisQueue, SqsQueue};
use shared::ws::{Edge, Limits, RateLimit, Route, SocketCaps, WsState};

use crate::aws::{ManagementApi, depth, drain, fifo_queue, sdk_config};
use crate::helpers::{Seed, TestDb, now, seed, seed_user, sign, token, verifier};

pub fn event(
    connection: &str,
    route: &str,
    body: Option<&str>,
    query: Value,
) -> ApiGatewayWebsocketProxyRequest {
    serde_json::from_value(json!({
        "requestContext": {
            "routeKey": route,
            "eventType": if route == "$connect" { "CONNECT" } else if route == "$disconnect" { "DISCONNECT" } else { "MESSAGE" },
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

fn message(text: &str) -> String {
    json!({ "type": "message", "text": text }).to_string()
}

#[tokio::test]
async fn test_typing_indicator_sent() {
    let h = Harness::new().await;
    let queue = h.queue.clone();
    h.api.probe_with(move || {
        let queue = queue.clone();
        async move { json!(depth(&queue).await) }.boxed()
    });
    h.open_session("c1").await;

    let ack = h.send("c1", &message("  Hello agent  ")).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["conversation_id"], json!(h.seed.conversation));
    assert_eq!(ack["client_message_id"], Value::Null);

    let posts = h.api.posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].connection, "c1");
    assert_eq!(
        posts[0].frame,
        json!({ "type": "typing", "conversation_id": h.seed.conversation })
    );
    assert_eq!(
        posts[0].probe,
        json!(0),
        "typing arrived while the queue was still empty"
    );

    let queued = drain(&h.queue).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].group_id, h.seed.conversation.to_string());
    assert_eq!(queued[0].dedup_id, ack["message_id"].as_str().unwrap());
    let job: Job = serde_json::from_value(queued[0].body.clone()).unwrap();
    assert_eq!(job.tenant_id, h.seed.tenant);
    assert_eq!(job.portal_user_id, h.seed.user);
    assert_eq!(job.message.content.text, "Hello agent");
    assert_eq!(job.message.thread_id, Some(h.seed.conversation.to_string()));
    assert_eq!(
        job.message_id.to_string(),
        ack["message_id"].as_str().unwrap()
    );
    assert_eq!(h.stored_messages().await, 1);
}

#[tokio::test]
async fn a_repeated_client_message_id_is_stored_and_queued_once_and_acked_twice() {
    let h = Harness::new().await;
    h.open_session("c1").await;
    let id = ClientMessageId::new();
    let frame = json!({ "type": "message", "text": "once", "client_message_id": id }).to_string();
    let first = h.send("c1", &frame).await;
    let second = h.send("c1", &frame).await;
    for ack in [&first, &second] {
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["client_message_id"], json!(id));
    }
    assert_eq!(first["message_id"], second["message_id"]);
    assert_eq!(h.stored_messages().await, 1);
    assert_eq!(drain(&h.queue).await.len(), 1);
}

async fn assert_nothing_stored_or_queued(h: &Harness) {
    assert_eq!(h.stored_messages().await, 0, "nothing stored");
    assert_eq!(depth(&h.queue).await, 0, "nothing queued");
}

#[tokio::test]
async fn a_message_before_auth_is_unauthenticated() {
    let h = Harness::new().await;
    h.connect("c1").await;
    let answer = h.send("c1", &message("hi")).await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "unauthenticated");
    let answer = h.send("never-connected", &message("hi")).await;
    assert_eq!(answer["code"], "unauthenticated");
    assert_nothing_stored_or_queued(&h).await;
    assert!(h.api.posts().is_empty(), "no typing for a refused message");
}

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
    let answer = h.send(connection, &message("hi")).await;
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
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    memberships::revoke(&mut tx, h.seed.tenant, h.seed.user)
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
                "last_seq": 0 })
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

#[tokio::test]
async fn bad_frames_get_their_error_and_nothing_is_stored_or_queued() {
    let h = Harness::new().await;
    h.open_session("c1").await;
    let over_length = message(&"x".repeat(8001));
    let over_128k = format!(
        r#"{{"type":"message","text":"{}"}}"#,
        "x".repeat(128 * 1024)
    );
    let cases = [
        ("{not json", "bad_request"),
        ("[]", "bad_request"),
        (r#"{"text":"no type"}"#, "bad_request"),
        (r#"{"type":"shout","text":"x"}"#, "bad_request"),
        (r#"{"type":"message"}"#, "bad_request"),
        (r#"{"type":"message","text":""}"#, "bad_request"),
        (r#"{"type":"message","text":" \n\t "}"#, "bad_request"),
        (
            r#"{"type":"message","text":"x","client_message_id":"nope"}"#,
            "bad_request",
        ),
        (over_length.as_str(), "too_large"),
        (over_128k.as_str(), "too_large"),
    ];
    for (frame, code) in cases {
        let answer = h.send("c1", frame).await;
        assert_eq!(answer["type"], "error", "{}", &frame[..frame.len().min(60)]);
        assert_eq!(answer["code"], code, "{}", &frame[..frame.len().min(60)]);
    }
    assert_nothing_stored_or_queued(&h).await;
    assert!(h.api.posts().is_empty(), "no typing for a refused frame");
    // The socket stays open: a good message still goes through.
    assert_eq!(h.send("c1", &message("fine")).await["type"], "ack");
}

#[tokio::test]
async fn ping_gets_pong_even_before_auth() {
    let h = Harness::new().await;
    h.connect("c1").await;
    assert_eq!(
        h.send("c1", r#"{"type":"ping"}"#).await,
        json!({ "type": "pong" })
    );
}

#[tokio::test]
async fn a_flood_from_one_connection_is_rate_limited() {
    let mut h = Harness::new().await;
    h.state.message.limits.connection = RateLimit {
        messages: 3,
        window_seconds: 60,
    };
    h.open_session("c1").await;
    h.open_session("c2").await;
    for i in 0..3 {
        assert_eq!(
            h.send("c1", &message(&format!("m{i}"))).await["type"],
            "ack"
        );
    }
    let limited = h.send("c1", &message("one too many")).await;
    assert_eq!(limited["code"], "rate_limited");
    assert_eq!(h.stored_messages().await, 3);
    assert_eq!(
        h.send("c2", &message("another socket")).await["type"],
        "ack",
        "others unaffected"
    );
}

#[tokio::test]
async fn disconnect_forgets_the_connection() {
    let h = Harness::new().await;
    h.open_session("c1").await;
    let response = Route::Disconnect
        .handle(&h.state, event("c1", "$disconnect", None, json!(null)))
        .await;
    assert_eq!(response.status_code, 200);
    assert!(h.connection("c1").await.is_none());
    assert_eq!(
        h.send("c1", &message("hi")).await["code"],
        "unauthenticated"
    );
}

#[tokio::test]
async fn a_gone_connection_is_forgotten_and_only_that_one() {
    let h = Harness::new().await;
    h.open_session("stale").await;
    h.open_session("live").await;
    // The browser went away without API Gateway's $disconnect reaching us yet.
    h.api.deletes();
    let stale = ConnectionId::parse("stale").unwrap();
    let live = ConnectionId::parse("live").unwrap();
    reqwest_delete(&h.api, "stale").await;

    let frame = ServerFrame::Typing {
        conversation_id: h.seed.conversation,
    };
    assert_eq!(
        h.state
            .edge()
            .post(&h.api.endpoint, &stale, &frame)
            .await
            .unwrap(),
        Posted::Gone
    );
    assert_eq!(
        h.state
            .edge()
            .post(&h.api.endpoint, &live, &frame)
            .await
            .unwrap(),
        Posted::Delivered
    );
    assert!(
        h.connection("stale").await.is_none(),
        "the stale one is forgotten"
    );
    assert!(h.connection("live").await.is_some(), "the live one stays");

    // The same through the message route: the sender's own stale socket goes, the message stays.
    h.open_session("leaving").await;
    reqwest_delete(&h.api, "leaving").await;
    assert_eq!(h.send("leaving", &message("bye")).await["type"], "ack");
    assert!(h.connection("leaving").await.is_none());
    assert_eq!(h.stored_messages().await, 1);
}

/// Closes a socket from the outside, as a browser tab would.
async fn reqwest_delete(api: &ManagementApi, connection: &str) {
    let delivery = shared::delivery::ManagementApi::new(sdk_config());
    use shared::delivery::Delivery;
    delivery
        .close(&api.endpoint, &ConnectionId::parse(connection).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_redis_queue_keeps_one_job_per_message_in_order() {
    let prefix = crate::helpers::redis_prefix();
    let queue = RedisQueue::new(&std::env::var("REDIS_URL").unwrap(), &prefix).unwrap();
    let h = Harness::new().await;
    h.open_session("c1").await;
    let mut jobs = Vec::new();
    for text in ["one", "two"] {
        h.send("c1", &message(text)).await;
    }
    for q in drain(&h.queue).await {
        jobs.push(serde_json::from_value::<Job>(q.body).unwrap());
    }
    for job in [&jobs[0], &jobs[0], &jobs[1], &jobs[0]] {
        queue.enqueue(job).await.unwrap();
    }
    let mut conn = queue.connection().await.unwrap();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(queue.stream_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let bodies: Vec<Job> = entries
        .ids
        .iter()
        .map(|e| Job::from_body(&e.get::<String>("body").unwrap()).unwrap())
        .collect();
    assert_eq!(bodies, vec![jobs[0].clone(), jobs[1].clone()]);
    assert_eq!(
        entries.ids[0].get::<String>("group").unwrap(),
        h.seed.conversation.to_string()
    );
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
    let answer = h.send(connection, &message(text)).await;
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    if !records.is_empty() {
        assert!(crate::orchestrator::run(state, records).await.is_empty());
    }
    answer
}

#[tokio::test]
async fn authorization_is_checked_on_every_message_and_every_delivery() {
    let h = Harness::new().await;
    let llm = crate::llm::FakeLlm::hello().await;
    let state = crate::orchestrator::orchestrator(&h, &llm);
    let user = h.seed.user;
    let admin = seed_user(&h.db, "root").await;
    // One tab with a token about to expire, another with a long one, and a platform admin.
    h.connect("short").await;
    let short = sign(&json!({ "sub": user, "role": "customer_operator", "exp": now() + 2 }));
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
    tokio::time::sleep(Duration::from_millis(3100)).await;
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
        h.send("long", &message("just before leaving")).await["type"],
        "ack"
    );
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    memberships::revoke(&mut tx, h.seed.tenant, user)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let records: Vec<_> = drain(&h.queue).await.iter().map(|q| q.record()).collect();
    assert!(crate::orchestrator::run(&state, records).await.is_empty());
    assert_eq!(responses(&h, "admin").len(), 4);
    assert_eq!(responses(&h, "short").len(), 2, "no reply after leaving");
    assert_eq!(responses(&h, "long").len(), 3, "no reply after leaving");
    for tab in ["short", "long"] {
        let refused = h.send(tab, &message("still here?")).await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
    }
}
