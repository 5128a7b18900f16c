//! `konstruct-local` as a real process ([`Local`], through `tests::stack::Server`), WebSocket
//! clients of it, a plain HTTP GET.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shared::domain::{ConversationId, Role};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use tests::services::{OwnRedis, free_port};
use tests::stack::Server;

use crate::helpers::{Seed, TestDb, redis_prefix, token};

pub struct Env {
    pub database_url: String,
    pub redis_url: String,
    pub prefix: String,
}

impl Env {
    pub fn new(test: &TestDb) -> Self {
        Self {
            database_url: test.url.clone(),
            redis_url: std::env::var("REDIS_URL").unwrap(),
            prefix: redis_prefix(),
        }
    }
}

/// `konstruct-local` as a process of its own (killed when dropped), on the test's database.
pub struct Local;

impl Local {
    pub async fn start(env: &Env, args: &[&str]) -> Server {
        Self::start_with(env, args, &[]).await
    }

    /// With an OpenAI-compatible model at `base_url` for the agents that use one.
    pub async fn start_with_model(env: &Env, args: &[&str], base_url: &str) -> Server {
        let model = [("OPENAI_BASE_URL", base_url), ("OPENAI_API_KEY", "sk-test")];
        Self::start_with(env, args, &model).await
    }

    /// With these variables besides the test's own.
    pub async fn start_with(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Server {
        let bin = std::env::var("KONSTRUCT_LOCAL_BIN").expect(
            "KONSTRUCT_LOCAL_BIN is not set: run the tests through `make test`, which builds it",
        );
        Server::start(
            &bin,
            &env.database_url,
            &env.redis_url,
            &env.prefix,
            args,
            vars,
        )
        .await
        .expect("konstruct-local starts")
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn open(address: &str, conversation: ConversationId) -> Socket {
    let url = format!("ws://{address}/chat/ws/{conversation}");
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

pub async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON frame, or `None` when the socket closed or nothing came within `wait`.
pub async fn next(socket: &mut Socket, wait: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(wait, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

pub async fn expect(socket: &mut Socket, kind: &str) -> Value {
    let frame = next(socket, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("expected a {kind} frame, got nothing"));
    assert_eq!(frame["type"], kind, "{frame}");
    frame
}

pub async fn authenticated(address: &str, seed: &Seed, conversation: ConversationId) -> Socket {
    let mut socket = open(address, conversation).await;
    send(
        &mut socket,
        json!({ "type": "auth", "token": token(seed.user, Role::CustomerOperator) }),
    )
    .await;
    expect(&mut socket, "auth_ok").await;
    socket
}

/// Sends a message and takes `typing`, `ack` and `response` in that order; returns the response.
pub async fn converse(socket: &mut Socket, text: &str) -> Value {
    send(socket, json!({ "type": "message", "text": text })).await;
    expect(socket, "typing").await;
    expect(socket, "ack").await;
    expect(socket, "response").await
}

pub async fn http_get(address: &str, path: &str, bearer: &str) -> Value {
    let response = reqwest_like_get(address, path, bearer).await;
    serde_json::from_str(&response).unwrap()
}

/// A minimal HTTP/1.1 GET, to keep the tests on the server's real socket without another client.
async fn reqwest_like_get(address: &str, path: &str, bearer: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
