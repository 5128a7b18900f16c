//! How many times the message path waits on Postgres, counted on the wire: a proxy in front of
//! the test database sees every byte the functions send, and counts each time a client speaks
//! again after the server has answered (one round trip). A round trip that carries a statement
//! (a simple `Query`, or an extended-protocol batch with an `Execute`) is counted apart from a
//! bare `Sync`, which sqlx sends when a connection goes back to its pool, after the caller has
//! moved on.
//!
//! The budget: 3 statement round trips per message in AWS mode, from the ws-message invocation to
//! the last `PostToConnection`, with the echo agent and one socket (the accept, the job's read,
//! the reply's write: each one simple query, `Db::call`); and one per stored flush of a streamed
//! reply.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::agent::{Agents, Bedrock, Echo, OpenAi};
use shared::config::DatabaseConfig;
use shared::config::orchestrator::{OrchestratorSettings, OutputLimits, RetryPolicy};
use shared::db::Db;
use shared::db::agents::Provider;
use shared::delivery::{ConnectionsFanout, ManagementApi};
use shared::orchestrator::{ContextLimits, OrchestratorState};
use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::aws::sdk_config;
use crate::helpers::harness::Harness;
use crate::helpers::llm::{FakeLlm, Reply, pieces};
use crate::helpers::orchestrator::{conversation_with, records_for, run};

/// What the proxy counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Turns {
    /// Round trips that carried a statement.
    pub statements: usize,
    /// Round trips that prepared a statement without running it (once per statement and
    /// connection: sqlx caches prepared statements).
    pub prepares: usize,
    /// Round trips of a bare `Sync` (sqlx's check when a connection returns to its pool).
    pub bare: usize,
}

/// A TCP proxy to Postgres that counts round trips.
pub struct PgProxy {
    /// The database's URL through the proxy.
    pub url: String,
    turns: Arc<Mutex<Turns>>,
}

impl PgProxy {
    pub async fn start(database_url: &str) -> Self {
        let target: PgConnectOptions = database_url.parse().unwrap();
        let upstream = format!("{}:{}", target.get_host(), target.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let turns: Arc<Mutex<Turns>> = Arc::default();
        let counted = turns.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(relay(client, server, counted.clone()));
            }
        });
        // The test role needs no password (the test server trusts local connections).
        let url = format!(
            "postgres://{}@{address}/{}?sslmode=disable",
            target.get_username(),
            target.get_database().unwrap_or_default()
        );
        Self { url, turns }
    }

    pub fn take(&self) -> Turns {
        std::mem::take(&mut *self.turns.lock().unwrap())
    }
}

/// Relays one connection both ways; reads the client's messages to classify its turns.
async fn relay(client: TcpStream, server: TcpStream, turns: Arc<Mutex<Turns>>) {
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let server_answered = answered.clone();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // Marked before the client can see it, so its next words start a new turn.
                    server_answered.store(true, std::sync::atomic::Ordering::SeqCst);
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut parser = Parser::default();
    let mut buf = vec![0u8; 64 * 1024];
    // What the current turn has been counted as: 0 bare, 1 prepare, 2 statement.
    let mut turn = 0;
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if answered.swap(false, std::sync::atomic::Ordering::SeqCst) {
            turns.lock().unwrap().bare += 1;
            turn = 0;
        }
        for kind in parser.feed(&buf[..n]) {
            let rank = match kind {
                b'Q' | b'E' => 2,
                b'P' => 1,
                _ => 0,
            };
            if rank > turn {
                let mut turns = turns.lock().unwrap();
                match turn {
                    0 => turns.bare -= 1,
                    _ => turns.prepares -= 1,
                }
                match rank {
                    2 => turns.statements += 1,
                    _ => turns.prepares += 1,
                }
                turn = rank;
            }
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    down.abort();
}

/// Splits the client's byte stream into protocol messages: untyped ones until the startup
/// message, typed ones after.
#[derive(Default)]
struct Parser {
    pending: Vec<u8>,
    started: bool,
}

impl Parser {
    /// The type bytes of the messages completed by `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(bytes);
        let mut kinds = Vec::new();
        loop {
            let header = if self.started { 5 } else { 4 };
            if self.pending.len() < header {
                return kinds;
            }
            let at = header - 4;
            let len = u32::from_be_bytes(self.pending[at..at + 4].try_into().unwrap()) as usize;
            let total = at + len;
            if self.pending.len() < total {
                return kinds;
            }
            if self.started {
                kinds.push(self.pending[0]);
            } else {
                let code = u32::from_be_bytes(self.pending[4..8].try_into().unwrap());
                // The protocol version 3.0 startup message; SSL and GSS requests come before it.
                self.started = code == 196_608;
            }
            self.pending.drain(..total);
        }
    }
}

/// The functions' own pool (two connections, as a Lambda has) through the proxy, and the
/// message route and orchestrator on it, in AWS mode.
async fn functions_through(proxy: &PgProxy, h: &mut Harness, llm: &FakeLlm) -> OrchestratorState {
    let url = proxy.url.clone();
    let db = Db::connect_lazy(
        &DatabaseConfig::from_lookup(move |name: &str| {
            (name == "DATABASE_URL").then(|| url.clone())
        })
        .unwrap(),
    );
    h.state.auth.edge.db = db.clone();
    h.state.message.edge.db = db.clone();
    let bedrock = aws_sdk_bedrockruntime::Client::from_conf(
        aws_sdk_bedrockruntime::config::Builder::from(&sdk_config())
            .endpoint_url(&llm.endpoint)
            .build(),
    );
    OrchestratorState {
        db: db.clone(),
        fanout: Arc::new(ConnectionsFanout::new(
            db,
            Arc::new(ManagementApi::new(sdk_config())),
        )),
        agents: Arc::new(Agents {
            echo: Echo,
            openai: OpenAi::new(&llm.base_url, Some("sk-test".into())),
            bedrock: Bedrock::new(bedrock),
        }),
        retry: RetryPolicy::default(),
        context: ContextLimits::default(),
        output: OutputLimits::default(),
        max_receives: OrchestratorSettings::default().max_receives,
        job_budget: OrchestratorSettings::default().job_budget,
        redrive: None,
    }
}

/// One message from the socket to its reply: the route, the queue, the orchestrator.
async fn one_message(h: &Harness, state: &OrchestratorState, connection: &str, text: &str) {
    let records = records_for(h, connection, &[text]).await;
    assert_eq!(records.len(), 1);
    assert!(run(state, records).await.is_empty(), "the job succeeds");
}

/// The round trips of one message on `connection`, after three that warm the pool: its
/// connections open and their statements prepared, as in a warm Lambda.
async fn counted_message(
    proxy: &PgProxy,
    h: &Harness,
    state: &OrchestratorState,
    connection: &str,
) -> Turns {
    for _ in 0..3 {
        one_message(h, state, connection, "warm up").await;
    }
    settle().await;
    proxy.take();
    one_message(h, state, connection, "counted").await;
    settle().await;
    proxy.take()
}

/// Lets the pool's release checks of the last step finish, so they count where they belong.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_message_costs_three_round_trips_and_a_stored_flush_one() {
    let mut h = Harness::new().await;
    let llm = FakeLlm::start(|_, _| {
        let words = ["one ", "two ", "three ", "four ", "five ", "six"];
        Reply::Stream(pieces(&words), Duration::from_millis(120))
    })
    .await;
    let proxy = PgProxy::start(&h._test.url).await;
    let state = functions_through(&proxy, &mut h, &llm).await;
    // `auth` alone, on a warm pool: a socket authenticated three times (a fresh `auth` renews
    // it), then once more, counted.
    h.connect("echo").await;
    let token = crate::helpers::token(h.seed.user, shared::domain::Role::CustomerOperator);
    for _ in 0..3 {
        assert_eq!(h.auth("echo", &token).await.unwrap()["type"], "auth_ok");
    }
    settle().await;
    proxy.take();
    assert_eq!(h.auth("echo", &token).await.unwrap()["type"], "auth_ok");
    settle().await;
    let auth = proxy.take();
    eprintln!("round trips of auth: {} with statements", auth.statements);
    // BEGIN with the scope, bind (locking the conversation), what the socket is owed, COMMIT.
    assert!(auth.statements <= 4, "{auth:?}");

    let echo = counted_message(&proxy, &h, &state, "echo").await;
    eprintln!(
        "round trips per message (echo, AWS mode): {} with statements, {} preparing, {} bare syncs",
        echo.statements, echo.prepares, echo.bare
    );
    assert!(
        echo.statements <= 3,
        "a message costs {} statement round trips: {echo:?}",
        echo.statements
    );
    let reply = h
        .api
        .frames_to("echo")
        .into_iter()
        .rfind(|f| f["type"] == "response")
        .unwrap();
    assert_eq!(reply["text"], "Echo: counted");

    // A streamed reply is stored as it streams: each flush (one chunk here) is one round trip
    // (the scope and `append_reply` in one simple query), in place of the unstreamed reply's
    // one store.
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("stream", conversation).await;
    let before = h.api.frames_to("stream").len();
    let streamed = counted_message(&proxy, &h, &state, "stream").await;
    let chunks = h.api.frames_to("stream")[before..]
        .iter()
        .filter(|f| f["type"] == "chunk")
        .count();
    eprintln!(
        "round trips of a streamed message: {} with statements for {chunks} chunks",
        streamed.statements
    );
    assert!(
        chunks >= 4,
        "the reply streamed in several chunks: {chunks}"
    );
    assert!(
        streamed.statements <= echo.statements + chunks,
        "{streamed:?} against {echo:?} and {chunks} chunks"
    );
}
