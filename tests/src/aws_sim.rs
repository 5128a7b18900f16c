//! The AWS path on one machine: the deployed shape, with an emulator or a stand-in for each AWS
//! piece and a real network delay on each hop.
//!
//! ```text
//! client ──20 ms──▶ konstruct-local serve --no-worker --lambda-endpoint   (API Gateway)
//!                     │ route events ─▶ Lambda (tests::lambda): ws-connect, ws-auth,
//!                     │                 ws-message, ws-disconnect binaries
//!                     ◀──10 ms── @connections posts from the functions
//! functions ──1 ms──▶ PgBouncer (transaction mode) ─▶ Postgres          (RDS Proxy, RDS)
//!           ──10 ms─▶ moto's SQS ◀── event source (tests::event_source) ─▶ orchestrator binary
//! ```
//!
//! The functions run as the template deploys them (`KONSTRUCT_MODE=aws`, `DATABASE_POOLED`,
//! the orchestrator's job budget, receives, dead-letter queue and posting budget); the route
//! functions' timeouts and each function's concurrency are the template's. What it does not
//! model is listed in the README (The AWS path on this machine).

use std::time::Duration;

use anyhow::Context;
use aws_sdk_sqs::types::QueueAttributeName;
use axum::body::Bytes;
use serde_json::json;

use crate::event_source::{EventSource, Function};
use crate::lambda::{FunctionSpec, Lambda};
use crate::latency::LatencyProxy;
use crate::stack::{SECRET, Server};

/// The gateway's `application_name` on its own (direct) database connections.
pub const GATEWAY_APPLICATION: &str = "konstruct-gateway";

/// Round-trip times added on each hop.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    /// Functions to Postgres (through the pooler).
    pub database: Duration,
    /// Functions to SQS.
    pub sqs: Duration,
    /// Functions to the connection-management API.
    pub management: Duration,
    /// The client to API Gateway.
    pub client: Duration,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            database: Duration::from_millis(1),
            sqs: Duration::from_millis(10),
            management: Duration::from_millis(10),
            client: Duration::from_millis(20),
        }
    }
}

/// Where the stack's pieces are and how they are set.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The runtime role's URL through PgBouncer, for the functions.
    pub pooled_database_url: String,
    /// The runtime role's URL, for the gateway (which stands in for API Gateway).
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    /// moto's server.
    pub moto_endpoint: String,
    /// Where the function binaries are (`target/debug` or `target/release`).
    pub bin_dir: std::path::PathBuf,
    /// An OpenAI-compatible model for the agents that use one.
    pub model_base_url: Option<String>,
    pub latencies: Latencies,
    /// The event source's `MaximumConcurrency` (the template's `OrchestratorMaxConcurrency`).
    pub orchestrator_concurrency: usize,
    /// Environments per route function (reserved concurrency).
    pub route_concurrency: usize,
    /// The deployment's posts a second (`PostBudgetPerSecond`); `None` for none.
    pub post_budget: Option<u32>,
    /// The account's `@connections` quota as posts a second and a burst (AWS's default:
    /// 10,000 and 5,000); past it the management API answers 429. `None` for none.
    pub management_quota: Option<(u32, u32)>,
}

/// A running stack; everything stops when it is dropped.
pub struct AwsSim {
    /// Where clients connect (`127.0.0.1:port`, through the client's latency).
    pub address: String,
    pub gateway: Server,
    gateway_start: GatewayStart,
    pub lambda: Lambda,
    pub source: EventSource,
    pub work_queue_url: String,
    pub dead_letter_queue_url: String,
    pub latencies: Latencies,
    _pollers: tokio::task::JoinSet<()>,
    /// The functions' way to SQS.
    sqs: LatencyProxy,
    _proxies: Vec<LatencyProxy>,
}

/// The runtime role's URL through the pooler (`POOLED_DATABASE_URL`, which `make test` and
/// `make aws-sim` set), for the database `runtime_url` names.
pub fn pooled_url(runtime_url: &str) -> anyhow::Result<String> {
    let name = runtime_url.rsplit('/').next().context("a database URL")?;
    let pooler = std::env::var("POOLED_DATABASE_URL")
        .context("POOLED_DATABASE_URL is not set: the AWS path needs the services")?;
    let cut = pooler.rfind('/').context("a database URL")?;
    Ok(format!("{}/{name}", &pooler[..cut]))
}

fn address_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, a)| a)
        .to_owned()
}

impl AwsSim {
    pub async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let latencies = settings.latencies;
        let gateway_port = free_port()?;
        let gateway_address = format!("127.0.0.1:{gateway_port}");
        let database = LatencyProxy::start(
            &address_of(&settings.pooled_database_url),
            latencies.database,
        )
        .await?;
        let sqs = LatencyProxy::start(&address_of(&settings.moto_endpoint), latencies.sqs).await?;
        let management = LatencyProxy::start(&gateway_address, latencies.management).await?;
        let client = LatencyProxy::start(&gateway_address, latencies.client).await?;

        let sqs_client = sqs_client(&settings.moto_endpoint);
        let (work_queue_url, dead_letter_queue_url) = fifo_queues(&sqs_client, 1000).await?;
        let common: Vec<(String, String)> = [
            ("KONSTRUCT_MODE", "aws".to_owned()),
            (
                "DATABASE_URL",
                database.in_url(&settings.pooled_database_url),
            ),
            ("DATABASE_POOLED", "true".to_owned()),
            ("PORTAL_JWT_SECRET", SECRET.to_owned()),
            ("QUEUE_URL", work_queue_url.clone()),
            ("AWS_ENDPOINT_URL_SQS", format!("http://{}", sqs.address)),
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            (
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let route = |name: &str, extra: Vec<(&str, String)>| FunctionSpec {
            name: name.to_owned(),
            binary: settings.bin_dir.join(name),
            env: common
                .iter()
                .cloned()
                .chain(extra.into_iter().map(|(k, v)| (k.to_owned(), v)))
                .collect(),
            timeout: Duration::from_secs(10),
            concurrency: settings.route_concurrency,
        };
        let management_endpoint = format!("http://{}", management.address);
        let with_endpoint = || vec![("WS_MANAGEMENT_ENDPOINT", management_endpoint.clone())];
        let mut orchestrator_env = with_endpoint();
        orchestrator_env.extend([
            ("DEAD_LETTER_QUEUE_URL", dead_letter_queue_url.clone()),
            ("AGENT_TIMEOUT_SECONDS", "25".to_owned()),
            ("AGENT_MAX_ATTEMPTS", "2".to_owned()),
            ("JOB_BUDGET_SECONDS", "30".to_owned()),
            ("MAX_RECEIVE_COUNT", "5".to_owned()),
        ]);
        if let Some(base_url) = &settings.model_base_url {
            orchestrator_env.push(("OPENAI_BASE_URL", base_url.clone()));
            orchestrator_env.push(("OPENAI_API_KEY", "sk-sim".to_owned()));
        }
        if let Some(budget) = settings.post_budget {
            orchestrator_env.push(("POST_BUDGET_PER_SECOND", budget.to_string()));
            orchestrator_env.push((
                "POST_BUDGET_SHARES",
                settings.orchestrator_concurrency.to_string(),
            ));
        }
        let orchestrator_timeout = Duration::from_secs(60);
        let lambda = Lambda::start(vec![
            route("ws-connect", with_endpoint()),
            route("ws-auth", with_endpoint()),
            route("ws-message", with_endpoint()),
            route("ws-disconnect", with_endpoint()),
            FunctionSpec {
                timeout: orchestrator_timeout,
                concurrency: settings.orchestrator_concurrency,
                ..route("orchestrator", orchestrator_env)
            },
        ])
        .await?;

        let gateway_start = GatewayStart {
            settings: settings.clone(),
            address: gateway_address,
            lambda_url: lambda.url.clone(),
        };
        let gateway = gateway_start.start().await?;

        let mut source = EventSource::new(sqs_client, &work_queue_url, orchestrator_timeout);
        source.max_concurrency = settings.orchestrator_concurrency;
        let pollers = source.start(invoker(&lambda, "orchestrator"));
        Ok(Self {
            address: client.address.clone(),
            gateway,
            gateway_start,
            lambda,
            source,
            work_queue_url,
            dead_letter_queue_url,
            latencies,
            _pollers: pollers,
            sqs,
            _proxies: vec![database, management, client],
        })
    }
}

impl AwsSim {
    /// Posts the management API answered 429 since the gateway started (0 without a quota).
    pub async fn throttled(&self) -> anyhow::Result<u64> {
        let url = format!("http://{}/@quota", self.gateway.address);
        let answer: serde_json::Value = reqwest::get(url).await?.error_for_status()?.json().await?;
        Ok(answer["throttled"].as_u64().unwrap_or(0))
    }

    /// SQS calls so far: the functions' (each a request through their latency proxy) and the
    /// event source's for messages (receives that returned some, and deletes).
    pub fn sqs_calls(&self) -> u64 {
        self.sqs.http_requests() + self.source.calls()
    }

    /// Kills the gateway and starts it again on its port: every socket drops at once, as when
    /// API Gateway loses its connections; clients reconnect and resume.
    pub async fn restart_gateway(&mut self) -> anyhow::Result<()> {
        let _ = self.gateway.child.kill().await;
        self.gateway = self.gateway_start.start().await?;
        Ok(())
    }
}

/// How the gateway (`konstruct-local`, standing in for API Gateway) is started.
struct GatewayStart {
    settings: Settings,
    address: String,
    lambda_url: String,
}

impl GatewayStart {
    async fn start(&self) -> anyhow::Result<Server> {
        let settings = &self.settings;
        // Named, so that a count of the functions' server connections can leave it out.
        let separator = if settings.database_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let gateway_database_url = format!(
            "{}{separator}application_name={GATEWAY_APPLICATION}",
            settings.database_url
        );
        let mut arguments = vec![
            "serve".to_owned(),
            "--no-worker".to_owned(),
            "--listen".to_owned(),
            self.address.clone(),
            "--lambda-endpoint".to_owned(),
            self.lambda_url.clone(),
        ];
        if let Some((rate, burst)) = settings.management_quota {
            arguments.extend([
                "--management-quota".to_owned(),
                rate.to_string(),
                "--management-burst".to_owned(),
                burst.to_string(),
            ]);
        }
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        Server::start(
            &settings.bin_dir.join("konstruct-local").to_string_lossy(),
            &gateway_database_url,
            &settings.redis_url,
            &settings.redis_prefix,
            &arguments,
            &[],
        )
        .await
        .context("the gateway (konstruct-local) did not start")
    }
}

/// The event source's function: the orchestrator invoked through the Lambda emulator.
fn invoker(lambda: &Lambda, function: &'static str) -> Function {
    let lambda = lambda.clone();
    std::sync::Arc::new(move |event, _deadline| {
        let lambda = lambda.clone();
        Box::pin(async move {
            let payload = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
            match lambda.invoke(function, payload).await {
                Ok(body) => serde_json::from_slice(&body).unwrap_or_default(),
                // A failed or timed-out invocation fails its whole batch, as Lambda's does.
                Err(error) => {
                    tracing::warn!(%error, "orchestrator invocation failed");
                    shared::orchestrator::failures(&event.records)
                }
            }
        })
    })
}

fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::config::Builder::new()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing", "testing", None, None, "aws-sim",
        ))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// A work queue and its dead-letter queue, as the template makes them (FIFO, deduplication by
/// id, visibility six minutes), the work queue redriving after `backstop` receives; their URLs.
pub async fn fifo_queues(
    client: &aws_sdk_sqs::Client,
    backstop: u32,
) -> anyhow::Result<(String, String)> {
    let name = format!("sim-{}", uuid::Uuid::new_v4().simple());
    let create = |name: String| {
        client
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false")
            .attributes(QueueAttributeName::VisibilityTimeout, "360")
    };
    let dead = create(format!("{name}-dead.fifo"))
        .send()
        .await?
        .queue_url
        .context("no queue URL")?;
    let arn = client
        .get_queue_attributes()
        .queue_url(&dead)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .context("no queue ARN")?;
    let redrive = json!({ "deadLetterTargetArn": arn, "maxReceiveCount": backstop });
    let work = create(format!("{name}.fifo"))
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .send()
        .await?
        .queue_url
        .context("no queue URL")?;
    Ok((work, dead))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
