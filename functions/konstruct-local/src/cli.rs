//! The subcommands of `konstruct-local`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use clap::{Parser, Subcommand};
use serde_json::json;
use shared::api::{self, ApiState};
use shared::auth::{TokenVerifier, issue_token};
use shared::config::routes::{Limits, SocketCaps};
use shared::config::variables::default_of;
use shared::config::{self, AuthConfig, DatabaseConfig, Mode, env, redis_prefix};
use shared::db::{Db, seed};
use shared::domain::{Role, TenantRole, UserId};
use shared::orchestrator::OrchestratorState;
use shared::queue::RedisQueue;
use shared::secrets::Secrets;
use shared::worker::Worker;
use shared::ws::{Edge, WsState};
use tokio::sync::mpsc;

use crate::gateway::{Dispatch, Gateway};
use crate::sockets::Sockets;

type CliError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "konstruct-local",
    about = "Konstruct web chat on a laptop: the Lambda handlers behind a local WebSocket gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Gateway, REST API, chat page and (unless --no-worker) the orchestrator worker (default).
    Serve(ServeArgs),
    /// The orchestrator worker alone, on the Redis queue.
    Worker {
        /// This worker's consumer name; keep it stable across restarts.
        #[arg(long, default_value = "local-worker")]
        consumer: String,
    },
    /// Applies the database migrations, as the role that owns the schema
    /// (`MIGRATOR_DATABASE_URL`).
    Migrate,
    /// Creates (or finds) a demo tenant, user, echo agent and conversation; prints them and a
    /// token as JSON.
    SeedDemo {
        /// Where the chat page is served, for the printed URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Print `name='value'` lines for a shell to `eval` instead of JSON.
        #[arg(long)]
        shell: bool,
    },
    /// Mints a development token (refused when KONSTRUCT_MODE=aws).
    Token {
        #[arg(long)]
        user: UserId,
        #[arg(long, default_value = "customer_operator")]
        role: String,
        #[arg(long, default_value_t = 12)]
        hours: u64,
    },
    /// Prints the registry (functions, routes, variables, metrics) as JSON, for
    /// `infra/validate_template.py template.yaml --registry FILE`.
    Registry,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "KONSTRUCT_LISTEN", default_value = default_of("KONSTRUCT_LISTEN"))]
    listen: SocketAddr,
    /// Run no worker here: start `konstruct-local worker` separately (they meet through Redis).
    #[arg(long)]
    no_worker: bool,
    /// Send route events to functions under `cargo lambda watch` at this URL (its Lambda invoke
    /// API, e.g. http://127.0.0.1:9000) instead of handling them in-process.
    #[arg(long, env = "KONSTRUCT_LAMBDA_ENDPOINT")]
    lambda_endpoint: Option<String>,
    /// Seconds a socket may stay unauthenticated before it is closed.
    #[arg(long, default_value_t = 10)]
    auth_timeout: u64,
    /// Seconds a socket may live, as API Gateway's 2-hour limit (closed with 1001).
    #[arg(long, env = "KONSTRUCT_WS_MAX_SECONDS", default_value = default_of("KONSTRUCT_WS_MAX_SECONDS"))]
    max_connection: u64,
    /// Seconds without a frame from the client before its socket is closed (1001), as API
    /// Gateway's 10-minute idle timeout.
    #[arg(long, env = "KONSTRUCT_WS_IDLE_SECONDS", default_value = default_of("KONSTRUCT_WS_IDLE_SECONDS"))]
    idle_timeout: u64,
    /// Posts a second the connection-management API accepts, as the account's `@connections`
    /// quota: past it a post is answered 429 `LimitExceededException` (none when unset; AWS's
    /// default is 10,000 a second).
    #[arg(long)]
    management_quota: Option<std::num::NonZeroU32>,
    /// Posts the quota lets through at once (its burst; AWS's default is 5,000).
    #[arg(long, requires = "management_quota")]
    management_burst: Option<std::num::NonZeroU32>,
}

/// Local mode only: the gateway needs Redis, and dev tokens must never reach a deployed stack.
fn redis_url() -> Result<String, CliError> {
    match Mode::from_lookup(env)? {
        Mode::Local { redis_url } => Ok(redis_url),
        Mode::Aws { .. } => Err("konstruct-local runs in KONSTRUCT_MODE=local only".into()),
    }
}

/// Development commands refuse a deployed configuration: `KONSTRUCT_MODE=aws`, however spaced
/// or cased (the mode parser reads it trimmed, so must this check).
fn refuse_aws_mode(command: &str) -> Result<(), CliError> {
    if config::deployed(&env) {
        return Err(format!("refusing to run {command} with KONSTRUCT_MODE=aws").into());
    }
    Ok(())
}

async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
}

impl Cli {
    pub async fn run(self) -> Result<(), CliError> {
        let command = match self.command {
            Some(command) => command,
            None => Cli::parse_from(["konstruct-local", "serve"])
                .command
                .expect("serve"),
        };
        match command {
            Command::Serve(args) => serve(args).await,
            Command::Worker { consumer } => {
                let queue = RedisQueue::new(&redis_url()?, &redis_prefix(&env))?;
                let state = OrchestratorState::load(env).await?;
                tracing::info!(%consumer, "worker running");
                Worker::new(queue, &consumer)
                    .run(&state, shutdown_signal())
                    .await?;
                Ok(())
            }
            Command::Migrate => {
                let config = DatabaseConfig::load_migrator(env, &Secrets::none()).await?;
                Db::connect_lazy(&config).migrate().await?;
                eprintln!("migrations applied");
                Ok(())
            }
            Command::SeedDemo { url, shell } => {
                refuse_aws_mode("seed-demo")?;
                seed_demo(&url, shell).await
            }
            Command::Token { user, role, hours } => {
                refuse_aws_mode("token")?;
                let role: Role = role.parse()?;
                let token = issue_token(
                    &AuthConfig::from_lookup(env)?,
                    user,
                    role,
                    Duration::from_secs(hours * 3600),
                )?;
                println!("{token}");
                Ok(())
            }
            Command::Registry => {
                println!("{:#}", shared::registry::document());
                Ok(())
            }
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let listen = args.listen;
    let redis_url = redis_url()?;
    let db = Db::connect_lazy(&DatabaseConfig::from_lookup(env)?);
    let tokens = TokenVerifier::new(&AuthConfig::from_lookup(env)?);
    let (subscriptions, changes) = mpsc::unbounded_channel();
    let sockets = Arc::new(Sockets::new(subscriptions));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let dispatch = match args.lambda_endpoint {
        Some(url) => Dispatch::Lambda {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
        },
        None => Dispatch::InProcess(Box::new(WsState::new(
            Edge {
                db: db.clone(),
                delivery: sockets.clone(),
                management_endpoint: Some(format!("http://{address}")),
            },
            tokens.clone(),
            Arc::new(RedisQueue::new(&redis_url, &redis_prefix(&env))?),
            Limits::from_lookup(env)?,
            SocketCaps::from_lookup(env)?,
        ))),
    };
    let gateway = Arc::new(Gateway {
        sockets: sockets.clone(),
        dispatch,
        db: db.clone(),
        host: address.to_string(),
        auth_timeout: Duration::from_secs(args.auth_timeout),
        max_connection: Duration::from_secs(args.max_connection),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        management_quota: args.management_quota.map(|rate| {
            crate::management::ManagementQuota::new(rate, args.management_burst.unwrap_or(rate))
        }),
    });
    let app = api::router(ApiState {
        db: db.clone(),
        tokens,
        delivery: sockets.clone(),
    })
    .merge(crate::gateway::router(gateway))
    .merge(crate::page::router())
    .merge(crate::metrics::router()?);

    tokio::spawn(crate::bridge::run(
        redis_url.clone(),
        sockets.clone(),
        changes,
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = if args.no_worker {
        None
    } else {
        let state = OrchestratorState::load(env).await?;
        let worker = Worker::new(
            RedisQueue::new(&redis_url, &redis_prefix(&env))?,
            "local-worker",
        );
        let mut stopped = stopped.clone();
        Some(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = worker.run(&state, shutdown).await {
                tracing::error!(error = %e, "worker stopped");
            }
        }))
    };

    eprintln!("konstruct-local listening on http://{address}");
    if !address.ip().is_loopback() {
        tracing::warn!(
            %address,
            "listening beyond this machine: the chat and its REST API are reachable from the \
             network (the connection-management API still answers loopback clients only)"
        );
    }
    let mut server_stopped = stopped.clone();
    // Every accepted socket carries small frames one after another: without TCP_NODELAY, Nagle's
    // algorithm holds each frame after the first until the client's delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        tokio::select! {
            () = shutdown_signal() => {}
            _ = server_stopped.wait_for(|s| *s) => {}
        }
        // Sockets are closed as going away; their clients reconnect to the next server.
        sockets.close_all(1001, "server shutting down");
    })
    .await?;
    let _ = stop.send(true);
    if let Some(worker) = worker {
        // The pass under way finishes; what it did not acknowledge is read again later.
        let _ = worker.await;
    }
    Ok(())
}

/// A fixed tenant id and email, so running it again finds what the first run made.
const DEMO_TENANT: &str = "d3e40000-0000-4000-8000-000000000001";
const DEMO_EMAIL: &str = "demo@konstruct.local";

/// The demo's rows are written as the schema's owner (`MIGRATOR_DATABASE_URL`): tenants,
/// users, memberships and agents are the portal's to write, and the runtime role only reads
/// them.
async fn seed_demo(url: &str, shell: bool) -> Result<(), CliError> {
    let owner = DatabaseConfig::load_migrator(env, &Secrets::none()).await?;
    let db = Db::connect_owner(&owner);
    let demo = seed::workspace(
        &db,
        &seed::Plan {
            tenant: DEMO_TENANT.parse()?,
            tenant_name: "Demo tenant",
            email: DEMO_EMAIL,
            user_name: "Demo user",
            role: TenantRole::CustomerAdmin,
            agent: seed::AgentPlan::echo("Echo agent"),
        },
    )
    .await?;

    let token = issue_token(
        &AuthConfig::from_lookup(env)?,
        demo.user,
        Role::CustomerAdmin,
        Duration::from_secs(12 * 3600),
    )?;
    let url = url.trim_end_matches('/');
    let seeded = json!({
        "tenant_id": demo.tenant,
        "user_id": demo.user,
        "agent_id": demo.agent,
        "conversation_id": demo.conversation,
        "token": token,
        "url": format!("{url}/?conversation={}#token={token}", demo.conversation),
    });
    if shell {
        // Every value is a URL, a UUID or a JWT: none holds a quote.
        for (name, value) in seeded.as_object().into_iter().flatten() {
            println!("{name}='{}'", value.as_str().unwrap_or_default());
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&seeded)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The flags' variables are in the one table of variables, as read by this binary.
    #[test]
    fn every_flag_variable_is_documented() {
        fn walk(command: &clap::Command, found: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if let Some(var) = arg.get_env() {
                    found.push(var.to_string_lossy().into_owned());
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, found);
            }
        }
        let mut found = Vec::new();
        walk(&Cli::command(), &mut found);
        assert!(found.len() >= 4, "{found:?}");
        for var in found {
            assert!(
                config::variables::read_by(&var, "konstruct-local"),
                "{var} is not in shared/src/config/variables.rs as read by konstruct-local"
            );
        }
    }
}
