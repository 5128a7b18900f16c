//! AWS as the tests meet it: the real SDK clients against moto's SQS (started by `make test`)
//! and against a connection-management API server that speaks the wire format.
//!
//! moto's own management API never answers 410 and keeps nothing it was sent, so it cannot
//! show what matters; [`ManagementApi`] here answers `POST/GET/DELETE /{stage}/@connections/{id}`
//! like API Gateway (410 `GoneException` for a connection that is not open, 413 for data over
//! 128 KiB, 429 `LimitExceededException` past a quota when one is set) and records what it
//! received.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use shared::queue::SqsQueue;
use uuid::Uuid;

pub fn sdk_config() -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
            Credentials::new("testing", "testing", None, None, "tests"),
        ))
        .build()
}

/// A FIFO queue of its own on moto, as the stack's would be (no content-based deduplication).
pub async fn fifo_queue() -> SqsQueue {
    let endpoint = std::env::var("MOTO_ENDPOINT")
        .expect("MOTO_ENDPOINT is not set: run the tests through `make test`, which starts moto");
    let config = aws_sdk_sqs::config::Builder::from(&sdk_config())
        .endpoint_url(endpoint)
        .build();
    let client = aws_sdk_sqs::Client::from_conf(config);
    let queue_url = client
        .create_queue()
        .queue_name(format!("test-{}.fifo", Uuid::new_v4().simple()))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::ContentBasedDeduplication, "false")
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .expect("create a FIFO queue on moto")
        .queue_url
        .unwrap();
    SqsQueue { client, queue_url }
}

/// A message taken from a queue, with the FIFO attributes that matter.
#[derive(Debug)]
pub struct Queued {
    pub message_id: String,
    pub body: Value,
    pub group_id: String,
    pub dedup_id: String,
    /// The X-Ray trace header the route sent it with, if any.
    pub trace: Option<String>,
}

/// Everything on the queue, taken off it: each batch is deleted once read, since a FIFO queue
/// hands out no more of a message group while some of it is in flight.
pub async fn drain(queue: &SqsQueue) -> Vec<Queued> {
    let mut all = Vec::new();
    loop {
        let received = queue
            .client
            .receive_message()
            .queue_url(&queue.queue_url)
            .max_number_of_messages(10)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        let messages = received.messages.unwrap_or_default();
        if messages.is_empty() {
            return all;
        }
        for m in messages {
            queue
                .client
                .delete_message()
                .queue_url(&queue.queue_url)
                .receipt_handle(m.receipt_handle.clone().unwrap())
                .send()
                .await
                .unwrap();
            let attrs = m.attributes.unwrap_or_default();
            all.push(Queued {
                message_id: m.message_id.unwrap(),
                body: serde_json::from_str(m.body.as_deref().unwrap()).unwrap(),
                group_id: attrs[&MessageSystemAttributeName::MessageGroupId].clone(),
                dedup_id: attrs[&MessageSystemAttributeName::MessageDeduplicationId].clone(),
                trace: attrs
                    .get(&MessageSystemAttributeName::AwsTraceHeader)
                    .cloned(),
            });
        }
    }
}

impl Queued {
    /// The record the orchestrator's SQS event source would hand over.
    pub fn record(&self) -> aws_lambda_events::sqs::SqsMessage {
        let mut record = aws_lambda_events::sqs::SqsMessage::default();
        record.message_id = Some(self.message_id.clone());
        record.body = Some(self.body.to_string());
        record
            .attributes
            .insert("MessageGroupId".into(), self.group_id.clone());
        record
            .attributes
            .insert("MessageDeduplicationId".into(), self.dedup_id.clone());
        if let Some(trace) = &self.trace {
            record
                .attributes
                .insert(shared::queue::TRACE_ATTRIBUTE.into(), trace.clone());
        }
        record
    }
}

/// How many messages the queue holds right now.
pub async fn depth(queue: &SqsQueue) -> u64 {
    let attrs = queue
        .client
        .get_queue_attributes()
        .queue_url(&queue.queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    attrs[&QueueAttributeName::ApproximateNumberOfMessages]
        .parse()
        .unwrap()
}

/// One request the management API received.
#[derive(Debug, Clone)]
pub struct Post {
    pub connection: String,
    pub frame: Value,
    /// When it was accepted.
    pub at: std::time::Instant,
    /// What the probe saw when the frame arrived.
    pub probe: Value,
}

type Probe = Arc<dyn Fn() -> BoxFuture<'static, Value> + Send + Sync>;

#[derive(Default)]
struct Recorded {
    open: HashSet<String>,
    posts: Vec<Post>,
    deletes: Vec<String>,
    /// Connections whose posts never get an answer.
    stalled: HashSet<String>,
    /// How long every post takes.
    latency: std::time::Duration,
    in_flight: usize,
    max_in_flight: usize,
    /// The account's `@connections` quota, when set: posts past it are answered 429.
    quota: Option<Quota>,
    throttled: usize,
    /// Connections whose next posts are answered 429, and how many.
    refusals: std::collections::HashMap<String, usize>,
}

/// A token bucket, as API Gateway meters an account's requests: `rate` a second, up to
/// `burst` at once.
#[derive(Debug, Clone, Copy)]
struct Quota {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl Quota {
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// API Gateway's limit on a posted frame's data.
const MAX_POST_BYTES: usize = 128 * 1024;

/// Counts a post in flight until it is answered or abandoned.
struct InFlight(Arc<Mutex<Recorded>>);

impl InFlight {
    fn start(recorded: &Arc<Mutex<Recorded>>) -> Self {
        let mut r = recorded.lock().unwrap();
        r.in_flight += 1;
        r.max_in_flight = r.max_in_flight.max(r.in_flight);
        Self(recorded.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap().in_flight -= 1;
    }
}

#[derive(Clone)]
pub struct ManagementApi {
    /// `http://127.0.0.1:{port}/{stage}`, what `WS_MANAGEMENT_ENDPOINT` would be.
    pub endpoint: String,
    recorded: Arc<Mutex<Recorded>>,
    probe: Arc<Mutex<Option<Probe>>>,
}

impl ManagementApi {
    pub async fn start() -> Self {
        let recorded: Arc<Mutex<Recorded>> = Arc::default();
        let probe: Arc<Mutex<Option<Probe>>> = Arc::default();
        let app = Router::new()
            .route(
                "/{stage}/@connections/{id}",
                post(post_to_connection)
                    .get(get_connection)
                    .delete(delete_connection),
            )
            .with_state((recorded.clone(), probe.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            endpoint: format!("http://{address}/test"),
            recorded,
            probe,
        }
    }

    /// Marks a connection as open; posts to any other id are answered 410.
    pub fn open(&self, connection: &str) {
        self.recorded
            .lock()
            .unwrap()
            .open
            .insert(connection.to_owned());
    }

    /// The socket closes: posts to it are answered 410 from now on.
    pub fn close(&self, connection: &str) {
        self.recorded.lock().unwrap().open.remove(connection);
    }

    /// Runs `probe` as each post arrives and records what it returns.
    pub fn probe_with(
        &self,
        probe: impl Fn() -> BoxFuture<'static, Value> + Send + Sync + 'static,
    ) {
        *self.probe.lock().unwrap() = Some(Arc::new(probe));
    }

    pub fn posts(&self) -> Vec<Post> {
        self.recorded.lock().unwrap().posts.clone()
    }

    pub fn frames_to(&self, connection: &str) -> Vec<Value> {
        self.posts()
            .into_iter()
            .filter(|p| p.connection == connection)
            .map(|p| p.frame)
            .collect()
    }

    pub fn deletes(&self) -> Vec<String> {
        self.recorded.lock().unwrap().deletes.clone()
    }

    /// Posts to this connection are never answered (a socket stuck on API Gateway's side).
    pub fn stall(&self, connection: &str) {
        self.recorded
            .lock()
            .unwrap()
            .stalled
            .insert(connection.to_owned());
    }

    /// Every post takes this long to answer.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.recorded.lock().unwrap().latency = latency;
    }

    /// Meters posts as API Gateway meters an account: `rate` a second with a `burst`; a post
    /// past it is answered 429 `LimitExceededException`, and nothing is recorded.
    pub fn set_quota(&self, rate: f64, burst: f64) {
        self.recorded.lock().unwrap().quota = Some(Quota {
            rate,
            burst,
            tokens: burst,
            at: std::time::Instant::now(),
        });
    }

    /// Answers the next `n` posts to this connection 429 `LimitExceededException`, as the
    /// quota would (counted in [`Self::throttled`]).
    pub fn refuse_next(&self, connection: &str, n: usize) {
        self.recorded
            .lock()
            .unwrap()
            .refusals
            .insert(connection.to_owned(), n);
    }

    /// Posts answered 429 so far.
    pub fn throttled(&self) -> usize {
        self.recorded.lock().unwrap().throttled
    }

    /// Starts counting [`Self::max_in_flight`] afresh.
    pub fn reset_max_in_flight(&self) {
        let mut r = self.recorded.lock().unwrap();
        r.max_in_flight = r.in_flight;
    }

    /// The most posts that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.recorded.lock().unwrap().max_in_flight
    }
}

type ApiState = (Arc<Mutex<Recorded>>, Arc<Mutex<Option<Probe>>>);

fn gone() -> Response {
    (
        StatusCode::GONE,
        [("x-amzn-ErrorType", "GoneException")],
        axum::Json(json!({ "message": null })),
    )
        .into_response()
}

async fn post_to_connection(
    State((recorded, probe)): State<ApiState>,
    Path((_stage, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::start(&recorded);
    let (open, stalled, latency, allowed) = {
        let mut r = recorded.lock().unwrap();
        let refused = match r.refusals.get_mut(&id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        let allowed = !refused && r.quota.as_mut().is_none_or(Quota::take);
        if !allowed {
            r.throttled += 1;
        }
        (
            r.open.contains(&id),
            r.stalled.contains(&id),
            r.latency,
            allowed,
        )
    };
    if !allowed {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("x-amzn-ErrorType", "LimitExceededException")],
            axum::Json(json!({ "message": "Too Many Requests" })),
        )
            .into_response();
    }
    if body.len() > MAX_POST_BYTES {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [("x-amzn-ErrorType", "PayloadTooLargeException")],
            axum::Json(json!({ "message": "Message too long" })),
        )
            .into_response();
    }
    if !open {
        return gone();
    }
    tokio::time::sleep(if stalled {
        std::time::Duration::from_secs(3600)
    } else {
        latency
    })
    .await;
    let probe = probe.lock().unwrap().clone();
    let seen = match probe {
        Some(probe) => probe().await,
        None => Value::Null,
    };
    let frame = serde_json::from_slice(&body)
        .unwrap_or(Value::String(String::from_utf8_lossy(&body).into_owned()));
    recorded.lock().unwrap().posts.push(Post {
        connection: id,
        frame,
        at: std::time::Instant::now(),
        probe: seen,
    });
    StatusCode::OK.into_response()
}

async fn get_connection(
    State((recorded, _)): State<ApiState>,
    Path((_stage, id)): Path<(String, String)>,
) -> Response {
    if !recorded.lock().unwrap().open.contains(&id) {
        return gone();
    }
    axum::Json(json!({
        "ConnectedAt": "2026-11-25T23:00:00Z",
        "LastActiveAt": "2026-11-25T23:00:00Z",
        "Identity": { "SourceIp": "127.0.0.1", "UserAgent": "tests" }
    }))
    .into_response()
}

async fn delete_connection(
    State((recorded, _)): State<ApiState>,
    Path((_stage, id)): Path<(String, String)>,
) -> Response {
    let mut recorded = recorded.lock().unwrap();
    if !recorded.open.remove(&id) {
        return gone();
    }
    recorded.deletes.push(id);
    StatusCode::NO_CONTENT.into_response()
}
