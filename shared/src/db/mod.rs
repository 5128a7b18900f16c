//! The database: a lazily connecting pool and one way to run tenant-scoped work.
//!
//! Every transaction starts with `begin; select set_config(name, value, true)`, sent together
//! in one round trip. The setting lasts until the transaction ends, so nothing leaks to the
//! next user of a pooled connection and RDS Proxy can still multiplex. Row-level security reads those settings (see `migrations/`); a
//! connection with none set sees no tenant's rows at all.
//!
//! The repositories below take `&mut PgConnection`: pass a [`Tx`] from [`Db::begin`].

pub mod agents;
pub mod connections;
pub mod conversations;
pub mod memberships;
pub mod message_path;
pub mod messages;
pub mod tenants;
pub mod users;

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgPool, Postgres};

use crate::Error;
use crate::auth::PlatformAdmin;
use crate::config::DatabaseConfig;
use crate::domain::{ConnectionId, ConversationId, TenantId};

/// The schema's migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How long a pooled connection may sit unused before it is pinged on its next acquire.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(10);

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
    /// One connection row and the tenant it is bound to (none before `auth`): what the message
    /// route needs to check the socket, count it and store its message in one transaction.
    BoundConnection(&'a ConnectionId),
    /// One connection row, the conversation it named at `$connect`, and that conversation's
    /// tenant: what `auth` needs to check the caller and bind the socket in one transaction.
    ConnectingConnection(&'a ConnectionId),
}

impl Scope<'_> {
    /// The statements that open a transaction in this scope, sent as one simple query: one
    /// round trip for `BEGIN` and the settings together. Values are quoted literals (a simple
    /// query takes no parameters); every one of them is a parsed UUID or connection id.
    fn begin_statement(&self) -> String {
        let set = |name: &str, value: &str| {
            format!("select set_config('{name}', {}, true)", literal(value))
        };
        let setting = match self {
            Self::Tenant(id) => set("app.current_tenant", &id.to_string()),
            Self::AllTenants(_) => set("app.platform_admin", "on"),
            Self::Conversation(id) => set("app.current_conversation", &id.to_string()),
            Self::Connection(id) => set("app.current_connection", id.as_str()),
            // The tenant is read from the row the connection key has just made visible: a
            // later statement of the same query sees the earlier one's setting.
            Self::BoundConnection(id) => format!(
                "{}; select set_config('app.current_tenant', coalesce((\
                     select tenant_id::text from ws_connections \
                     where connection_id = current_setting('app.current_connection')), ''), true)",
                set("app.current_connection", id.as_str())
            ),
            // Each setting makes the next row visible: the connection, then its conversation
            // (through the conversation key), then that conversation's tenant.
            Self::ConnectingConnection(id) => format!(
                "{}; select set_config('app.current_conversation', coalesce((\
                     select conversation_id::text from ws_connections \
                     where connection_id = current_setting('app.current_connection')), ''), true); \
                 select set_config('app.current_tenant', coalesce((\
                     select tenant_id::text from web_conversations \
                     where id = nullif(current_setting('app.current_conversation'), '')::uuid), ''), \
                     true)",
                set("app.current_connection", id.as_str())
            ),
        };
        format!("begin; {setting}")
    }
}

/// A string as an SQL literal (`standard_conforming_strings` is on, as it is by default).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
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
    ///
    /// A connection is not pinged before every use (a round trip each time): only one that sat
    /// idle longer than [`PING_AFTER_IDLE`] is, which is what a Lambda thawed after minutes
    /// frozen holds, and what RDS Proxy or a NAT may have dropped meanwhile. A connection that
    /// breaks between two busy uses fails its statement, and the caller's error path (a route's
    /// `internal`, a job's retry) covers it.
    pub fn connect_lazy(config: &DatabaseConfig) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(60))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
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
        Ok(self
            .pool
            .begin_with(AssertSqlSafe(scope.begin_statement()))
            .await?)
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
        Ok(MIGRATOR.run(&self.pool).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_opens_in_one_simple_query_with_quoted_values() {
        let tenant = TenantId::new();
        assert_eq!(
            Scope::Tenant(tenant).begin_statement(),
            format!("begin; select set_config('app.current_tenant', '{tenant}', true)")
        );
        let id = ConnectionId::parse("L0SM9cOFvHcCIhw=").unwrap();
        let bound = Scope::BoundConnection(&id).begin_statement();
        assert!(bound.starts_with(
            "begin; select set_config('app.current_connection', 'L0SM9cOFvHcCIhw=', true); "
        ));
        assert!(bound.contains("set_config('app.current_tenant'"));
        assert_eq!(literal("it's"), "'it''s'");
    }
}
