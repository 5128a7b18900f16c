//! A local stack for load: a database of its own, seeded with conversations, and
//! `konstruct-local` serving it.

use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use shared::auth::issue_token;
use shared::config::AuthConfig;
use shared::db::conversations::{self, Conversation};
use shared::db::messages::{Message, MessageStatus, StopReason, Usage};
use shared::db::{Db, Scope, message_path, seed};
use shared::domain::{ConversationId, MessageId, MessageText, Role, TenantId, TenantRole, UserId};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const SECRET: &str = "load-test-secret-0123456789abcdef0123456789";

/// A conversation to load, with its owner's token.
#[derive(Debug, Clone)]
pub struct Seat {
    pub tenant: TenantId,
    pub user: UserId,
    pub conversation: ConversationId,
    pub token: String,
}

/// Where the two database roles connect (infra/README.md, "Database roles"): the migrator owns
/// the schema, the runtime role (the functions') owns nothing.
#[derive(Debug, Clone)]
pub struct DatabaseUrls {
    pub runtime: String,
    pub migrator: String,
}

impl DatabaseUrls {
    /// `DATABASE_URL` and `MIGRATOR_DATABASE_URL`, as `infra/local/services.sh env` prints them.
    pub fn from_env() -> Self {
        let env = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run through `make test`, which starts the services")
            })
        };
        Self {
            runtime: env("DATABASE_URL"),
            migrator: env("MIGRATOR_DATABASE_URL"),
        }
    }

    /// The same roles on another database of the same server.
    pub fn for_database(&self, name: &str) -> Self {
        let swap = |url: &str| {
            let cut = url.rfind('/').expect("a database URL names a database");
            format!("{}/{name}", &url[..cut])
        };
        Self {
            runtime: swap(&self.runtime),
            migrator: swap(&self.migrator),
        }
    }

    /// Creates a database of a fresh name starting with `prefix`, owned by the migrator.
    pub async fn create_database(&self, prefix: &str) -> anyhow::Result<String> {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnectOptions::from_str(&self.migrator)?
            .connect()
            .await?;
        sqlx::query(AssertSqlSafe(format!("create database {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await.ok();
        Ok(name)
    }
}

/// A fresh database on the server `urls` reach, migrated by the migrator, with `n` users each
/// owning a conversation with one echo agent. Returns the runtime role's URL and handle, and
/// the seats.
pub async fn seeded_database(
    urls: &DatabaseUrls,
    n: usize,
) -> anyhow::Result<(String, Db, Vec<Seat>)> {
    seeded_database_with(urls, n, &seed::AgentPlan::echo("Echo")).await
}

/// The same, the conversations with an agent of this plan.
pub async fn seeded_database_with(
    urls: &DatabaseUrls,
    n: usize,
    plan: &seed::AgentPlan<'_>,
) -> anyhow::Result<(String, Db, Vec<Seat>)> {
    let name = urls.create_database("load").await?;
    let urls = urls.for_database(&name);
    let migrator = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(PgConnectOptions::from_str(&urls.migrator)?)
        .await?;
    Db::from_pool(migrator.clone()).migrate().await?;
    // The portal's rows are the owner's to write; the functions' role only reads them.
    let owner = Db::owner(migrator);
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(PgConnectOptions::from_str(&urls.runtime)?)
        .await?;
    let db = Db::from_pool(pool);
    let url = urls.runtime;

    let auth = AuthConfig::from_lookup(|k| (k == "PORTAL_JWT_SECRET").then(|| SECRET.to_owned()))?;
    let tenant = seed::tenant(&owner, TenantId::new(), "Load").await?;
    let agent = seed::agent(&owner, tenant, plan).await?;
    let mut seats = Vec::with_capacity(n);
    for i in 0..n {
        let user = seed::user(&owner, &format!("load-{i}-{name}@example.test"), "Load").await?;
        seed::member(&owner, tenant, user, TenantRole::CustomerOperator).await?;
        let conversation = seed::conversation(&owner, tenant, agent, user).await?;
        let token = issue_token(
            &auth,
            user,
            Role::CustomerOperator,
            Duration::from_secs(3600),
        )?;
        seats.push(Seat {
            tenant,
            user,
            conversation,
            token,
        });
    }
    owner.pool().close().await;
    Ok((url, db, seats))
}

/// The floors' first write (`loadgen`, `aws_sim`): `text` stored as a user message of the seat's
/// conversation directly, in a transaction of its own, without what the message path adds
/// (authorization, limits, recipients). Returns the conversation and the message's id.
pub async fn store_message_directly(
    db: &Db,
    seat: &Seat,
    text: &MessageText,
) -> anyhow::Result<(Conversation, MessageId)> {
    let mut tx = db.begin(Scope::Tenant(seat.tenant)).await?;
    let conversation = conversations::find(&mut tx, seat.conversation)
        .await?
        .context("a seeded conversation")?;
    let stored = store_history(&mut tx, &conversation, text).await?;
    tx.commit().await?;
    Ok((conversation, stored.id))
}

/// History as a fixture: a user message written straight into the conversation, at the end of
/// its current branch, numbered and made its head as a user message is. Production stores a
/// user message only through a socket's `accept_message` (which the socket tests drive); this
/// writes history in bulk without a socket, a rate window or recipients, as the seeds write
/// tenants. Run it in the conversation's tenant scope.
pub async fn store_history(
    conn: &mut sqlx::PgConnection,
    conversation: &Conversation,
    text: &MessageText,
) -> Result<Message, shared::Error> {
    Ok(sqlx::query_as(
        "with locked as (
             select id, head_id from web_conversations where id = $1
             for no key update
         ), inserted as (
             insert into web_conversation_messages
                 (conversation_id, tenant_id, role, content, author_id, parent_id, reply_id)
             select $1, $2, 'user', $3, $4, next_parent(l.id, l.head_id), gen_random_uuid()
             from locked l
             returning *
         )
         select * from inserted",
    )
    .bind(conversation.id)
    .bind(conversation.tenant_id)
    .bind(text.as_str())
    .bind(conversation.user_id)
    .fetch_one(conn)
    .await?)
}

/// The portal taking the user out of the tenant (the portal writes memberships; the functions
/// only read them). Run it as the tables' owner, in the tenant's scope. Whether there was one.
pub async fn revoke_membership(
    conn: &mut sqlx::PgConnection,
    tenant_id: TenantId,
    user_id: UserId,
) -> Result<bool, shared::Error> {
    let done = sqlx::query("delete from user_tenant_roles where tenant_id = $1 and user_id = $2")
        .bind(tenant_id)
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// A whole reply stored at once (not streamed), through the statement the orchestrator's
/// stream ends with ([`message_path::write_reply`] with `Complete`).
pub async fn store_reply(
    db: &Db,
    conversation: &Conversation,
    id: MessageId,
    reply_to: MessageId,
    content: &str,
    stop: StopReason,
    usage: Option<Usage>,
) -> Result<message_path::StoredReply, shared::Error> {
    message_path::write_reply(
        db,
        conversation,
        message_path::ReplyWrite {
            id,
            reply_to,
            producer: Uuid::nil(),
            text: content,
            status: MessageStatus::Complete,
            stop: Some(stop),
            usage,
        },
    )
    .await
}

/// The floors' second write: a whole reply to `reply_to`, stored directly in a step of its own.
pub async fn store_reply_directly(
    db: &Db,
    conversation: &Conversation,
    reply_to: MessageId,
) -> anyhow::Result<()> {
    store_reply(
        db,
        conversation,
        MessageId::new(),
        reply_to,
        "Echo: floor message",
        StopReason::End,
        None,
    )
    .await?;
    Ok(())
}

/// A `konstruct-local` process; killed when dropped.
pub struct Server {
    pub child: Child,
    /// `127.0.0.1:port`
    pub address: String,
    /// Every line it wrote to stderr (its log), as written.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `bin` with these arguments; when it serves, waits for its address.
    pub async fn start(
        bin: &str,
        database_url: &str,
        redis_url: &str,
        redis_prefix: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("KONSTRUCT_REDIS_PREFIX", redis_prefix)
            .env("KONSTRUCT_MODE", "local")
            .env("PORTAL_JWT_SECRET", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn,konstruct_local=info".into()),
            )
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {bin}"))?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut address = String::new();
        if args.first().is_none_or(|a| *a == "serve") {
            address = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(line) = lines.next_line().await? {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(anyhow!("konstruct-local exited before listening"))
            })
            .await
            .context("konstruct-local did not listen within 30 s")??;
        }
        let echo = std::env::var_os("TEST_LOG").is_some();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("[konstruct-local] {line}");
                }
                kept.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(Self {
            child,
            address,
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// CPU seconds a process has used so far, and its peak resident memory in bytes (Linux).
pub fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, peak_kb * 1024))
}
