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
pub mod grants;
pub mod memberships;
pub mod message_path;
pub mod messages;
pub mod seed;
pub mod tenants;
pub mod users;

mod call;
pub mod checked;
mod scope;

pub use call::Call;
pub use scope::Scope;

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use futures::TryStreamExt;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArguments, PgPoolOptions, PgRow};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{AssertSqlSafe, Connection, FromRow, PgConnection, PgPool, Postgres, SqlSafeStr};
use tokio::sync::OnceCell;

use crate::Error;
use crate::config::{DatabaseConfig, TxTimeouts, connect_options};
use crate::secrets::Secret;
use secrecy::ExposeSecret;

/// The schema's migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Whether statements are prepared under a name and kept per connection (sqlx's default: one
/// round trip per statement once prepared). Off behind a pooler that multiplexes transactions
/// (RDS Proxy, PgBouncer in transaction mode): a named statement lives on one server
/// connection, which the next transaction may not get (PgBouncer then fails with `prepared
/// statement "sqlx_s_1" already exists`; RDS Proxy pins the session and stops multiplexing).
/// Unnamed, each statement is parsed again inside its transaction: one more round trip each.
/// Set once per process, from [`DatabaseConfig::pooled`], when the pool is built.
static NAMED_STATEMENTS: AtomicBool = AtomicBool::new(true);

fn named_statements() -> bool {
    NAMED_STATEMENTS.load(Ordering::Relaxed)
}

/// `sqlx::query`, prepared as this process's pooling allows: every statement goes through
/// these three.
pub fn query<'q>(sql: impl SqlSafeStr) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql).persistent(named_statements())
}

/// `sqlx::query_as`, prepared as this process's pooling allows.
pub fn query_as<'q, O>(sql: impl SqlSafeStr) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(named_statements())
}

/// `sqlx::query_scalar`, prepared as this process's pooling allows.
pub fn query_scalar<'q, O>(sql: impl SqlSafeStr) -> QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(named_statements())
}

/// How long a pooled connection may sit unused before it is pinged on its next acquire.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(10);

/// A transaction whose scope is set; commit it to keep its writes.
pub type Tx = sqlx::Transaction<'static, Postgres>;

fn rls_exempt(role: &str) -> Error {
    Error::Internal(format!(
        "database role `{role}` is a superuser or has BYPASSRLS; row-level security would not hold"
    ))
}

/// A refused login (SQLSTATE class 28: a wrong password, an unknown or locked role).
fn is_login_failure(err: &Error) -> bool {
    matches!(err, Error::Database(sqlx::Error::Database(db))
        if db.code().is_some_and(|code| code.starts_with("28")))
}

/// A row that was either found or created, and which of the two.
#[derive(Debug, Clone)]
pub struct Upserted<T> {
    pub row: T,
    pub created: bool,
}

/// The application's handle on Postgres; cheap to clone.
///
/// Its first transaction checks, once per process (a Lambda execution environment), that the
/// role it connects as is one row-level security holds: see [`Db::verify_runtime_role`].
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    role_verified: Arc<OnceCell<()>>,
    /// Read again when a login fails, so a rotated password takes effect.
    credentials: Option<Secret>,
    /// The last health check and when it ran (see [`Db::health`]), and how long it holds.
    health: Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>,
    health_ttl: Duration,
    timeouts: TxTimeouts,
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
        NAMED_STATEMENTS.store(!config.pooled, Ordering::Relaxed);
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
        Self {
            credentials: config.credentials.clone(),
            timeouts: config.timeouts,
            ..Self::from_pool(pool)
        }
    }

    /// A handle for the schema's owner, for what the portal writes in production (tenants,
    /// users, memberships, agents: demo data and tests' seeds); the runtime role may only read
    /// those (`db::grants`). Row-level security still holds for it (`FORCE`), so its scopes
    /// work as the runtime role's; the runtime role's check is not made.
    pub fn owner(pool: PgPool) -> Self {
        let db = Self::from_pool(pool);
        let _ = db.role_verified.set(());
        db
    }

    /// [`Db::owner`] on a lazily connecting pool of one connection.
    pub fn connect_owner(config: &DatabaseConfig) -> Self {
        Self::owner(
            PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(config.options.clone()),
        )
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            role_verified: Arc::default(),
            credentials: None,
            health: Arc::default(),
            health_ttl: Self::HEALTH_TTL,
            timeouts: TxTimeouts::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Starts a transaction that sees what `scope` allows and nothing else.
    pub async fn begin(&self, scope: Scope<'_>) -> Result<Tx, Error> {
        match self.begin_checked(scope).await {
            Err(err) if is_login_failure(&err) && self.credentials_changed().await => {
                self.begin_checked(scope).await
            }
            begun => begun,
        }
    }

    /// The process's first transactions also check the role (see [`Db::verify_runtime_role`]),
    /// inside the transaction: no extra round trip, and no statement outside a transaction (a
    /// pooler that multiplexes transactions could run its two halves on two servers).
    async fn begin_checked(&self, scope: Scope<'_>) -> Result<Tx, Error> {
        let mut tx = self
            .pool
            .begin_with(AssertSqlSafe(scope.begin_statement(self.timeouts)))
            .await?;
        if !self.role_verified.initialized() {
            check_runtime_role(&mut tx).await?;
            let _ = self.role_verified.set(());
        }
        Ok(tx)
    }

    /// One step in one round trip: the scope's settings and `call`, sent as one simple query,
    /// which Postgres runs as one transaction of its own (committed when its last statement
    /// succeeds, rolled back when any fails); the rows the call returns, decoded from text.
    ///
    /// [`Db::begin`] takes four round trips for one statement (`BEGIN` with the settings; the
    /// statement parsed, then bound and run, since behind a pooler it cannot stay prepared;
    /// `COMMIT`): what the message path's steps, each one function call, do not need. The
    /// function keeps its plans per server connection, so nothing is planned again per call.
    pub async fn call(&self, scope: Scope<'_>, call: Call) -> Result<Vec<PgRow>, Error> {
        match self.call_once(scope, &call).await {
            Err(err) if is_login_failure(&err) && self.credentials_changed().await => {
                self.call_once(scope, &call).await
            }
            called => called,
        }
    }

    async fn call_once(&self, scope: Scope<'_>, call: &Call) -> Result<Vec<PgRow>, Error> {
        if !self.role_verified.initialized() {
            // The process's first step checks the role first, in a transaction of its own.
            self.begin_checked(scope).await?.commit().await?;
        }
        let sql = format!("{}; {}", scope.settings(self.timeouts), call.sql());
        let mut conn = self.pool.acquire().await?;
        let mut results = sqlx::raw_sql(AssertSqlSafe(sql)).fetch_many(&mut *conn);
        // Rows, then the statement's completion, for each statement: keep the last one's.
        let (mut rows, mut last) = (Vec::new(), Vec::new());
        while let Some(result) = results.try_next().await? {
            match result {
                sqlx::Either::Left(_) => last = std::mem::take(&mut rows),
                sqlx::Either::Right(row) => rows.push(row),
            }
        }
        Ok(last)
    }

    /// [`Db::call`] for a function that returns at most one row.
    pub async fn call_one<T>(&self, scope: Scope<'_>, call: Call) -> Result<Option<T>, Error>
    where
        T: for<'r> FromRow<'r, PgRow>,
    {
        let rows = self.call(scope, call).await?;
        Ok(rows.first().map(T::from_row).transpose()?)
    }

    /// After a failed login: whether the credentials' secret holds a new value, which new
    /// connections then use.
    async fn credentials_changed(&self) -> bool {
        let Some(secret) = &self.credentials else {
            return false;
        };
        if !secret.refresh().await {
            return false;
        }
        match connect_options(secret.current().expose_secret()) {
            Ok(options) => {
                self.pool.set_connect_options(options);
                true
            }
            Err(problem) => {
                tracing::error!(secret = secret.var(), %problem, "the database secret's new value is unusable");
                false
            }
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        // A simple query: one message, whatever pools the connection.
        let ping = crate::call!("select 1 as alive");
        sqlx::raw_sql(AssertSqlSafe(ping.sql()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// How long a health check's answer is reused, unless [`Db::with_health_ttl`] says.
    pub const HEALTH_TTL: Duration = Duration::from_secs(5);

    /// This handle's health answers reused for `ttl` instead of [`Db::HEALTH_TTL`]: a test of
    /// the interval waits that long, not the production one.
    pub fn with_health_ttl(self, ttl: Duration) -> Self {
        Self {
            health_ttl: ttl,
            ..self
        }
    }

    /// Whether the database answered its last ping, pinging at most once per
    /// [`Db::HEALTH_TTL`] (or the handle's own TTL) however often it is asked: the health check
    /// takes no token, so its callers must not be able to turn it into load on the database.
    pub async fn health(&self) -> bool {
        let mut last = self.health.lock().await;
        if let Some((at, healthy)) = *last
            && at.elapsed() < self.health_ttl
        {
            return healthy;
        }
        let healthy = match self.ping().await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(
                    error = &err as &dyn std::error::Error,
                    "health check failed"
                );
                false
            }
        };
        *last = Some((std::time::Instant::now(), healthy));
        healthy
    }

    /// Refuses a role that row-level security would not hold (PROTOCOL §4): superusers and
    /// `BYPASSRLS` roles ignore every policy. The migrator is checked with this before it
    /// migrates.
    pub async fn refuse_rls_exempt_role(&self) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        let (name, superuser, bypass): (String, bool, bool) = crate::checked!(
            query_as,
            "select rolname::text, rolsuper, rolbypassrls from pg_roles where rolname = current_user"
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        if superuser || bypass {
            return Err(rls_exempt(&name));
        }
        Ok(())
    }

    /// What the functions' role must be (PROTOCOL §4, invariant 4): not exempt from row-level
    /// security, and owning nothing, neither by itself nor through a role it may become. An
    /// owner can `alter table … no force row level security` or `drop policy`; the owner of
    /// the database or of the schema can drop what is in it. [`Db::begin`] checks this in the
    /// process's first transaction and refuses to work until it passes; an error of the
    /// database itself is not remembered, so the next transaction checks again.
    pub async fn verify_runtime_role(&self) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        check_runtime_role(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies pending migrations after checking the role: run this as the migrator, the role
    /// that owns the schema.
    pub async fn migrate(&self) -> Result<(), Error> {
        self.refuse_rls_exempt_role().await?;
        Ok(MIGRATOR.run(&self.pool).await?)
    }
}

/// [`Db::verify_runtime_role`]'s check, on a connection in a transaction.
async fn check_runtime_role(conn: &mut PgConnection) -> Result<(), Error> {
    // One statement, in the first transaction of every execution environment.
    let (name, superuser, bypass, owned): (String, bool, bool, Option<String>) = crate::checked!(
        query_as,
        "select r.rolname::text, r.rolsuper, r.rolbypassrls,
                    (select what from (
                         select 'the database ' || quote_ident(d.datname) as what,
                                d.datdba as owner
                             from pg_database d where d.datname = current_database()
                         union all
                         select 'the schema public', n.nspowner
                             from pg_namespace n where n.nspname = 'public'
                         union all
                         select 'the table ' || c.oid::regclass::text, c.relowner
                             from pg_class c where c.relnamespace = 'public'::regnamespace
                     ) objects
                     where pg_has_role(current_user, owner, 'MEMBER')
                     limit 1)
             from pg_roles r where r.rolname = current_user"
    )
    .fetch_one(conn)
    .await?;
    if superuser || bypass {
        return Err(rls_exempt(&name));
    }
    if let Some(what) = owned {
        return Err(Error::Internal(format!(
            "database role `{name}` owns (or may act as the owner of) {what}; the functions \
             must connect as a role that owns nothing, or row-level security could be \
             switched off (infra/README.md, \"Database roles\")"
        )));
    }
    Ok(())
}
