//! `coldstart`: each Lambda binary started against a minimal Lambda Runtime API (the documented
//! `/2018-06-01/runtime/invocation/next` protocol). Reports the time from exec to the first
//! `next` request (init) and to the first response, resident memory after it, and the sizes of
//! the binary and of its zip. Prints figures; it does not pass or fail.
//!
//! Usage: coldstart BIN_DIR [ZIP_DIR] [--runs N] [--json PATH]. The functions get the
//! environment the template gives them, with unreachable endpoints: init must not need them.
//! Each is measured twice: with its secrets as plain variables (local mode, tests), and named by
//! ARN as deployed, read at start from a fake Secrets Manager endpoint (its JSON protocol, on
//! this machine): the difference is what the secret fetch costs a cold start, less the network.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::mpsc;

const FUNCTIONS: [&str; 8] = [
    "chat-api",
    "migrate",
    "orchestrator",
    "ws-auth",
    "ws-connect",
    "ws-disconnect",
    "ws-message",
    "ws-sweep",
];

const DATABASE_URL: &str = "postgres://app@127.0.0.1:1/app";
const PORTAL_SECRET: &str = "a-portal-secret-of-at-least-32-bytes-0123";
const ARN: &str = "arn:aws:secretsmanager:us-east-1:123456789012:secret:konstruct/";

/// Secrets Manager's `GetSecretValue`, as the SDK calls it (JSON 1.1 over POST), for the
/// secrets the functions name.
async fn get_secret_value(body: axum::body::Bytes) -> impl IntoResponse {
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = request["SecretId"].as_str().unwrap_or_default().to_owned();
    let value = if id.ends_with("portal-AbCdEf") {
        PORTAL_SECRET
    } else {
        DATABASE_URL
    };
    (
        [("content-type", "application/x-amz-json-1.1")],
        axum::Json(json!({
            "ARN": id, "Name": "konstruct/secret", "SecretString": value,
            "VersionId": "00000000-0000-4000-8000-000000000001",
            "VersionStages": ["AWSCURRENT"], "CreatedDate": 1_764_000_000.0,
        })),
    )
}

/// The first event each function gets: one it can answer without a database.
fn event(function: &str) -> Value {
    let ws = |route: &str, body: Value, query: Value| {
        json!({
            "requestContext": { "routeKey": route, "eventType": "MESSAGE", "connectionId": "L0SM9cOFvHcCIhw=",
                                "domainName": "abc.execute-api.us-east-1.amazonaws.com", "stage": "prod",
                                "apiId": "abc", "requestId": "r", "connectedAt": 0, "requestTimeEpoch": 0 },
            "queryStringParameters": query, "body": body.as_str().map(str::to_owned), "isBase64Encoded": false,
        })
    };
    match function {
        "chat-api" => json!({
            "version": "2.0", "routeKey": "$default", "rawPath": "/api/portal/chat/openapi.json", "rawQueryString": "",
            "headers": { "host": "abc.execute-api.us-east-1.amazonaws.com" },
            "requestContext": { "accountId": "123456789012", "apiId": "abc", "domainName": "abc.execute-api.us-east-1.amazonaws.com",
                "http": { "method": "GET", "path": "/api/portal/chat/openapi.json", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "coldstart" },
                "requestId": "r", "routeKey": "$default", "stage": "$default", "time": "26/Nov/2026:00:00:00 +0000", "timeEpoch": 0 },
            "isBase64Encoded": false
        }),
        "orchestrator" => json!({ "Records": [] }),
        // A Delete: answered at the response URL (this server) without the database.
        "migrate" => json!({
            "RequestType": "Delete", "ResponseURL": "RESPONSE_URL", "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/s/1",
            "RequestId": "r", "LogicalResourceId": "Migrations", "PhysicalResourceId": "konstruct-schema",
            "ResourceType": "Custom::Migrations", "ResourceProperties": {}
        }),
        // A scheduled event: the sweep fails at once on the unreachable database.
        "ws-sweep" => {
            json!({ "source": "aws.events", "detail-type": "Scheduled Event", "detail": {} })
        }
        "ws-connect" => ws(
            "$connect",
            Value::Null,
            json!({ "conversation_id": "not-a-uuid" }),
        ),
        // Without a connection id these two answer at once, with no database or socket to reach.
        "ws-auth" | "ws-disconnect" => {
            let mut event = ws(
                "auth",
                json!("{\"type\":\"auth\",\"token\":\"x\"}"),
                Value::Null,
            );
            event["requestContext"]
                .as_object_mut()
                .unwrap()
                .remove("connectionId");
            event
        }
        _ => ws("ping", json!("{\"type\":\"ping\"}"), Value::Null),
    }
}

#[derive(Default)]
struct Seen {
    next: Option<Instant>,
    response: Option<Instant>,
}

type Shared = (Arc<Mutex<Seen>>, Value, mpsc::UnboundedSender<()>);

async fn next(State((seen, event, _)): State<Shared>) -> impl IntoResponse {
    let first = {
        let mut seen = seen.lock().unwrap();
        let first = seen.next.is_none();
        seen.next.get_or_insert_with(Instant::now);
        first
    };
    if !first {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        "Lambda-Runtime-Aws-Request-Id",
        "coldstart-1".parse().unwrap(),
    );
    headers.insert(
        "Lambda-Runtime-Deadline-Ms",
        "99999999999999".parse().unwrap(),
    );
    headers.insert(
        "Lambda-Runtime-Invoked-Function-Arn",
        "arn:aws:lambda:us-east-1:123456789012:function:coldstart"
            .parse()
            .unwrap(),
    );
    (headers, axum::Json(event))
}

async fn respond(State((seen, _, done)): State<Shared>) -> &'static str {
    seen.lock()
        .unwrap()
        .response
        .get_or_insert_with(Instant::now);
    let _ = done.send(());
    "{}"
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// How a function is given its secrets.
#[derive(Clone, Copy, PartialEq)]
enum Secrets {
    /// The values themselves, in plain variables.
    Plain,
    /// Named by ARN, read from the fake Secrets Manager at start.
    Managed,
}

/// One cold start: (init, first response, RSS after it).
async fn once(
    binary: &str,
    function: &str,
    secrets: Secrets,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (done, mut answered) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = listener.local_addr()?.to_string();
    let mut event = event(function);
    if let Some(url) = event.get_mut("ResponseURL") {
        *url = json!(format!("http://{api}/cloudformation-response"));
    }
    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(respond),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(respond))
        .route("/2018-06-01/runtime/init/error", post(respond))
        .route(
            "/cloudformation-response",
            axum::routing::put(|| async { "" }),
        )
        .route("/", post(get_secret_value))
        .with_state((seen.clone(), event, done));
    let secret_vars: Vec<(String, String)> = match secrets {
        Secrets::Plain => vec![
            ("DATABASE_URL".into(), DATABASE_URL.into()),
            ("MIGRATOR_DATABASE_URL".into(), DATABASE_URL.into()),
            ("PORTAL_JWT_SECRET".into(), PORTAL_SECRET.into()),
        ],
        Secrets::Managed => vec![
            (
                "DATABASE_URL_SECRET_ARN".into(),
                format!("{ARN}database-AbCdEf"),
            ),
            (
                "MIGRATOR_DATABASE_URL_SECRET_ARN".into(),
                format!("{ARN}migrator-AbCdEf"),
            ),
            (
                "PORTAL_JWT_SECRET_ARN".into(),
                format!("{ARN}portal-AbCdEf"),
            ),
            (
                "AWS_ENDPOINT_URL_SECRETS_MANAGER".into(),
                format!("http://{api}"),
            ),
        ],
    };
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let started = Instant::now();
    let mut child = Command::new(binary)
        .env_clear()
        .envs([
            ("AWS_LAMBDA_RUNTIME_API", api.as_str()),
            ("AWS_LAMBDA_FUNCTION_NAME", function),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
            ("AWS_LAMBDA_LOG_STREAM_NAME", "s"),
            ("AWS_LAMBDA_LOG_GROUP_NAME", "g"),
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("AWS_LAMBDA_LOG_LEVEL", "WARN"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("KONSTRUCT_MODE", "aws"),
            (
                "QUEUE_URL",
                "https://sqs.us-east-1.amazonaws.com/123456789012/w.fifo",
            ),
            ("WS_MANAGEMENT_ENDPOINT", "http://127.0.0.1:1/prod"),
        ])
        .envs(secret_vars)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {binary}"))?;
    tokio::time::timeout(Duration::from_secs(20), answered.recv())
        .await
        .with_context(|| format!("{function} did not answer"))?;
    let rss = child.id().map(rss_bytes).unwrap_or(0);
    let _ = child.kill().await;
    server.abort();
    let seen = seen.lock().unwrap();
    let init = seen.next.context("no next")? - started;
    let response = seen.response.context("no response")? - started;
    Ok((init, response, rss))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let bin_dir = args
        .get(1)
        .context("usage: coldstart BIN_DIR [ZIP_DIR] [--runs N] [--json PATH]")?;
    let zip_dir = args.get(2).filter(|a| !a.starts_with("--"));
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let runs: usize = flag("--runs").and_then(|r| r.parse().ok()).unwrap_or(10);

    let mut results = serde_json::Map::new();
    println!(
        "{:<14} {:>9} {:>9} {:>14} {:>13} {:>17} {:>8} {:>10} {:>9}",
        "function",
        "init ms",
        "min ms",
        "1st reply ms",
        "init+secrets",
        "1st reply+secrets",
        "rss MB",
        "binary MB",
        "zip MB"
    );
    for function in FUNCTIONS {
        let binary = format!("{bin_dir}/{function}");
        let (mut inits, mut replies, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        let (mut managed_inits, mut managed_replies) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (init, reply, memory) = once(&binary, function, Secrets::Plain).await?;
            inits.push(init.as_secs_f64() * 1000.0);
            replies.push(reply.as_secs_f64() * 1000.0);
            rss.push(memory as f64 / 1048576.0);
            let (init, reply, _) = once(&binary, function, Secrets::Managed).await?;
            managed_inits.push(init.as_secs_f64() * 1000.0);
            managed_replies.push(reply.as_secs_f64() * 1000.0);
        }
        let size = |path: String| {
            std::fs::metadata(path)
                .map(|m| m.len() as f64 / 1048576.0)
                .ok()
        };
        let binary_mb = size(binary.clone());
        let zip_mb = zip_dir.and_then(|d| size(format!("{d}/{function}/bootstrap.zip")));
        let min = inits.iter().copied().fold(f64::MAX, f64::min);
        let row = json!({
            "init_ms_median": median(inits.clone()), "init_ms_min": min,
            "first_response_ms_median": median(replies), "rss_mb_median": median(rss),
            "init_with_secrets_ms_median": median(managed_inits),
            "first_response_with_secrets_ms_median": median(managed_replies),
            "binary_mb": binary_mb, "zip_mb": zip_mb, "runs": runs,
        });
        println!(
            "{function:<14} {:>9.2} {:>9.2} {:>14.2} {:>13.2} {:>17.2} {:>8.1} {:>10} {:>9}",
            row["init_ms_median"].as_f64().unwrap_or(0.0),
            min,
            row["first_response_ms_median"].as_f64().unwrap_or(0.0),
            row["init_with_secrets_ms_median"].as_f64().unwrap_or(0.0),
            row["first_response_with_secrets_ms_median"]
                .as_f64()
                .unwrap_or(0.0),
            row["rss_mb_median"].as_f64().unwrap_or(0.0),
            binary_mb.map_or("-".into(), |m| format!("{m:.1}")),
            zip_mb.map_or("-".into(), |m| format!("{m:.1}")),
        );
        results.insert(function.to_owned(), row);
    }
    if let Some(path) = flag("--json") {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(results))?)?;
    }
    Ok(())
}
