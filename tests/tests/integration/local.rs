//! The local runtime end to end: `konstruct-local` started as a real process, real WebSocket
//! clients, real Postgres and Redis.

use std::process::Stdio;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shared::db::agents::Provider;
use shared::db::{Db, Scope, conversations};
use shared::delivery::{Delivery, ManagementApi, Posted};
use shared::domain::{ConnectionId, ConversationId, Role};
use shared::frame::ServerFrame;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::aws::sdk_config;
use tests::stack::Server;

use crate::helpers::{SECRET, Seed, TestDb, redis_prefix, seed, seed_agent_with, token};

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

async fn http_get(address: &str, path: &str, bearer: &str) -> Value {
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

#[tokio::test]
async fn connect_auth_message_gives_typing_ack_response_and_history() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let mut socket = open(&local.address, s.conversation).await;
    send(
        &mut socket,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    let ok = expect(&mut socket, "auth_ok").await;
    assert_eq!(ok["conversation_id"], json!(s.conversation));

    send(&mut socket, json!({ "type": "message", "text": "hello local", "client_message_id": uuid::Uuid::new_v4() })).await;
    expect(&mut socket, "typing").await;
    let ack = expect(&mut socket, "ack").await;
    let response = expect(&mut socket, "response").await;
    assert_eq!(response["text"], "Echo: hello local");
    assert_eq!(response["reply_to"], ack["message_id"]);

    let history = http_get(
        &local.address,
        &format!("/api/portal/chat/conversations/{}/messages", s.conversation),
        &token(s.user, Role::CustomerOperator),
    )
    .await;
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(
        (history[0]["role"].as_str(), history[0]["content"].as_str()),
        (Some("user"), Some("hello local"))
    );
    assert_eq!(history[1]["content"], "Echo: hello local");

    // Pings are answered, unknown frames get an error, and the socket stays open.
    send(&mut socket, json!({ "type": "ping" })).await;
    expect(&mut socket, "pong").await;
    send(&mut socket, json!({ "type": "shout" })).await;
    assert_eq!(expect(&mut socket, "error").await["code"], "bad_request");
    send(&mut socket, json!({ "type": "ping" })).await;
    expect(&mut socket, "pong").await;
    local.stop().await;
}

#[tokio::test]
async fn both_tabs_get_the_reply_and_another_conversation_gets_nothing() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let other_agent = seed_agent_with(&db, s.tenant, "other", Provider::Echo, "").await;
    let other = other_conversation(&db, &s, other_agent).await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let mut tab1 = authenticated(&local.address, &s, s.conversation).await;
    let mut tab2 = authenticated(&local.address, &s, s.conversation).await;
    let mut elsewhere = authenticated(&local.address, &s, other).await;

    send(&mut tab1, json!({ "type": "message", "text": "to both" })).await;
    expect(&mut tab1, "typing").await;
    expect(&mut tab1, "ack").await;
    assert_eq!(expect(&mut tab1, "response").await["text"], "Echo: to both");
    let shown = expect(&mut tab2, "message").await;
    assert_eq!(
        (shown["content"].as_str(), shown["role"].as_str()),
        (Some("to both"), Some("user")),
        "the other tab shows the message: {shown}"
    );
    assert_eq!(expect(&mut tab2, "response").await["text"], "Echo: to both");
    assert_eq!(next(&mut elsewhere, Duration::from_millis(700)).await, None);
    local.stop().await;
}

async fn other_conversation(db: &Db, s: &Seed, agent: shared::domain::AgentId) -> ConversationId {
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let id = conversations::get_or_create(&mut tx, s.tenant, agent, s.user)
        .await
        .unwrap()
        .row
        .id;
    tx.commit().await.unwrap();
    id
}

#[tokio::test]
async fn gateway_and_worker_as_separate_processes_meet_through_redis() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let env = Env::new(&test);
    let gateway = Local::start(&env, &["serve", "--listen", "127.0.0.1:0", "--no-worker"]).await;
    let mut socket = authenticated(&gateway.address, &s, s.conversation).await;
    send(&mut socket, json!({ "type": "message", "text": "queued" })).await;
    expect(&mut socket, "typing").await;
    expect(&mut socket, "ack").await;
    assert_eq!(
        next(&mut socket, Duration::from_millis(700)).await,
        None,
        "no worker yet"
    );

    let worker = Local::start(&env, &["worker", "--consumer", "separate"]).await;
    let response = expect(&mut socket, "response").await;
    assert_eq!(response["text"], "Echo: queued");
    worker.stop().await;
    gateway.stop().await;
}

#[tokio::test]
async fn the_management_api_reaches_live_sockets_and_410s_unknown_ones() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let mut socket = authenticated(&local.address, &s, s.conversation).await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let rows = shared::db::message_path::recipients(&mut tx, s.tenant, s.conversation)
        .await
        .unwrap();
    drop(tx);
    assert_eq!(rows.len(), 1);
    let endpoint = format!("http://{}", local.address);
    assert_eq!(
        rows[0].endpoint, endpoint,
        "rows name the gateway as their endpoint"
    );

    let api = ManagementApi::new(sdk_config());
    let frame = ServerFrame::Typing {
        conversation_id: s.conversation,
    };
    assert_eq!(
        api.post(&endpoint, &rows[0].connection_id, &frame)
            .await
            .unwrap(),
        Posted::Delivered
    );
    expect(&mut socket, "typing").await;
    let unknown = ConnectionId::parse("nobody-here").unwrap();
    assert_eq!(
        api.post(&endpoint, &unknown, &frame).await.unwrap(),
        Posted::Gone
    );
    api.close(&endpoint, &rows[0].connection_id).await.unwrap();
    assert_eq!(
        next(&mut socket, Duration::from_secs(2)).await,
        None,
        "closed"
    );
    local.stop().await;
}

#[tokio::test]
async fn a_socket_that_does_not_authenticate_in_time_is_closed() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(
        &Env::new(&test),
        &["serve", "--listen", "127.0.0.1:0", "--auth-timeout", "1"],
    )
    .await;
    let mut socket = open(&local.address, s.conversation).await;
    let started = std::time::Instant::now();
    assert_eq!(next(&mut socket, Duration::from_secs(5)).await, None);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed by the timeout, not the wait"
    );
    local.stop().await;
}

#[tokio::test]
async fn a_bad_conversation_id_refuses_the_handshake() {
    let (test, _db) = TestDb::migrated().await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/chat/ws/not-a-uuid", local.address))
            .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected an HTTP 400, got {other:?}"),
    }
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws", local.address)).await;
    assert!(
        matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 400)
    );
    local.stop().await;
}

#[tokio::test]
async fn replies_still_arrive_after_redis_restarts() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let redis = OwnRedis::start().await;
    let mut env = Env::new(&test);
    env.redis_url = redis.url();
    let local = Local::start(&env, &["serve", "--listen", "127.0.0.1:0"]).await;
    let mut socket = authenticated(&local.address, &s, s.conversation).await;
    send(&mut socket, json!({ "type": "message", "text": "before" })).await;
    expect(&mut socket, "typing").await;
    expect(&mut socket, "ack").await;
    assert_eq!(
        expect(&mut socket, "response").await["text"],
        "Echo: before"
    );

    let redis = redis.restart().await;

    // The first attempts may meet a connection that has not noticed the restart yet; the
    // client sees an error frame and sends again, as the page does.
    let mut answered = None;
    for attempt in 0..20 {
        send(
            &mut socket,
            json!({ "type": "message", "text": format!("after {attempt}") }),
        )
        .await;
        let mut acked = false;
        while let Some(frame) = next(&mut socket, Duration::from_secs(3)).await {
            match frame["type"].as_str() {
                Some("ack") => acked = true,
                Some("response") => {
                    answered = Some(frame);
                    break;
                }
                Some("error") => break,
                _ => {}
            }
        }
        if answered.is_some() || acked {
            if answered.is_none() {
                answered = Some(expect(&mut socket, "response").await);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let answered = answered.expect("a message after the restart got its reply");
    assert!(
        answered["text"]
            .as_str()
            .unwrap()
            .starts_with("Echo: after"),
        "{answered}"
    );
    local.stop().await;
    drop(redis);
}

/// A Redis server of this test's own, so restarting it disturbs no other test.
pub struct OwnRedis {
    child: Child,
    port: u16,
    persistent: bool,
}

impl OwnRedis {
    /// One without persistence, as `make dev` runs it: a restart loses what it held.
    pub async fn start() -> Self {
        Self::on(free_port(), false).await
    }

    /// One that writes every command to its append-only file, so a restart keeps the data.
    pub async fn start_persistent() -> Self {
        Self::on(free_port(), true).await
    }

    async fn on(port: u16, persistent: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("konstruct-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let appendonly = if persistent { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", appendonly, "--appendfsync", "always"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            port,
            persistent,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(mut self) -> Self {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        Self::on(self.port, self.persistent).await
    }
}

/// Runs a script of `tests/browser/` in Node (headless Chromium through playwright-core) and
/// fails the test with everything it said unless it succeeds.
async fn browser_script(script: &str, args: &[&str]) {
    let node_path = std::env::var("NODE_PATH").expect(
        "NODE_PATH is not set: run the tests through `make test`, which installs playwright-core",
    );
    let output = Command::new("node")
        .arg(format!("{}/browser/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .env("NODE_PATH", node_path)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run node");
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_chat_page_talks_to_the_agent_in_headless_chromium() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let url = format!(
        "http://{}/?conversation={}#token={}",
        local.address,
        s.conversation,
        token(s.user, Role::CustomerOperator)
    );
    let screenshot = std::env::temp_dir().join(format!("chat-page-{}.png", s.conversation));
    browser_script("chat-page.cjs", &[&url, &screenshot.to_string_lossy()]).await;
    assert!(screenshot.exists());
    local.stop().await;
}

/// Runs `tests/browser/resume.cjs` (in `mode`, if any) against konstruct-local (with these
/// extra `serve` arguments) and a model that streams each reply over about two seconds; returns
/// how many times each user message was stored and answered, by text, in `seq` order.
async fn resume_in_chromium(serve: &[&str], mode: Option<&str>) -> Vec<(String, i64, i64)> {
    use crate::llm::{FakeLlm, Reply, last_user_text};

    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let llm = FakeLlm::start(|request, _| {
        let words = format!("Streaming answer to: {}.", last_user_text(request));
        let pieces: Vec<String> = words.split_inclusive(' ').map(str::to_owned).collect();
        let gap = Duration::from_millis(2000 / pieces.len().max(1) as u64);
        Reply::Stream(pieces, gap)
    })
    .await;
    let conversation = crate::helpers::model_conversation(&db, &s).await;
    let env = Env::new(&test);
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(serve);
    let local = Local::start_with_model(&env, &args, &llm.base_url).await;
    let url = format!(
        "http://{}/?conversation={}#token={}",
        local.address,
        conversation,
        token(s.user, Role::CustomerOperator)
    );
    let mut args = vec![url.as_str()];
    args.extend(mode);
    browser_script("resume.cjs", &args).await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let counts = sqlx::query_as(
        "select q.content, count(distinct q.id),
                (select count(*) from web_conversation_messages r where r.reply_to = any(array_agg(q.id)))
         from web_conversation_messages q
         where q.conversation_id = $1 and q.role = 'user'
         group by q.content order by min(q.seq)",
    )
    .bind(conversation)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    local.stop().await;
    counts
}

fn once_each(questions: &[&str]) -> Vec<(String, i64, i64)> {
    questions.iter().map(|q| (q.to_string(), 1, 1)).collect()
}

/// The page and its client module (`/konstruct-chat.js`) across a socket dropped mid-stream, a
/// second tab and a reload mid-stream, a message typed while disconnected, one whose `ack` was
/// lost, and `cancel`: every message and every reply shown exactly once, each stored once.
#[tokio::test]
async fn the_chat_page_resumes_across_drops_reloads_and_tabs_in_headless_chromium() {
    let counts = resume_in_chromium(&[], None).await;
    assert_eq!(
        counts,
        once_each(&[
            "first",
            "second",
            "third",
            "offline",
            "unacknowledged",
            "stop me"
        ]),
        "each stored once, each answered once"
    );
}

/// The same page against a gateway that cuts every socket after 2 s (API Gateway's 2-hour
/// limit, shortened) and any socket quiet for 1 s (its idle timeout): replies stream across
/// the cuts and the page resumes each time.
#[tokio::test]
async fn the_chat_page_resumes_across_the_connection_limit_and_the_idle_cut() {
    let serve = ["--max-connection", "2", "--idle-timeout", "1"];
    let counts = resume_in_chromium(&serve, Some("cuts")).await;
    assert_eq!(
        counts,
        once_each(&["across the cuts", "and again", "once more"])
    );
}

/// The streaming benchmark's client against konstruct-local (what `make bench` times): each
/// reply's chunks, applied by offset, are its text, and the first chunk comes before the reply
/// ends.
#[tokio::test]
async fn streamed_replies_reach_one_user_whole_one_after_another() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let model = tests::streaming::start_model(8, Duration::from_millis(30))
        .await
        .unwrap();
    let conversation = crate::helpers::model_conversation(&db, &s).await;
    let env = Env::new(&test);
    let local = Local::start_with_model(&env, &["serve", "--listen", "127.0.0.1:0"], &model).await;
    let seat = tests::stack::Seat {
        tenant: s.tenant,
        conversation,
        token: token(s.user, Role::CustomerOperator),
    };
    let seen = tests::streaming::one_after_another(&local.address, &seat, 3)
        .await
        .unwrap();
    assert_eq!(seen.replies, 3);
    assert_eq!(seen.first_chunk.len(), 3, "every reply streamed");
    assert!(seen.chunk_gap.len() >= 3, "in several chunks");
    assert!(
        seen.first_chunk.max() < seen.reply.min(),
        "the first chunk before the end"
    );
    local.stop().await;
}

/// The close code the server sends next, skipping other frames; `None` when nothing closes the
/// socket within `wait`.
async fn close_code(socket: &mut Socket, wait: Duration) -> Option<u16> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) | Err(_) => return None,
        }
    }
}

/// What clients can tell of API Gateway, the local gateway does too: the connection lifetime
/// and the idle timeout (shortened here), and 1009 for a frame over 32 KiB.
#[tokio::test]
async fn the_local_gateway_closes_sockets_as_api_gateway_does() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(
        &Env::new(&test),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-connection",
            "3",
            "--idle-timeout",
            "1",
        ],
    )
    .await;

    // Kept busy, it lives until its lifetime ends.
    let mut busy = authenticated(&local.address, &s, s.conversation).await;
    let started = tokio::time::Instant::now();
    let pinger = async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if busy
                .send(Message::Text(json!({ "type": "ping" }).to_string().into()))
                .await
                .is_err()
            {
                break;
            }
            if let Some(code) = close_code(&mut busy, Duration::from_millis(200)).await {
                return code;
            }
        }
        0
    };
    let mut quiet = authenticated(&local.address, &s, s.conversation).await;
    let (busy_code, quiet_code) =
        tokio::join!(pinger, close_code(&mut quiet, Duration::from_secs(5)));
    assert_eq!(quiet_code, Some(1001), "closed when idle");
    assert_eq!(busy_code, 1001, "closed at the end of its lifetime");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // A frame over 32 KiB closes the socket with 1009; one under it is answered.
    let mut socket = authenticated(&local.address, &s, s.conversation).await;
    let fits = json!({ "type": "message", "text": "x".repeat(8000), "pad": "y".repeat(20_000) });
    send(&mut socket, fits).await;
    expect(&mut socket, "typing").await;
    let too_big = json!({ "type": "message", "text": "x", "pad": "y".repeat(40 * 1024) });
    send(&mut socket, too_big).await;
    assert_eq!(
        close_code(&mut socket, Duration::from_secs(5)).await,
        Some(1009)
    );
    local.stop().await;
}

/// `cargo lambda watch` and the functions it starts, stopped together when dropped.
struct CargoLambda {
    child: Child,
}

impl Drop for CargoLambda {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn routes_can_run_as_real_lambdas_under_cargo_lambda_watch() {
    let cargo_lambda = std::env::var("CARGO_LAMBDA").expect(
        "CARGO_LAMBDA is not set: run the tests through `make test`, which installs cargo-lambda",
    );
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let env = Env::new(&test);
    let (invoke_port, gateway_port) = (free_port(), free_port());
    let vars = [
        "KONSTRUCT_MODE=local".to_owned(),
        format!("DATABASE_URL={}", env.database_url),
        format!("REDIS_URL={}", env.redis_url),
        format!("KONSTRUCT_REDIS_PREFIX={}", env.prefix),
        format!("PORTAL_JWT_SECRET={SECRET}"),
        format!("WS_MANAGEMENT_ENDPOINT=http://127.0.0.1:{gateway_port}"),
        "AWS_REGION=us-east-1".to_owned(),
        "AWS_ACCESS_KEY_ID=local".to_owned(),
        "AWS_SECRET_ACCESS_KEY=local".to_owned(),
    ];
    let mut command = Command::new(cargo_lambda);
    command
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["lambda", "watch", "--quiet", "--ignore-changes"])
        .args([
            "--invoke-address",
            "127.0.0.1",
            "--invoke-port",
            &invoke_port.to_string(),
        ])
        .args(vars.iter().flat_map(|v| ["--env-var", v.as_str()]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let _lambdas = CargoLambda {
        child: command.spawn().expect("start cargo lambda watch"),
    };
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", invoke_port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let gateway = Local::start(
        &env,
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{gateway_port}"),
            "--lambda-endpoint",
            &format!("http://127.0.0.1:{invoke_port}"),
        ],
    )
    .await;
    // Each function compiles on its first invocation: be patient with the handshake.
    let url = format!("ws://{}/chat/ws/{}", gateway.address, s.conversation);
    let (mut socket, _) = tokio::time::timeout(
        Duration::from_secs(300),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("ws-connect answered")
    .expect("connected through ws-connect");
    send(
        &mut socket,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    let ok = next(&mut socket, Duration::from_secs(300))
        .await
        .expect("ws-auth answered");
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    send(
        &mut socket,
        json!({ "type": "message", "text": "via cargo lambda" }),
    )
    .await;
    let mut seen = Vec::new();
    while let Some(frame) = next(&mut socket, Duration::from_secs(300)).await {
        seen.push(frame["type"].as_str().unwrap_or_default().to_owned());
        if frame["type"] == "response" {
            assert_eq!(frame["text"], "Echo: via cargo lambda");
            break;
        }
    }
    assert_eq!(
        seen,
        vec!["typing", "ack", "response"],
        "typing came from ws-message through the management API"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn an_expired_or_removed_user_gets_no_more_frames_and_may_authenticate_again() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let short = crate::helpers::sign(
        &json!({ "sub": s.user, "role": "customer_operator", "exp": crate::helpers::now() + 2 }),
    );
    let mut expiring = open(&local.address, s.conversation).await;
    send(&mut expiring, json!({ "type": "auth", "token": short })).await;
    expect(&mut expiring, "auth_ok").await;
    let mut other = authenticated(&local.address, &s, s.conversation).await;

    tokio::time::sleep(Duration::from_millis(3100)).await;
    send(
        &mut expiring,
        json!({ "type": "message", "text": "expired?" }),
    )
    .await;
    let refused = expect(&mut expiring, "error").await;
    assert_eq!(refused["code"], "unauthenticated", "{refused}");
    assert_eq!(
        converse(&mut other, "from the other tab").await["text"],
        "Echo: from the other tab"
    );
    assert_eq!(
        next(&mut expiring, Duration::from_millis(500)).await,
        None,
        "the expired socket gets nothing"
    );

    // A fresh token on the same socket continues the session.
    send(
        &mut expiring,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    expect(&mut expiring, "auth_ok").await;
    assert_eq!(
        converse(&mut expiring, "renewed").await["text"],
        "Echo: renewed"
    );
    assert_eq!(expect(&mut other, "message").await["content"], "renewed");
    assert_eq!(
        expect(&mut other, "response").await["text"],
        "Echo: renewed"
    );

    // Removed from the tenant: refused, and nothing more arrives.
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    shared::db::memberships::revoke(&mut tx, s.tenant, s.user)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for socket in [&mut expiring, &mut other] {
        send(socket, json!({ "type": "message", "text": "still here?" })).await;
        assert_eq!(expect(socket, "error").await["code"], "forbidden");
    }
    local.stop().await;
}

/// A stall detector, not a benchmark: small frames one after another must not wait on a timer
/// (Nagle's algorithm against a delayed ACK costs ~40 ms a frame). The margin is wide: a debug
/// build on a busy machine answers well inside it.
#[tokio::test]
async fn an_idle_stack_answers_one_user_without_a_stall() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "127.0.0.1:0"]).await;
    let url = format!("ws://{}/chat/ws/{}", local.address, s.conversation);
    // As a browser does, the client disables Nagle on its side.
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .unwrap();
    send(
        &mut socket,
        json!({ "type": "auth", "token": token(s.user, Role::CustomerOperator) }),
    )
    .await;
    expect(&mut socket, "auth_ok").await;
    let mut round_trips = Vec::new();
    // Within the rate limit of 20 messages per 10 s.
    for n in 0..16 {
        let sent = std::time::Instant::now();
        converse(&mut socket, &format!("m{n}")).await;
        // The first message prepares the statements on fresh connections.
        if n > 0 {
            round_trips.push(sent.elapsed());
        }
    }
    round_trips.sort();
    let median = round_trips[round_trips.len() / 2];
    assert!(
        median < Duration::from_millis(25),
        "median message → response {median:?}: something waits on a timer ({round_trips:?})"
    );
    local.stop().await;
}

/// `token` and `seed-demo` are for development: a deployed configuration (`KONSTRUCT_MODE=aws`,
/// however spaced or cased) is refused before anything is done.
#[tokio::test]
async fn development_commands_refuse_a_deployed_configuration() {
    let bin = std::env::var("KONSTRUCT_LOCAL_BIN").unwrap();
    let user = uuid::Uuid::new_v4().to_string();
    for mode in ["aws", " aws ", "AWS"] {
        for args in [vec!["token", "--user", user.as_str()], vec!["seed-demo"]] {
            let output = Command::new(&bin)
                .args(&args)
                .env("KONSTRUCT_MODE", mode)
                .env("PORTAL_JWT_SECRET", SECRET)
                .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
                .stdin(Stdio::null())
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{args:?} ran with {mode:?}");
            assert!(
                stderr.contains("refusing") && stderr.contains("KONSTRUCT_MODE=aws"),
                "{args:?} with {mode:?}: {stderr}"
            );
            assert!(output.stdout.is_empty(), "nothing minted or seeded");
        }
    }
}

/// This machine's first address that is not loopback (`hostname -I`, from Debian's essential
/// `hostname` package).
fn network_address() -> std::net::IpAddr {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .expect("hostname -I");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .expect("this test needs a network interface besides loopback")
}

/// Listening beyond this machine, the server still takes the connection-management API (which
/// posts to any socket) from this machine only; the page and the REST API answer everyone.
#[tokio::test]
async fn the_management_api_answers_only_this_machine() {
    let (test, _db) = TestDb::migrated().await;
    let local = Local::start(&Env::new(&test), &["serve", "--listen", "0.0.0.0:0"]).await;
    let port = local.address.rsplit(':').next().unwrap().to_owned();
    let http = reqwest::Client::new();
    let post = |host: String| {
        http.post(format!(
            "http://{host}:{port}/@connections/AAAAAAAAAAAAAAAA"
        ))
        .body("{}")
        .send()
    };
    let here = post("127.0.0.1".into()).await.unwrap();
    assert_eq!(
        here.status(),
        410,
        "loopback: answered (that socket is gone)"
    );
    let elsewhere = network_address().to_string();
    let remote = post(elsewhere.clone()).await.unwrap();
    assert_eq!(remote.status(), 403, "from the network: refused");
    let page = http
        .get(format!("http://{elsewhere}:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "the page still answers");
    local.stop().await;
}
