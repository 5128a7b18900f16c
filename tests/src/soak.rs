//! The randomized soak (`make soak`, and two minutes of it in `make test`): the chat page in
//! headless Chromium, four tabs over two conversations of two users, against `konstruct-local`
//! as gateway and worker (two processes) on a Postgres and a Redis of the soak's own, with a
//! model that streams replies of random length at a random pace. `tests/browser/soak.cjs` plays
//! a seeded schedule of what people and networks do (sends, double sends, sends while offline,
//! offline and back, reloads, tabs closed and opened again, cancels, tokens let expire and
//! renewed) and asks this side for the server's faults (the worker killed, Redis, Postgres and
//! the gateway restarted). At the end every tab must show exactly what the database holds.
//!
//! On the AWS path (`Settings::aws`), the same page and schedule run against the AWS-shaped
//! stack (`tests::aws_sim`: the function binaries under the Lambda emulator, the orchestrator on
//! the FIFO event source over moto, PgBouncer, a round trip on every hop), on the services
//! `make test` starts; there the fault is the gateway (API Gateway's stand-in) killed and
//! restarted, every socket dropping at once. The others are not played there: Postgres, PgBouncer
//! and moto are shared with the other tests, and a killed orchestrator's records come back only
//! after the queue's six-minute visibility timeout, as on AWS (`fifo_batches` tests that).
//!
//! The script talks to this side over its standard streams: it writes `FAULT <kind>` and waits
//! for `DONE`; at the end it writes `TRANSCRIPTS <json>` each time it is sent `DUMP`, until it
//! is sent `END`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::{Value, json};
use shared::db::agents::Provider;
use shared::db::seed::AgentPlan;
use sqlx::Row;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use shared::db::Db;

use crate::aws_sim::{self, AwsSim, Latencies};
use crate::services::{OwnPostgres, OwnRedis, free_port};
use crate::stack::{DatabaseUrls, SECRET, Seat, Server, seeded_database_with};
use crate::streaming::start_random_model;

pub struct Settings {
    /// How long the schedule runs.
    pub duration: Duration,
    /// Seeds the schedule and the model: the same seed plays the same run (as far as timing
    /// allows).
    pub seed: u64,
    /// `konstruct-local`.
    pub bin: String,
    /// On the AWS-shaped stack instead of the local runtime.
    pub aws: bool,
}

/// The faults each path plays.
const LOCAL_FAULTS: [&str; 4] = [
    "kill-worker",
    "restart-gateway",
    "restart-redis",
    "restart-postgres",
];
const AWS_FAULTS: [&str; 1] = ["restart-gateway"];

/// The seed given (a number), or one from the clock; printed by the callers so a run can be
/// replayed.
pub fn seed_or_clock(given: Option<&str>) -> anyhow::Result<u64> {
    match given {
        Some(seed) => seed.parse().context("a seed is a number"),
        None => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())),
    }
}

/// What a soak did.
#[derive(Debug)]
pub struct Outcome {
    pub faults: HashMap<String, usize>,
    pub actions: Value,
    pub messages: usize,
}

/// The processes under test, and how to restart each.
struct Stack {
    postgres: OwnPostgres,
    redis: Option<OwnRedis>,
    database_url: String,
    gateway: Option<Server>,
    worker: Option<Server>,
    listen: String,
    model: String,
    prefix: String,
    bin: String,
}

impl Stack {
    async fn start_gateway(&mut self) -> anyhow::Result<()> {
        let listen = self.listen.clone();
        self.gateway = Some(
            self.server(&["serve", "--no-worker", "--listen", &listen])
                .await?,
        );
        Ok(())
    }

    async fn start_worker(&mut self) -> anyhow::Result<()> {
        self.worker = Some(self.server(&["worker"]).await?);
        Ok(())
    }

    async fn server(&self, args: &[&str]) -> anyhow::Result<Server> {
        let redis = self.redis.as_ref().context("redis is up")?.url();
        Server::start(
            &self.bin,
            &self.database_url,
            &redis,
            &self.prefix,
            args,
            &[
                ("OPENAI_BASE_URL", &self.model),
                ("OPENAI_API_KEY", "sk-soak"),
            ],
        )
        .await
    }

    async fn fault(&mut self, kind: &str) -> anyhow::Result<()> {
        match kind {
            // SIGKILL: whatever it was doing stops mid-way.
            "kill-worker" => {
                if let Some(worker) = self.worker.take() {
                    worker.stop().await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.start_worker().await
            }
            "restart-gateway" => {
                if let Some(gateway) = self.gateway.take() {
                    gateway.stop().await;
                }
                self.start_gateway().await
            }
            "restart-redis" => {
                let redis = self.redis.take().context("redis is up")?;
                self.redis = Some(redis.restart().await);
                Ok(())
            }
            "restart-postgres" => {
                let postgres = &self.postgres;
                tokio::task::block_in_place(|| postgres.restart());
                Ok(())
            }
            other => bail!("unknown fault {other}"),
        }
    }
}

/// The servers under test.
enum Backend {
    Local(Box<Stack>),
    Aws(Box<AwsSim>),
}

impl Backend {
    fn address(&self) -> String {
        match self {
            Self::Local(stack) => stack.listen.clone(),
            Self::Aws(sim) => sim.address.clone(),
        }
    }

    async fn fault(&mut self, kind: &str) -> anyhow::Result<()> {
        match self {
            Self::Local(stack) => stack.fault(kind).await,
            Self::Aws(sim) if kind == "restart-gateway" => sim.restart_gateway().await,
            Self::Aws(_) => bail!("{kind} is not played on the AWS path"),
        }
    }
}

/// The agent both conversations talk to: an OpenAI-compatible one, the random model.
fn plan() -> AgentPlan<'static> {
    AgentPlan {
        name: "Soak",
        system_prompt: "You answer at length, at your own pace.",
        provider: Provider::Openai,
        model: "soak",
        settings: json!({}),
    }
}

/// The local runtime as two processes on a Postgres and a Redis of the soak's own.
async fn local(settings: &Settings, model: String) -> anyhow::Result<(Backend, Db, Vec<Seat>)> {
    let postgres = tokio::task::block_in_place(OwnPostgres::start);
    let (database_url, db, seats) = seeded_database_with(&postgres.urls(), 2, &plan()).await?;
    let mut stack = Stack {
        postgres,
        // Redis writes every command to its append-only file, as a queue that must not lose
        // work is run; the soak restarts it.
        redis: Some(OwnRedis::start_persistent().await),
        database_url,
        gateway: None,
        worker: None,
        listen: format!("127.0.0.1:{}", free_port()),
        model,
        prefix: format!("soak:{}:", uuid::Uuid::new_v4().simple()),
        bin: settings.bin.clone(),
    };
    stack.start_gateway().await?;
    stack.start_worker().await?;
    Ok((Backend::Local(Box::new(stack)), db, seats))
}

/// The AWS-shaped stack on the services `make test` (or `infra/local/soak.sh --aws`) started.
async fn aws(settings: &Settings, model: String) -> anyhow::Result<(Backend, Db, Vec<Seat>)> {
    let env = |name: &str| {
        std::env::var(name)
            .with_context(|| format!("{name} is not set: the AWS path needs the services"))
    };
    let urls = DatabaseUrls::from_env();
    let (database_url, db, seats) = seeded_database_with(&urls, 2, &plan()).await?;
    let pooled_database_url = aws_sim::pooled_url(&database_url)?;
    let bin_dir = std::path::Path::new(&settings.bin)
        .parent()
        .context("konstruct-local's directory")?
        .to_owned();
    let sim = AwsSim::start(&aws_sim::Settings {
        pooled_database_url,
        database_url,
        redis_url: env("REDIS_URL")?,
        redis_prefix: format!("soak:{}:", uuid::Uuid::new_v4().simple()),
        moto_endpoint: env("MOTO_ENDPOINT")?,
        bin_dir,
        model_base_url: Some(model),
        latencies: Latencies::default(),
        orchestrator_concurrency: 4,
        route_concurrency: 20,
        post_budget: Some(200),
        management_quota: None,
    })
    .await?;
    Ok((Backend::Aws(Box::new(sim)), db, seats))
}

/// Runs the soak; fails with what differed when a tab and the database disagree at the end.
pub async fn run(settings: &Settings) -> anyhow::Result<Outcome> {
    let model = start_random_model(settings.seed).await?;
    let (mut backend, db, seats) = if settings.aws {
        aws(settings, model).await?
    } else {
        local(settings, model).await?
    };
    let kinds: &[&str] = if settings.aws {
        &AWS_FAULTS
    } else {
        &LOCAL_FAULTS
    };

    let input = json!({
        "url": format!("http://{}", backend.address()),
        "faults": kinds,
        "secret": SECRET,
        "seed": settings.seed,
        "seconds": settings.duration.as_secs_f64(),
        "seats": seats.iter().map(|s: &Seat| json!({ "user": s.user, "conversation": s.conversation })).collect::<Vec<_>>(),
    });
    let node_path = std::env::var("NODE_PATH")
        .context("NODE_PATH is not set: run through `make soak` or `make test`")?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser/soak.cjs");
    let mut node = Command::new("node")
        .arg(&script)
        .arg(input.to_string())
        .env("NODE_PATH", node_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start node")?;
    let mut to_node = node.stdin.take().context("piped")?;
    let mut lines = BufReader::new(node.stdout.take().context("piped")?).lines();
    let mut faults: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + settings.duration + Duration::from_secs(600);
    let mut checks = 0;
    let outcome = loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .context("the soak script stalled")??
            .context("the soak script ended without its transcripts")?;
        if let Some(kind) = line.strip_prefix("FAULT ") {
            println!("soak: fault {kind}");
            backend.fault(kind).await?;
            *faults.entry(kind.to_owned()).or_default() += 1;
            to_node.write_all(b"DONE\n").await?;
        } else if let Some(json) = line.strip_prefix("TRANSCRIPTS ") {
            let tabs: Value = serde_json::from_str(json)?;
            match compare(&db, &seats, &tabs).await {
                Ok(messages) => {
                    to_node.write_all(b"END\n").await?;
                    break Outcome {
                        faults: faults.clone(),
                        actions: tabs["actions"].clone(),
                        messages,
                    };
                }
                // Tabs catch up a little after the database: ask again, for a while.
                Err(e) if checks < 30 => {
                    checks += 1;
                    if checks % 5 == 0 {
                        println!("soak: not yet equal ({e:#})");
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    to_node.write_all(b"DUMP\n").await?;
                }
                Err(e) => {
                    to_node.write_all(b"END\n").await?;
                    return Err(e.context(format!("seed {}", settings.seed)));
                }
            }
        } else {
            println!("{line}");
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(30), node.wait()).await??;
    ensure!(status.success(), "the soak script failed: {status}");
    for kind in kinds {
        ensure!(
            faults.contains_key(*kind),
            "the schedule never asked for {kind}"
        );
    }
    Ok(outcome)
}

/// Every tab against the database: the messages a tab holds are its conversation's stored
/// messages from the oldest it holds on (a tab reloaded after a long gap holds the newest page),
/// each once, with the same text and status, and none pending; every user message stored is
/// answered by one reply that ended. Returns how many messages the conversations hold.
async fn compare(db: &Db, seats: &[Seat], tabs: &Value) -> anyhow::Result<usize> {
    let mut stored: HashMap<String, Vec<Value>> = HashMap::new();
    for seat in seats {
        let mut tx = db.begin(shared::db::Scope::Tenant(seat.tenant)).await?;
        let rows = sqlx::query(
            "select m.id::text, m.seq, m.role, m.content, m.status,
                    (select count(*) from web_conversation_messages r
                     where r.reply_to = m.id and r.conversation_id = m.conversation_id) as replies
             from web_conversation_messages m where m.conversation_id = $1 order by m.seq",
        )
        .bind(seat.conversation)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut messages = Vec::new();
        for row in rows {
            let (role, status): (String, String) = (row.get("role"), row.get("status"));
            let replies: i64 = row.get("replies");
            if role == "user" {
                ensure!(
                    replies == 1,
                    "user message {} has {replies} replies",
                    row.get::<String, _>("id")
                );
            } else {
                ensure!(
                    status != "streaming",
                    "reply {} is still streaming",
                    row.get::<String, _>("id")
                );
            }
            messages.push(json!({
                "id": row.get::<String, _>("id"), "seq": row.get::<i64, _>("seq"), "role": role,
                "content": row.get::<String, _>("content"), "status": status,
            }));
        }
        stored.insert(seat.conversation.to_string(), messages);
    }
    for tab in tabs["tabs"].as_array().context("tabs")? {
        let name = tab["name"].as_str().unwrap_or("?");
        let conversation = tab["conversation"].as_str().context("a conversation")?;
        let want = &stored[conversation];
        let held = tab["messages"].as_array().context("messages")?;
        let pending: Vec<&Value> = held.iter().filter(|m| m["id"].is_null()).collect();
        // A message refused for good shows as failed, with its reason; nothing else may wait.
        for m in &pending {
            ensure!(
                m["status"] == "failed" && m["error"].is_string(),
                "tab {name} holds a message pending without a reason: {m}"
            );
        }
        // The tab shows its branch in the path's order (a reply right after its message, though
        // numbered after later ones); compared in `seq` order.
        let mut shown: Vec<&Value> = held.iter().filter(|m| !m["id"].is_null()).collect();
        shown.sort_by_key(|m| m["seq"].as_i64().unwrap_or(i64::MAX));
        let first = shown
            .first()
            .map_or(i64::MAX, |m| m["seq"].as_i64().unwrap_or(0));
        let expected: Vec<&Value> = want
            .iter()
            .filter(|m| m["seq"].as_i64().unwrap_or(0) >= first)
            .collect();
        if shown.len() != expected.len() {
            bail!(
                "tab {name} holds {} stored messages, the database {} from seq {first}",
                shown.len(),
                expected.len()
            );
        }
        for (m, w) in shown.iter().zip(&expected) {
            for field in ["id", "seq", "role", "content", "status"] {
                if m[field] != w[field] {
                    return Err(anyhow!(
                        "tab {name}, seq {}: {field} is {} in the tab, {} in the database",
                        w["seq"],
                        m[field],
                        w[field]
                    ));
                }
            }
        }
        // The page shows each message once: its bubbles are the module's messages.
        let bubbles = tab["bubbles"].as_array().context("bubbles")?;
        ensure!(
            bubbles.len() == held.len(),
            "tab {name} shows {} bubbles for {} messages",
            bubbles.len(),
            held.len()
        );
    }
    Ok(stored.values().map(Vec::len).sum())
}
