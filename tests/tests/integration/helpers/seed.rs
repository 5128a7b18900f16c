//! Rows for one test, through the one seeder (`shared::db::seed`), under fresh names so that
//! tests never find each other's rows.

use serde_json::json;
use shared::db::Db;
use shared::db::agents::Provider;
use shared::db::seed::{self, AgentPlan};
use shared::domain::{AgentId, ConversationId, TenantId, TenantRole, UserId};
use uuid::Uuid;

/// One tenant with a member (customer_operator), an echo agent and the member's conversation
/// with it.
pub type Seed = seed::Workspace;

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

/// The schema owner's handle on `db`'s database: the portal's tables (tenants, users,
/// memberships, agents) are written by the portal, and the functions' role may only read them.
pub fn owner(db: &Db) -> Db {
    static OWNERS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, Db>>> =
        std::sync::LazyLock::new(Default::default);
    let options = db.pool().connect_options();
    let database = options
        .get_database()
        .expect("a test database has a name")
        .to_owned();
    let mut owners = OWNERS.lock().unwrap();
    owners
        .entry(database.clone())
        .or_insert_with(|| {
            let url = std::env::var("MIGRATOR_DATABASE_URL").expect("run through `make test`");
            let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a database URL");
            Db::owner(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect_lazy_with(options.database(&database)),
            )
        })
        .clone()
}

pub async fn seed_tenant(db: &Db, name: &str) -> TenantId {
    seed::tenant(&owner(db), TenantId::new(), name)
        .await
        .unwrap()
}

pub async fn seed_user(db: &Db, name: &str) -> UserId {
    let email = format!("{name}-{}@example.test", Uuid::new_v4().simple());
    seed::user(&owner(db), &email, name).await.unwrap()
}

pub async fn seed_member(db: &Db, tenant: TenantId, user: UserId, role: TenantRole) {
    seed::member(&owner(db), tenant, user, role).await.unwrap();
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
    let plan = AgentPlan {
        name,
        system_prompt: "You are helpful.",
        provider,
        model,
        settings: json!({ "temperature": 0.2 }),
    };
    seed::agent(&owner(db), tenant, &plan).await.unwrap()
}

/// The user's conversation with the agent, created if need be.
pub async fn conversation_for(
    db: &Db,
    tenant: TenantId,
    agent: AgentId,
    user: UserId,
) -> ConversationId {
    seed::conversation(db, tenant, agent, user).await.unwrap()
}

/// A conversation of the seeded user with a new OpenAI-compatible agent (model `gpt-test`).
pub async fn model_conversation(db: &Db, s: &Seed) -> ConversationId {
    let agent = seed_agent_with(db, s.tenant, "model", Provider::Openai, "gpt-test").await;
    conversation_for(db, s.tenant, agent, s.user).await
}
