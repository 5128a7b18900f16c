//! What every integration test needs: a fresh migrated database, a Redis key prefix, seeded
//! rows and tokens. The servers come from `make test` (infra/local/services.sh), which exports
//! `DATABASE_URL` and `MIGRATOR_DATABASE_URL` (the runtime and migrator roles' maintenance
//! database) and `REDIS_URL`.

use std::str::FromStr;
use std::sync::Once;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use shared::auth::{PortalCaller, TokenVerifier};
use shared::config::AuthConfig;
use shared::db::agents::{self, NewAgent, Provider};
use shared::db::{Db, Scope, conversations, memberships, tenants, users};
use shared::domain::{AgentId, ConversationId, Role, TenantId, TenantRole, UserId};
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

pub fn auth_config() -> AuthConfig {
    AuthConfig::from_lookup(|name| (name == "PORTAL_JWT_SECRET").then(|| SECRET.to_owned()))
        .unwrap()
}

pub fn verifier() -> TokenVerifier {
    TokenVerifier::new(&auth_config())
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Signs arbitrary claims with the test secret and HS256.
pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn token(user: UserId, role: Role) -> String {
    sign(&json!({ "sub": user, "role": role, "exp": now() + 600 }))
}

/// A verified caller, made the only way callers are made: from a token.
pub fn caller(user: UserId, role: Role) -> PortalCaller {
    verifier().verify(&token(user, role)).unwrap()
}

/// One tenant with a member (customer_operator unless changed), an echo agent and the
/// member's conversation with it.
pub struct Seed {
    pub tenant: TenantId,
    pub user: UserId,
    pub agent: AgentId,
    pub conversation: ConversationId,
}

pub async fn seed_tenant(db: &Db, name: &str) -> TenantId {
    let id = TenantId::new();
    let mut tx = db.begin(Scope::Tenant(id)).await.unwrap();
    tenants::insert(&mut tx, id, name).await.unwrap();
    tx.commit().await.unwrap();
    id
}

pub async fn seed_user(db: &Db, name: &str) -> UserId {
    let email = format!("{name}-{}@example.test", Uuid::new_v4().simple());
    users::insert(&mut db.pool().acquire().await.unwrap(), &email, name)
        .await
        .unwrap()
        .id
}

pub async fn seed_member(db: &Db, tenant: TenantId, user: UserId, role: TenantRole) {
    let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
    memberships::grant(&mut tx, tenant, user, role)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

pub async fn seed_agent(db: &Db, tenant: TenantId, name: &str) -> AgentId {
    seed_agent_with(db, tenant, name, Provider::Echo, "").await
}

pub async fn seed_agent_with(
    db: &Db,
    tenant: TenantId,
    name: &str,
    provider: Provider,
    model: &str,
) -> AgentId {
    let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
    let agent = agents::insert(
        &mut tx,
        NewAgent {
            tenant_id: tenant,
            name,
            system_prompt: "You are helpful.",
            provider,
            model,
            settings: json!({ "temperature": 0.2 }),
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    agent.id
}

/// The user's conversation with the agent, created if need be.
pub async fn conversation_for(
    db: &Db,
    tenant: TenantId,
    agent: AgentId,
    user: UserId,
) -> ConversationId {
    let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
    let conversation = conversations::get_or_create(&mut tx, tenant, agent, user)
        .await
        .unwrap()
        .row
        .id;
    tx.commit().await.unwrap();
    conversation
}

/// A conversation of the seeded user with a new OpenAI-compatible agent (model `gpt-test`).
pub async fn model_conversation(db: &Db, s: &Seed) -> ConversationId {
    let agent = seed_agent_with(db, s.tenant, "model", Provider::Openai, "gpt-test").await;
    conversation_for(db, s.tenant, agent, s.user).await
}

pub async fn seed(db: &Db, name: &str) -> Seed {
    let tenant = seed_tenant(db, name).await;
    let user = seed_user(db, name).await;
    seed_member(db, tenant, user, TenantRole::CustomerOperator).await;
    let agent = seed_agent(db, tenant, &format!("{name} agent")).await;
    let conversation = conversation_for(db, tenant, agent, user).await;
    Seed {
        tenant,
        user,
        agent,
        conversation,
    }
}

/// Log lines at the default level (INFO), as text, written while its guard is held, on this
/// thread (a `#[tokio::test]` runs every task on its own thread).
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}
