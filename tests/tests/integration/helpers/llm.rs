//! Stand-ins for the hosted models, speaking their wire formats: an OpenAI-compatible
//! `/v1/chat/completions` (JSON, or server-sent events when `stream` is set) and Bedrock's
//! Converse (`POST /model/{modelId}/converse`, JSON). They record what they were asked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};

/// What the fake model does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Streams these pieces, `delay` apart, then `finish_reason: "stop"` and the usage (when
    /// asked for, as OpenAI does).
    Stream(Vec<String>, Duration),
    /// Streams these pieces and stops with `finish_reason: "length"` (the model's own limit).
    CutOff(Vec<String>),
    /// Answers with this status and an error body.
    Status(u16),
    /// Never answers within any sane timeout.
    Stall,
}

type Script = Arc<dyn Fn(&Value, usize) -> Reply + Send + Sync>;

#[derive(Clone)]
pub struct FakeLlm {
    /// `http://127.0.0.1:{port}/v1`, what `OPENAI_BASE_URL` would be; also Bedrock's endpoint
    /// without the `/v1`.
    pub base_url: String,
    pub endpoint: String,
    requests: Arc<Mutex<Vec<Value>>>,
    bedrock_requests: Arc<Mutex<Vec<(String, Value)>>>,
}

#[derive(Clone)]
struct Shared {
    script: Script,
    requests: Arc<Mutex<Vec<Value>>>,
    bedrock_requests: Arc<Mutex<Vec<(String, Value)>>>,
}

/// The text of the last user message in an OpenAI request.
pub fn last_user_text(request: &Value) -> String {
    request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

impl FakeLlm {
    pub async fn start(script: impl Fn(&Value, usize) -> Reply + Send + Sync + 'static) -> Self {
        let shared = Shared {
            script: Arc::new(script),
            requests: Arc::default(),
            bedrock_requests: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/model/{model}/converse", post(converse))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base_url: format!("http://{address}/v1"),
            endpoint: format!("http://{address}"),
            requests: shared.requests,
            bedrock_requests: shared.bedrock_requests,
        }
    }

    /// Answers every request by streaming "Hello world" in three pieces.
    pub async fn hello() -> Self {
        Self::start(|_, _| Reply::Stream(pieces(&["Hel", "lo ", "world"]), Duration::ZERO)).await
    }

    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }

    pub fn bedrock_requests(&self) -> Vec<(String, Value)> {
        self.bedrock_requests.lock().unwrap().clone()
    }
}

pub fn pieces(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

async fn completions(State(shared): State<Shared>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap();
    let index = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(request.clone());
        requests.len() - 1
    };
    match (shared.script)(&request, index) {
        Reply::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            // As some servers do: the error echoes the key and the URL it was called on.
            axum::Json(json!({ "error": {
                "message": "scripted failure for key sk-test at http://model.internal/v1",
                "type": "server_error" } })),
        )
            .into_response(),
        Reply::CutOff(parts) => stream_response(&request, parts, Duration::ZERO, "length"),
        Reply::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Reply::Stream(parts, delay) if request["stream"] == true => {
            stream_response(&request, parts, delay, "stop")
        }
        Reply::Stream(parts, _) => axum::Json(json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": parts.concat() }, "finish_reason": "stop" }]
        }))
        .into_response(),
    }
}

async fn converse(
    State(shared): State<Shared>,
    Path(model): Path<String>,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap();
    let question = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"][0]["text"].as_str())
        .unwrap_or_default()
        .to_owned();
    shared
        .bedrock_requests
        .lock()
        .unwrap()
        .push((model, request));
    axum::Json(json!({
        "output": { "message": { "role": "assistant", "content": [{ "text": format!("Bedrock says: {question}") }] } },
        "stopReason": "end_turn",
        "usage": { "inputTokens": 12, "outputTokens": 5, "totalTokens": 17 },
        "metrics": { "latencyMs": 42 }
    }))
    .into_response()
}

/// Server-sent events as OpenAI streams them: one chunk per piece, a last chunk with the
/// finish reason, the usage when `stream_options.include_usage` asks for it, then `[DONE]`.
fn stream_response(
    request: &Value,
    parts: Vec<String>,
    delay: Duration,
    finish_reason: &'static str,
) -> Response {
    let completion_tokens = parts.len();
    let mut events: Vec<(Duration, Value)> = parts
        .into_iter()
        .map(|text| {
            let chunk = json!({
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "choices": [{ "index": 0, "delta": { "content": text }, "finish_reason": null }]
            });
            (delay, chunk)
        })
        .collect();
    events.push((
        Duration::ZERO,
        json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk",
                "choices": [{ "index": 0, "delta": {}, "finish_reason": finish_reason }] }),
    ));
    if request["stream_options"]["include_usage"] == true {
        events.push((
            Duration::ZERO,
            json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                    "usage": { "prompt_tokens": 21, "completion_tokens": completion_tokens,
                               "total_tokens": 21 + completion_tokens } }),
        ));
    }
    let events = futures::stream::iter(events.into_iter().map(Some).chain([None])).then(
        |event| async move {
            let data = match event {
                Some((delay, chunk)) => {
                    tokio::time::sleep(delay).await;
                    chunk.to_string()
                }
                None => "[DONE]".to_owned(),
            };
            Ok::<_, std::io::Error>(Bytes::from(format!("data: {data}\n\n")))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(events))
        .unwrap()
}
