//! `aws-sim`: the AWS path on this machine (`tests::aws_sim`), for a person or for figures.
//!
//!   aws-sim serve            one seeded conversation (echo agent); prints where to connect
//!   aws-sim bench [--json P] the AWS path's figures: 1, 50 and 200 conversations of two
//!                            sockets each against a model streaming 20 pieces 25 ms apart,
//!                            then three quick messages to a 15 s agent
//!     --only N               one scenario only (1, 50 or 200 conversations), no 15 s agent
//!     --statements           after each scenario, the statements that cost Postgres most
//!
//! Needs the services `infra/local/aws-sim.sh` starts (it runs this): `DATABASE_URL`,
//! `MIGRATOR_DATABASE_URL`, `POOLED_DATABASE_URL`, `REDIS_URL`, `MOTO_ENDPOINT`, and
//! `KONSTRUCT_BIN_DIR` (the function binaries and konstruct-local).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use shared::config::DatabaseConfig;
use shared::db::Db;
use shared::db::agents::Provider;
use shared::db::seed::AgentPlan;
use shared::domain::MessageText;
use tests::aws_sim::{AwsSim, GATEWAY_APPLICATION, Latencies, Settings, pooled_url};
use tests::stack::{
    DatabaseUrls, Seat, seeded_database_with, store_message_directly, store_reply_directly,
};
use tokio_tungstenite::tungstenite::Message;

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run infra/local/aws-sim.sh"))
}

struct Stack {
    sim: AwsSim,
    seats: Vec<Seat>,
    database: String,
    /// The runtime role's direct URL for `database`.
    database_url: String,
}

/// The account's `@connections` quota as AWS sets it by default: 10,000 a second, burst 5,000.
const ACCOUNT_QUOTA: (u32, u32) = (10_000, 5_000);
/// The template's `PostBudgetPerSecond` default.
const BUDGET: u32 = 2_000;

async fn stack(
    conversations: usize,
    plan: &AgentPlan<'_>,
    model: Option<String>,
    orchestrators: usize,
    management_quota: (u32, u32),
    post_budget: u32,
) -> anyhow::Result<Stack> {
    let (url, _db, seats) =
        seeded_database_with(&DatabaseUrls::from_env(), conversations, plan).await?;
    let database = url.rsplit('/').next().unwrap_or_default().to_owned();
    let settings = Settings {
        pooled_database_url: pooled_url(&url)?,
        database_url: url.clone(),
        redis_url: env("REDIS_URL")?,
        redis_prefix: format!("sim:{}:", uuid::Uuid::new_v4().simple()),
        moto_endpoint: env("MOTO_ENDPOINT")?,
        bin_dir: env("KONSTRUCT_BIN_DIR")?.into(),
        model_base_url: model,
        latencies: Latencies::default(),
        orchestrator_concurrency: orchestrators,
        // No reserved concurrency, as the template's default: the account's (1000) applies.
        route_concurrency: 250,
        post_budget: Some(post_budget),
        management_quota: Some(management_quota),
    };
    Ok(Stack {
        sim: AwsSim::start(&settings).await?,
        seats,
        database,
        database_url: url,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("serve") => serve().await,
        Some("bench") => {
            let json = args
                .iter()
                .position(|a| a == "--json")
                .and_then(|i| args.get(i + 1));
            let only = args
                .iter()
                .position(|a| a == "--only")
                .and_then(|i| args.get(i + 1))
                .map(|n| n.parse::<usize>())
                .transpose()
                .context("--only takes a number of conversations")?;
            let statements = args.iter().any(|a| a == "--statements");
            bench(json.map(String::as_str), only, statements).await
        }
        Some(other) => Err(anyhow!("unknown command {other}: serve or bench")),
    }
}

async fn serve() -> anyhow::Result<()> {
    let stack = stack(1, &AgentPlan::echo("Echo"), None, 2, ACCOUNT_QUOTA, BUDGET).await?;
    let seat = &stack.seats[0];
    let l = stack.sim.latencies;
    println!(
        "\n  The AWS path, simulated (round trips: client {:?}, management API {:?}, SQS {:?}, database {:?}).\n  \
         WebSocket: ws://{}/ws?conversation_id={}\n  \
         Page:      http://{}/?conversation={}#token={}\n  Token:     {}\n  Ctrl-C stops it.\n",
        l.client,
        l.management,
        l.sqs,
        l.database,
        stack.sim.address,
        seat.conversation,
        stack.sim.address,
        seat.conversation,
        seat.token,
        seat.token
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// What the sockets saw, in microseconds from each message sent.
struct Timings {
    typing: Histogram<u64>,
    ack: Histogram<u64>,
    first_chunk: Histogram<u64>,
    response: Histogram<u64>,
    /// Frames posted to sockets (everything but route responses), per second of the run.
    posts: HashMap<u64, u64>,
    replies: usize,
}

impl Timings {
    fn new() -> anyhow::Result<Self> {
        let h = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
        Ok(Self {
            typing: h()?,
            ack: h()?,
            first_chunk: h()?,
            response: h()?,
            posts: HashMap::new(),
            replies: 0,
        })
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(address: &str, seat: &Seat) -> anyhow::Result<Socket> {
    let url = format!("ws://{address}/ws?conversation_id={}", seat.conversation);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let auth = json!({ "type": "auth", "token": seat.token });
    socket.send(Message::Text(auth.to_string().into())).await?;
    anyhow::ensure!(
        next(&mut socket).await?["type"] == "auth_ok",
        "auth refused"
    );
    Ok(socket)
}

async fn next(socket: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(120), socket.next())
            .await
            .context("nothing within 120 s")?
            .ok_or_else(|| anyhow!("socket closed"))??;
        if let Message::Text(text) = message {
            return Ok(serde_json::from_str(&text)?);
        }
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

fn count_post(timings: &Mutex<Timings>, start: Instant, frame: &Value) {
    if !matches!(frame["type"].as_str(), Some("ack" | "auth_ok" | "pong")) {
        let second = start.elapsed().as_secs();
        *timings.lock().unwrap().posts.entry(second).or_default() += 1;
    }
}

/// A chunk added to the text held as the protocol says: only what it holds past the text
/// (a chunk may overlap what an earlier one carried); one past a gap is not added, so the
/// text then differs from the response's and the run fails.
fn assemble(text: &mut String, chunk: &Value) {
    let offset = chunk["offset"].as_u64().unwrap_or(0) as usize;
    let held = text.chars().count();
    if offset <= held {
        let delta = chunk["delta"].as_str().unwrap_or_default();
        text.extend(delta.chars().skip(held - offset));
    }
}

/// One conversation: socket A sends `messages` one after another, socket B (another tab) only
/// listens; both must end with every reply whole.
async fn conversation(
    address: String,
    seat: Seat,
    messages: usize,
    timings: Arc<Mutex<Timings>>,
    start: Instant,
) -> anyhow::Result<()> {
    let mut a = open(&address, &seat).await?;
    let mut b = open(&address, &seat).await?;
    let listener = {
        let timings = timings.clone();
        tokio::spawn(async move {
            let mut responses = 0;
            let mut text = String::new();
            while responses < messages {
                let frame = next(&mut b).await?;
                count_post(&timings, start, &frame);
                match frame["type"].as_str() {
                    Some("chunk") => assemble(&mut text, &frame),
                    Some("response") => {
                        responses += 1;
                        let whole = frame["text"].as_str().unwrap_or_default();
                        anyhow::ensure!(whole == text, "other tab: {text:?} against {whole:?}");
                        text.clear();
                    }
                    _ => {}
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    for n in 0..messages {
        let frame = json!({ "type": "message", "text": format!("message {n}") });
        let sent = Instant::now();
        a.send(Message::Text(frame.to_string().into())).await?;
        let mut text = String::new();
        loop {
            let frame = next(&mut a).await?;
            count_post(&timings, start, &frame);
            let mut t = timings.lock().unwrap();
            let at = micros(sent.elapsed());
            match frame["type"].as_str() {
                Some("typing") => t.typing.record(at)?,
                Some("ack") => t.ack.record(at)?,
                Some("chunk") => {
                    if text.is_empty() {
                        t.first_chunk.record(at)?;
                    }
                    assemble(&mut text, &frame);
                }
                Some("response") => {
                    t.response.record(at)?;
                    t.replies += 1;
                    if let Some(whole) = frame["text"].as_str() {
                        anyhow::ensure!(whole == text, "chunks {text:?} against {whole:?}");
                    }
                    break;
                }
                Some("error") => return Err(anyhow!("error frame: {frame}")),
                _ => {}
            }
        }
    }
    listener.await??;
    Ok(())
}

/// The most server connections the functions (through the pooler) held to `database` at once,
/// sampled.
fn watch_connections(database: String) -> (tokio::task::JoinHandle<()>, Arc<Mutex<i64>>) {
    let peak = Arc::new(Mutex::new(0));
    let seen = peak.clone();
    let task = tokio::spawn(async move {
        let Ok(url) = env("MIGRATOR_DATABASE_URL") else {
            return;
        };
        let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
        else {
            return;
        };
        loop {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity \
                 where datname = $1 and usename = 'konstruct_app' and application_name <> $2",
            )
            .bind(&database)
            .bind(GATEWAY_APPLICATION)
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
            {
                let mut peak = seen.lock().unwrap();
                *peak = (*peak).max(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (task, peak)
}

/// A superuser's connection to the maintenance database, for `pg_stat_statements`.
async fn statistics() -> anyhow::Result<sqlx::PgPool> {
    let migrator = env("MIGRATOR_DATABASE_URL")?;
    let (scheme, rest) = migrator.split_once("://").context("a database URL")?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{scheme}://postgres@{host}"))
        .await?;
    sqlx::query("create extension if not exists pg_stat_statements")
        .execute(&pool)
        .await?;
    Ok(pool)
}

/// Postgres's time (execution and planning) spent in `database` since the last reset, in
/// milliseconds: the statements clients sent, whose times include what they called (the nested
/// statements `pg_stat_statements.track = all` also lists are not counted twice).
async fn postgres_ms(pool: &sqlx::PgPool, database: &str) -> anyhow::Result<f64> {
    Ok(sqlx::query_scalar(
        "select coalesce(sum(total_exec_time + total_plan_time), 0)::float8 \
         from pg_stat_statements s join pg_database d on d.oid = s.dbid \
         where d.datname = $1 and s.toplevel",
    )
    .bind(database)
    .fetch_one(pool)
    .await?)
}

/// Postgres's time per message for the least a message costs it: in the same database, through
/// the same pooler and with statements prepared as the functions prepare them, the user's
/// message stored, then its whole reply, each in a transaction of its own (the direct writes the
/// loopback figures' floor makes, without any reading of recipients, streaming or limits).
async fn direct_write_floor(stats: &sqlx::PgPool, stack: &Stack) -> anyhow::Result<f64> {
    let url = pooled_url(&stack.database_url)?;
    let config = DatabaseConfig::from_lookup(|name: &str| match name {
        "DATABASE_URL" => Some(url.clone()),
        "DATABASE_POOLED" => Some("true".to_owned()),
        _ => None,
    })?;
    let db = Db::connect_lazy(&config);
    let text = MessageText::parse("floor message")?;
    let seats = &stack.seats;
    const MESSAGES: usize = 20;
    sqlx::query("select pg_stat_statements_reset()")
        .execute(stats)
        .await?;
    for n in 0..MESSAGES {
        let seat = &seats[n % seats.len()];
        let (conversation, message) = store_message_directly(&db, seat, &text).await?;
        store_reply_directly(&db, &conversation, message).await?;
    }
    Ok(postgres_ms(stats, &stack.database).await? / MESSAGES as f64)
}

/// The statements that cost Postgres most in `database` since the last reset, per reply.
async fn print_statements(
    pool: &sqlx::PgPool,
    database: &str,
    replies: usize,
) -> anyhow::Result<()> {
    let rows: Vec<(f64, f64, i64, i64, String)> = sqlx::query_as(
        "select (total_exec_time + total_plan_time)::float8, total_plan_time::float8, calls, plans, \
                case when toplevel then '' else '(nested) ' end \
                    || regexp_replace(query, '\\s+', ' ', 'g') \
         from pg_stat_statements s join pg_database d on d.oid = s.dbid where d.datname = $1 \
         order by 1 desc limit 12",
    )
    .bind(database)
    .fetch_all(pool)
    .await?;
    println!(
        "{:>14} {:>9} {:>9} {:>7} {:>7}  statement",
        "", "ms/reply", "plan ms", "calls", "plans"
    );
    for (total, plan, calls, plans, query) in rows {
        let query: String = query.chars().take(110).collect();
        println!(
            "{:>14} {:>9.3} {:>9.1} {:>7} {:>7}  {query}",
            "",
            total / replies as f64,
            plan,
            calls,
            plans
        );
    }
    Ok(())
}

/// The least each path can take on this stack's round trips (`c` client, `m` management API,
/// `s` SQS, `d` database; each one-way half of its round trip), counting one database round
/// trip for each step that must reach it first, as the message path is built:
/// - typing: in (c/2), the message accepted (d), the post arriving (m/2), out (c/2);
/// - ack: in, accepted (d), the typing post answered (m, the commit meanwhile), the job sent to
///   SQS (s), out;
/// - first chunk: in, accepted, typing answered, the job reaching SQS (s/2), the job read (d),
///   the first piece stored (d), its post arriving (m/2), out;
/// - response: as the first chunk, then the model's 19 gaps, the reply ended (d), the tail chunk
///   posted and answered (m), the response's post arriving (m/2), out.
struct Floors {
    typing: Duration,
    ack: Duration,
    first_chunk: Duration,
    response: Duration,
}

fn floors(l: &Latencies, model: Duration) -> Floors {
    let (c, m, s, d) = (l.client, l.management, l.sqs, l.database);
    let queued = c / 2 + d + m + s / 2;
    Floors {
        typing: c + d + m / 2,
        ack: c + d + m + s,
        first_chunk: queued + d + d + m / 2 + c / 2,
        response: queued + d + model + d + m + m / 2 + c / 2,
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn bench(
    json_path: Option<&str>,
    only: Option<usize>,
    statements: bool,
) -> anyhow::Result<()> {
    let (pieces, gap) = (20, Duration::from_millis(25));
    let model = tests::streaming::start_model(pieces, gap).await?;
    let plan = AgentPlan {
        name: "Streaming",
        system_prompt: "You stream.",
        provider: Provider::Openai,
        model: "bench",
        settings: json!({}),
    };
    let l = Latencies::default();
    let floor = floors(&l, gap * (pieces as u32 - 1));
    println!(
        "== the AWS path, simulated (round trips added: client {} ms, management API {} ms, SQS {} ms, database {} ms; \
         function binaries under the Lambda emulator, orchestrator on the FIFO event source, PgBouncer)",
        l.client.as_millis(),
        l.management.as_millis(),
        l.sqs.as_millis(),
        l.database.as_millis()
    );
    println!(
        "   model: {pieces} pieces {} ms apart; two sockets per conversation, messages one after another; p50 / p99 (floor), ms",
        gap.as_millis()
    );
    println!(
        "{:>14} {:>22} {:>22} {:>22} {:>24} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8}",
        "conversations",
        "typing",
        "ack",
        "first chunk",
        "response",
        "pg conns",
        "posts/s",
        "429s",
        "sqs/msg",
        "pg ms/msg",
        "(floor)"
    );
    let mut results = Vec::new();
    // The last run: an account whose quota is 500 posts a second (burst 500), below what 200
    // conversations post here, and the deployment's budget set under it (400, as the README
    // advises): streams coalesce, the route functions' unmetered posts may still be throttled
    // and retried, and no frame may be lost or doubled.
    for (conversations, messages, quota, budget) in [
        (1, 20, ACCOUNT_QUOTA, BUDGET),
        (50, 4, ACCOUNT_QUOTA, BUDGET),
        (200, 2, ACCOUNT_QUOTA, BUDGET),
        (200, 2, (500, 500), 400),
    ] {
        if only.is_some_and(|n| n != conversations) {
            continue;
        }
        let stack = stack(conversations, &plan, Some(model.clone()), 20, quota, budget).await?;
        let (watcher, peak) = watch_connections(stack.database.clone());
        let stats = statistics().await?;
        sqlx::query("select pg_stat_statements_reset()")
            .execute(&stats)
            .await?;
        let timings = Arc::new(Mutex::new(Timings::new()?));
        let start = Instant::now();
        let mut runs = tokio::task::JoinSet::new();
        for (i, seat) in stack.seats.iter().cloned().enumerate() {
            let (address, timings) = (stack.sim.address.clone(), timings.clone());
            runs.spawn(async move {
                // Spread over a second, as people arrive.
                tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
                conversation(address, seat, messages, timings, start).await
            });
        }
        let mut failed = 0;
        while let Some(run) = runs.join_next().await {
            if let Err(e) = run? {
                failed += 1;
                eprintln!("aws-sim: a conversation failed: {e:#}");
            }
        }
        watcher.abort();
        let throttled = stack.sim.throttled().await?;
        let postgres = postgres_ms(&stats, &stack.database).await?;
        if statements {
            let replies = timings.lock().unwrap().replies.max(1);
            print_statements(&stats, &stack.database, replies).await?;
        }
        let floor_ms = direct_write_floor(&stats, &stack).await?;
        let t = timings.lock().unwrap();
        let per_message = postgres / t.replies.max(1) as f64;
        let posts = t.posts.values().copied().max().unwrap_or(0);
        let peak = *peak.lock().unwrap();
        let sqs_calls = stack.sim.sqs_calls() as f64 / t.replies.max(1) as f64;
        let cell = |h: &Histogram<u64>, f: Duration| {
            format!("{:.1} / {:.1} ({})", ms(h, 0.5), ms(h, 0.99), f.as_millis())
        };
        let label = if quota == ACCOUNT_QUOTA {
            conversations.to_string()
        } else {
            format!("{conversations}, {}/s", quota.0)
        };
        println!(
            "{:>14} {:>22} {:>22} {:>22} {:>24} {:>9} {:>9} {:>7} {:>8.2} {:>8.2} {:>8.2}",
            label,
            cell(&t.typing, floor.typing),
            cell(&t.ack, floor.ack),
            cell(&t.first_chunk, floor.first_chunk),
            cell(&t.response, floor.response),
            peak,
            posts,
            throttled,
            sqs_calls,
            per_message,
            floor_ms
        );
        if failed > 0 {
            println!("{:>14} {failed} conversations failed (see above)", "");
        }
        results.push(json!({
            "conversations": conversations,
            "messages_each": messages,
            "replies": t.replies,
            "failed_conversations": failed,
            "typing_ms": [ms(&t.typing, 0.5), ms(&t.typing, 0.99)],
            "ack_ms": [ms(&t.ack, 0.5), ms(&t.ack, 0.99)],
            "first_chunk_ms": [ms(&t.first_chunk, 0.5), ms(&t.first_chunk, 0.99)],
            "response_ms": [ms(&t.response, 0.5), ms(&t.response, 0.99)],
            "postgres_connections_max": peak,
            "posts_per_second_max": posts,
            "management_quota_per_second": quota.0,
            "throttled_posts": throttled,
            "sqs_calls_per_message": sqs_calls,
            "postgres_ms_per_message": per_message,
            "postgres_ms_per_message_direct_write_floor": floor_ms,
            "cold_starts": stack.sim.lambda.cold_starts(),
        }));
    }
    println!(
        "   floors: typing {} ms, ack {} ms, first chunk {} ms, response {} ms",
        floor.typing.as_millis(),
        floor.ack.as_millis(),
        floor.first_chunk.as_millis(),
        floor.response.as_millis()
    );

    if only.is_some() {
        return Ok(());
    }
    // Three messages in a row to an agent that takes 15 s a reply (the template's 60 s timeout,
    // 30 s job budget, batches of ten).
    // Two pieces 15 s apart: the first at once, the reply ending 15 s after the agent is asked.
    let slow = tests::streaming::start_model(2, Duration::from_secs(15)).await?;
    let stack = stack(1, &plan, Some(slow), 2, ACCOUNT_QUOTA, BUDGET).await?;
    let seat = &stack.seats[0];
    let mut socket = open(&stack.sim.address, seat).await?;
    let start = Instant::now();
    for n in 0..3 {
        let frame = json!({ "type": "message", "text": format!("quick {n}") });
        socket.send(Message::Text(frame.to_string().into())).await?;
    }
    let mut arrived = Vec::new();
    while arrived.len() < 3 {
        let frame = next(&mut socket).await?;
        if frame["type"] == "response" {
            arrived.push(start.elapsed().as_secs_f64());
        }
    }
    println!(
        "== three quick messages to a 15 s agent: replies at {:.1} s, {:.1} s, {:.1} s after the first was sent",
        arrived[0], arrived[1], arrived[2]
    );
    if let Some(path) = json_path {
        let out = json!({
            "latencies_ms": {
                "client": l.client.as_millis() as u64, "management": l.management.as_millis() as u64,
                "sqs": l.sqs.as_millis() as u64, "database": l.database.as_millis() as u64,
            },
            "floors_ms": {
                "typing": floor.typing.as_millis() as u64, "ack": floor.ack.as_millis() as u64,
                "first_chunk": floor.first_chunk.as_millis() as u64, "response": floor.response.as_millis() as u64,
            },
            "scenarios": results,
            "three_quick_messages_to_a_15s_agent_s": arrived,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
