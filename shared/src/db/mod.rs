//! The database: a lazily connecting pool and one way to run tenant-scoped work.
//!
//! Every transaction starts with `select set_config(name, value, true)`, which lasts until the
//! transaction ends, so nothing leaks to the next user of a pooled connection and RDS Proxy
//! can still multiplex. Row-level security reads those settings (see `migrations/`); a
//! connection with none set sees no tenant's rows at all.
//!
//! The repositories below take `&mut PgConnection`: pass a [`Tx`] from [`Db::begin`].

pub mod agents;
pub mod connections;
pub mod conversations;
pub mod memberships;
pub mod messages;
pub mod tenants;
pub mod users;

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};

use crate::Error;
use crate::auth::PlatformAdmin;
use crate::config::DatabaseConfig;
use crate::domain::{ConnectionId, ConversationId, TenantId};

/// The schema's migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// A transaction whose scope is set; commit it to keep its writes.
pub type Tx = sqlx::Transaction<'static, Postgres>;

/// What a transaction may see. Each variant sets one setting that the row-level security
/// policies read.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One tenant's rows: the scope of almost all work.
    Tenant(TenantId),
    /// Every tenant's rows, read-only; only for a verified platform admin.
    AllTenants(PlatformAdmin),
    /// Exactly one conversation row, to learn its tenant before checking access to it.
    Conversation(ConversationId),
    /// Exactly one WebSocket connection row, which the route Lambdas find by the id API
    /// Gateway gives them.
    Connection(&'a ConnectionId),
}

impl Scope<'_> {
    fn setting(&self) -> (&'static str, String) {
        match self {
            Self::Tenant(id) => ("app.current_tenant", id.to_string()),
            Self::AllTenants(_) => ("app.platform_admin", "on".to_owned()),
            Self::Conversation(id) => ("app.current_conversation", id.to_string()),
            Self::Connection(id) => ("app.current_connection", id.as_str().to_owned()),
        }
    }
}

/// A row that was either found or created, and which of the two.
#[derive(Debug, Clone)]
pub struct Upserted<T> {
    pub row: T,
    pub created: bool,
}

/// The application's handle on Postgres; cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
}

impl Db {
    /// A pool that opens its first connection on first use, so a cold start does no network
    /// I/O.
    pub fn connect_lazy(config: &DatabaseConfig) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(config.options.clone());
        Self { pool }
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Starts a transaction that sees what `scope` allows and nothing else.
    pub async fn begin(&self, scope: Scope<'_>) -> Result<Tx, Error> {
        let mut tx = self.pool.begin().await?;
        let (name, value) = scope.setting();
        sqlx::query("select set_config($1, $2, true)")
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Whether the database answers (the health check).
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Refuses a role that row-level security would not hold (PROTOCOL §4): superusers and
    /// `BYPASSRLS` roles ignore every policy.
    pub async fn verify_role(&self) -> Result<(), Error> {
        let (name, superuser, bypass): (String, bool, bool) = sqlx::query_as(
            "select rolname::text, rolsuper, rolbypassrls from pg_roles where rolname = current_user",
        )
        .fetch_one(&self.pool)
        .await?;
        if superuser || bypass {
            return Err(Error::Internal(format!(
                "database role `{name}` is a superuser or has BYPASSRLS; row-level security would not hold"
            )));
        }
        Ok(())
    }

    /// Applies pending migrations after checking the role.
    pub async fn migrate(&self) -> Result<(), Error> {
        self.verify_role().await?;
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| Error::Internal(format!("migration failed: {e}")))
    }
}
