//! `konstruct-local`'s gateway as API Gateway behaves where a client can tell: the
//! connection-management API (live sockets, 410 for unknown ones, this machine only), closing
//! sockets (no auth in time, a bad conversation id, limits), and routes as real Lambdas
//! under `cargo lambda watch`.

use std::process::Stdio;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use shared::db::Scope;
use shared::delivery::{Delivery, ManagementApi, Posted};
use shared::domain::{ConnectionId, Role};
use shared::frame::ServerFrame;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::aws::sdk_config;

use crate::helpers::local::free_port;
use crate::helpers::local::{Env, Local, Socket, authenticated, expect, next, open, send};
use crate::helpers::{SECRET, TestDb, seed, token};

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
