//! `loadgen`: end-to-end load against a local stack (the `echo` agent). One user sending
//! messages one after another; sockets over conversations in a closed loop, at a fixed offered
//! rate and at full speed; latency from `message` sent to
//! `response` received, messages per second, the server's CPU and peak memory, and the
//! accounting (nothing lost, duplicated or out of order). Then the floor: the same database
//! writes and Redis operations issued directly, so the pipeline's overhead is a ratio.
//!
//! Environment: DATABASE_URL (a maintenance database it may create databases from), REDIS_URL,
//! KONSTRUCT_LOCAL_BIN. Arguments: [--conversations N] [--listeners K] [--rate R] [--seconds S]
//! [--burst M] [--json PATH]. Prints figures; it does not pass or fail.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use shared::db::{Db, Scope};
use shared::domain::MessageText;
use tests::load::{self, Plan, Report};
use tests::stack::{self, Server, process_usage};

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn json_path() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned())
}

fn summary(report: &Report, cpu: f64, peak: u64) -> Value {
    json!({
        "sent": report.sent, "acked": report.acked, "replied": report.replied,
        "lost": report.lost, "duplicated": report.duplicated, "out_of_order": report.out_of_order,
        "errors": report.errors.len(),
        "seconds": report.elapsed.as_secs_f64(),
        "messages_per_second": report.per_second(),
        "latency_ms": { "p50": report.ms(0.5), "p90": report.ms(0.9), "p99": report.ms(0.99), "max": report.ms(1.0) },
        "server_cpu_percent": cpu,
        "server_peak_rss_mb": peak as f64 / 1048576.0,
    })
}

async fn measured(
    server: &Server,
    run: impl std::future::Future<Output = anyhow::Result<Report>>,
) -> anyhow::Result<Value> {
    let pid = server.pid().context("server pid")?;
    let (cpu_before, _) = process_usage(pid).unwrap_or_default();
    let report = run.await?;
    let (cpu_after, peak) = process_usage(pid).unwrap_or_default();
    let cpu = 100.0 * (cpu_after - cpu_before) / report.elapsed.as_secs_f64();
    Ok(summary(&report, cpu, peak))
}

/// One load plan over these seats, measured.
async fn scenario(
    server: &Server,
    seats: &[stack::Seat],
    listeners: usize,
    plan: Plan,
    settle_seconds: u64,
) -> anyhow::Result<Value> {
    measured(
        server,
        load::run(
            &server.address,
            seats,
            listeners,
            plan,
            Duration::from_secs(settle_seconds),
        ),
    )
    .await
}

/// The workers' latency samples, in microseconds.
fn histogram(workers: Vec<anyhow::Result<Vec<Duration>>>) -> anyhow::Result<Histogram<u64>> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for samples in workers {
        for sample in samples? {
            latency.record((sample.as_micros() as u64).max(1))?;
        }
    }
    Ok(latency)
}

/// The same writes and Redis operations as one message's trip, issued directly.
async fn floor(
    db: &Db,
    redis_url: &str,
    seats: &[stack::Seat],
    total: usize,
    concurrency: usize,
) -> anyhow::Result<Value> {
    let client = redis::Client::open(redis_url)?;
    let redis = client.get_multiplexed_async_connection().await?;
    let stream = format!("floor:{}", uuid::Uuid::new_v4().simple());
    let text = MessageText::parse("floor message")?;
    let started = Instant::now();
    let work = (0..concurrency).map(|worker| {
        let (db, mut redis, stream, text) =
            (db.clone(), redis.clone(), stream.clone(), text.clone());
        async move {
            let mut samples = Vec::new();
            for n in (worker..total).step_by(concurrency) {
                let seat = &seats[n % seats.len()];
                let t = Instant::now();
                let (conversation, message) =
                    stack::store_message_directly(&db, seat, &text).await?;
                let _: String = redis::cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("body")
                    .arg("x")
                    .query_async(&mut redis)
                    .await?;
                stack::store_reply_directly(&db, &conversation, message).await?;
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(&stream)
                    .arg("reply")
                    .query_async(&mut redis)
                    .await?;
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }
    });
    let latency = histogram(futures::future::join_all(work).await)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "messages": total, "concurrency": concurrency,
        "messages_per_second": total as f64 / seconds,
        "latency_ms": { "p50": latency.value_at_quantile(0.5) as f64 / 1000.0, "p99": latency.value_at_quantile(0.99) as f64 / 1000.0 },
    }))
}

/// History pages of 50 messages under concurrent load: requests per second and latency.
async fn rest(
    address: &str,
    seats: &[stack::Seat],
    total: usize,
    concurrency: usize,
) -> anyhow::Result<Value> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let work = (0..concurrency).map(|worker| {
        let http = http.clone();
        async move {
            let mut samples = Vec::new();
            for n in (worker..total).step_by(concurrency) {
                let seat = &seats[n % seats.len()];
                let t = Instant::now();
                let response = http
                    .get(format!(
                        "http://{address}/api/portal/chat/conversations/{}/messages?limit=50",
                        seat.conversation
                    ))
                    .bearer_auth(&seat.token)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status() == 200,
                    "history answered {}",
                    response.status()
                );
                let page: Vec<Value> = response.json().await?;
                anyhow::ensure!(page.len() == 50, "a page of {} messages", page.len());
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }
    });
    let latency = histogram(futures::future::join_all(work).await)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "requests": total, "concurrency": concurrency, "page_size": 50,
        "requests_per_second": total as f64 / seconds,
        "latency_ms": { "p50": latency.value_at_quantile(0.5) as f64 / 1000.0, "p99": latency.value_at_quantile(0.99) as f64 / 1000.0 },
    }))
}

/// One user's streamed replies: the seat's agent switched to the streaming model.
async fn streaming(
    address: &str,
    db: &Db,
    seat: &stack::Seat,
    messages: usize,
) -> anyhow::Result<Value> {
    let mut tx = db.begin(Scope::Tenant(seat.tenant)).await?;
    sqlx::query(
        "update agents set provider = 'openai', model = 'bench-model'
         where id = (select agent_id from web_conversations where id = $1)",
    )
    .bind(seat.conversation)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let seen = tests::streaming::one_after_another(address, seat, messages).await?;
    let quantiles = |h: &Histogram<u64>| json!({ "p50": h.value_at_quantile(0.5) as f64 / 1000.0, "p99": h.value_at_quantile(0.99) as f64 / 1000.0 });
    Ok(json!({
        "replies": seen.replies, "pieces": 20, "piece_gap_ms": 25,
        "first_chunk_ms": quantiles(&seen.first_chunk),
        "chunk_gap_ms": quantiles(&seen.chunk_gap),
        "reply_ms": quantiles(&seen.reply),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let conversations = arg("--conversations", 50.0) as usize;
    let listeners = arg("--listeners", 1.0) as usize;
    let rate = arg("--rate", 1000.0);
    let seconds = arg("--seconds", 10.0);
    let burst = arg("--burst", 40.0) as usize;
    let redis_url = std::env::var("REDIS_URL").context("REDIS_URL")?;
    let bin = std::env::var("KONSTRUCT_LOCAL_BIN").context("KONSTRUCT_LOCAL_BIN")?;

    let (url, db, seats) =
        stack::seeded_database(&stack::DatabaseUrls::from_env(), conversations).await?;
    // A streaming model for the streaming scenario: 20 pieces 25 ms apart (half a second).
    let model = tests::streaming::start_model(20, Duration::from_millis(25)).await?;
    let prefix = format!("load:{}:", uuid::Uuid::new_v4().simple());
    let server = Server::start(
        &bin,
        &url,
        &redis_url,
        &prefix,
        &["serve", "--listen", "127.0.0.1:0"],
        // The benchmark measures the pipeline, not the per-socket flood protection.
        &[
            ("DATABASE_MAX_CONNECTIONS", "8"),
            ("WS_RATE_LIMIT_MESSAGES", "100000"),
            ("WS_USER_RATE_LIMIT_MESSAGES", "100000"),
            ("OPENAI_BASE_URL", model.as_str()),
        ],
    )
    .await?;
    let sockets = conversations * (listeners + 1);
    eprintln!(
        "loadgen: {sockets} sockets over {conversations} conversations at {}",
        server.address
    );

    // What one person feels: one socket, each message sent when the previous one's reply
    // arrived. Many messages in flight can hide a fixed stall; this cannot.
    let one_after_another = |per_conversation| Plan::FullSpeed {
        per_conversation,
        window: 1,
    };
    let single = scenario(&server, &seats[..1], 0, one_after_another(50), 60).await?;
    let closed = scenario(&server, &seats, listeners, one_after_another(10), 60).await?;
    let total = (rate * seconds) as usize;
    let offered = scenario(
        &server,
        &seats,
        listeners,
        Plan::Rate {
            per_second: rate,
            total,
        },
        60,
    )
    .await?;
    let full = scenario(
        &server,
        &seats,
        listeners,
        Plan::FullSpeed {
            per_conversation: burst,
            window: 8,
        },
        120,
    )
    .await?;
    let streaming = streaming(&server.address, &db, &seats[seats.len() - 1], 30).await?;
    let rest = rest(&server.address, &seats, 2000, 32).await?;
    let floor_single = floor(&db, &redis_url, &seats[..1], 200, 1).await?;
    let floor = floor(&db, &redis_url, &seats, 2000, 8).await?;
    server.stop().await;

    let overhead = full["messages_per_second"].as_f64().unwrap_or(0.0)
        / floor["messages_per_second"].as_f64().unwrap_or(1.0);
    let results = json!({
        "sockets": sockets, "conversations": conversations,
        "single_user": single,
        "closed_loop": closed,
        "offered": { "rate": rate, "result": offered },
        "full_speed": full,
        "floor_single": floor_single,
        "floor": floor,
        "rest_history": rest,
        "streaming_single_user": streaming,
        "pipeline_throughput_vs_floor": overhead,
    });
    for (name, r) in [
        ("single", &results["single_user"]),
        ("closed", &results["closed_loop"]),
        ("offered", &results["offered"]["result"]),
        ("full speed", &results["full_speed"]),
    ] {
        let l = &r["latency_ms"];
        println!(
            "{name:>10}: {:>6} msgs  {:>7.0} msg/s  p50 {:>6.2} ms  p90 {:>6.2}  p99 {:>6.2}  max {:>7.2}  cpu {:>5.0}%  rss {:>5.1} MB  lost {} dup {} order {} errors {}",
            r["sent"],
            r["messages_per_second"].as_f64().unwrap_or(0.0),
            l["p50"].as_f64().unwrap_or(0.0),
            l["p90"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["max"].as_f64().unwrap_or(0.0),
            r["server_cpu_percent"].as_f64().unwrap_or(0.0),
            r["server_peak_rss_mb"].as_f64().unwrap_or(0.0),
            r["lost"],
            r["duplicated"],
            r["out_of_order"],
            r["errors"],
        );
    }
    for (name, f) in [("floor 1", &floor_single), ("floor 8", &floor)] {
        println!(
            "{name:>10}: {:>6} msgs  {:>7.0} msg/s  p50 {:>6.2} ms  p99 {:>6.2}   (the same writes and Redis operations issued directly, {} at once)",
            f["messages"],
            f["messages_per_second"].as_f64().unwrap_or(0.0),
            f["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            f["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            f["concurrency"],
        );
    }
    println!(
        "            full speed reaches {:.0}% of the floor's throughput",
        overhead * 100.0
    );
    println!(
        "      rest: {:>6} GET history (50 messages, {} concurrent)  {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>6.2}",
        rest["requests"],
        rest["concurrency"],
        rest["requests_per_second"].as_f64().unwrap_or(0.0),
        rest["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        rest["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
    );
    let ms = |h: &Value, q: &str| h[q].as_f64().unwrap_or(0.0);
    println!(
        " streaming: {:>6} replies of 20 pieces 25 ms apart, one after another: first chunk p50 {:.2} ms p99 {:.2}; between chunks p50 {:.2} ms p99 {:.2}; whole reply p50 {:.1} ms",
        streaming["replies"],
        ms(&streaming["first_chunk_ms"], "p50"),
        ms(&streaming["first_chunk_ms"], "p99"),
        ms(&streaming["chunk_gap_ms"], "p50"),
        ms(&streaming["chunk_gap_ms"], "p99"),
        ms(&streaming["reply_ms"], "p50"),
    );
    if let Some(path) = json_path() {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}
