//! Everything the integration tests share; a test file imports from here, never from another
//! test file. This module: a fresh migrated database per test ([`TestDb`]) and a Redis key
//! prefix. The servers come from `make test` (infra/local/services.sh), which exports
//! `DATABASE_URL` and `MIGRATOR_DATABASE_URL` (the runtime and migrator roles' maintenance
//! database), `POOLED_DATABASE_URL` (the runtime role through PgBouncer), `REDIS_URL` and
//! `MOTO_ENDPOINT`.
//!
//! - [`seed`]: tenants, users, agents, conversations (through `shared::db::seed`)
//! - [`tokens`]: portal tokens and callers
//! - [`logs`]: log lines a test reads
//! - [`aws`]: moto's SQS and the wire-level connection-management API; [`secrets`]: moto's
//!   Secrets Manager
//! - [`llm`]: fake model servers (OpenAI-compatible, Bedrock Converse)
//! - [`harness`]: the WebSocket routes' handlers driven as API Gateway would
//! - [`orchestrator`]: the orchestrator on the harness and the fake models
//! - [`streams`]: streamed replies as a client assembles them
//! - [`rest`]: the REST router in-process
//! - [`local`]: `konstruct-local` as a process, its sockets, a Redis of a test's own
//! - [`fixtures`]: the ids and secret of the event fixtures
//! - [`wait`]: waiting for what a test cannot be told of ([`eventually`], [`within`])

pub mod aws;
pub mod fixtures;
pub mod harness;
pub mod llm;
pub mod local;
pub mod logs;
pub mod orchestrator;
pub mod rest;
pub mod secrets;
pub mod seed;
pub mod streams;
pub mod tokens;
pub mod wait;

pub use logs::Captured;
pub use seed::*;
pub use tokens::*;
pub use wait::{eventually, within};

use std::str::FromStr;
use std::sync::Once;

use shared::db::Db;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use tests::stack::DatabaseUrls;
/// The portal secret of every stack the tests start (`tests::stack` gives it to the servers).
pub use tests::stack::SECRET;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through `make test`, which starts the services")
    })
}

pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .init();
        }
    });
}

/// A database of its own for one test, created and migrated by the migrator role (the schema's
/// owner), used by the runtime role (which owns nothing), as deployed; dropped by nobody:
/// `make test` throws the whole server away. Neither role is superuser or BYPASSRLS.
pub struct TestDb {
    /// The runtime role's pool: what the functions use.
    pub pool: PgPool,
    /// The runtime role's URL, for processes the test starts.
    pub url: String,
    /// The migrator role's pool and URL.
    pub migrator: PgPool,
    pub migrator_url: String,
}

impl TestDb {
    /// An empty database, not migrated.
    pub async fn empty() -> Self {
        init_tracing();
        let urls = DatabaseUrls::from_env();
        let name = urls
            .create_database("test")
            .await
            .expect("create the test database");
        let urls = urls.for_database(&name);
        let connect = |url: &str, max| {
            PgPoolOptions::new()
                .max_connections(max)
                .connect_lazy_with(PgConnectOptions::from_str(url).expect("a database URL"))
        };
        Self {
            pool: connect(&urls.runtime, 25),
            migrator: connect(&urls.migrator, 4),
            url: urls.runtime,
            migrator_url: urls.migrator,
        }
    }

    /// The runtime role's URL through PgBouncer (`POOLED_DATABASE_URL`, transaction mode).
    pub fn pooled_url(&self) -> String {
        let name = self
            .url
            .rsplit('/')
            .next()
            .expect("a database URL names a database");
        let pooler = env("POOLED_DATABASE_URL");
        let cut = pooler.rfind('/').expect("a database URL names a database");
        format!("{}/{name}", &pooler[..cut])
    }

    /// The application's handle on this database through PgBouncer, as a function behind RDS
    /// Proxy has it: `max_connections` per process, statements unnamed.
    pub fn pooled(&self, max_connections: u32) -> Db {
        Db::connect_lazy(&shared::config::DatabaseConfig {
            options: shared::config::connect_options(&self.pooled_url()).expect("a database URL"),
            max_connections,
            credentials: None,
            pooled: true,
            timeouts: Default::default(),
        })
    }

    /// A database with every migration applied, and the application's handle on it.
    pub async fn migrated() -> (Self, Db) {
        let test = Self::empty().await;
        Db::from_pool(test.migrator.clone())
            .migrate()
            .await
            .expect("migrations apply");
        let db = Db::from_pool(test.pool.clone());
        (test, db)
    }
}

/// A Redis key prefix of its own for one test.
pub fn redis_prefix() -> String {
    format!("test:{}:", Uuid::new_v4().simple())
}

pub fn redis_client() -> redis::Client {
    redis::Client::open(env("REDIS_URL")).expect("REDIS_URL")
}
