//! Seeding: a tenant, a member, an agent and the member's conversation with it. One seeder for
//! the development stack (`konstruct-local seed-demo`), the load stack (`tests::stack`) and the
//! integration tests. Each step finds what an earlier run made (the tenant by id, the user by
//! email, the agent by name) before it creates anything, so seeding twice seeds once.

use serde_json::Value;

use super::agents::{self, NewAgent, Provider};
use super::{Db, Scope, conversations, memberships, tenants, users};
use crate::Error;
use crate::domain::{AgentId, ConversationId, TenantId, TenantRole, UserId};

/// What [`workspace`] seeds.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub tenant: TenantId,
    pub tenant_name: &'a str,
    pub email: &'a str,
    pub user_name: &'a str,
    pub role: TenantRole,
    pub agent: AgentPlan<'a>,
}

/// An agent of the plan's tenant.
#[derive(Debug, Clone)]
pub struct AgentPlan<'a> {
    pub name: &'a str,
    pub system_prompt: &'a str,
    pub provider: Provider,
    pub model: &'a str,
    pub settings: Value,
}

impl AgentPlan<'_> {
    /// The echo agent: answers with what it was told, needs no model.
    pub fn echo(name: &str) -> AgentPlan<'_> {
        AgentPlan {
            name,
            system_prompt: "You repeat what you are told.",
            provider: Provider::Echo,
            model: "",
            settings: Value::Object(Default::default()),
        }
    }
}

/// The ids of a seeded tenant, member, agent and conversation.
#[derive(Debug, Clone, Copy)]
pub struct Workspace {
    pub tenant: TenantId,
    pub user: UserId,
    pub agent: AgentId,
    pub conversation: ConversationId,
}

/// The tenant, its member (with the plan's role), its agent and the member's conversation.
pub async fn workspace(db: &Db, plan: &Plan<'_>) -> Result<Workspace, Error> {
    let tenant = tenant(db, plan.tenant, plan.tenant_name).await?;
    let user = user(db, plan.email, plan.user_name).await?;
    member(db, tenant, user, plan.role).await?;
    let agent = agent(db, tenant, &plan.agent).await?;
    let conversation = conversation(db, tenant, agent, user).await?;
    Ok(Workspace {
        tenant,
        user,
        agent,
        conversation,
    })
}

pub async fn tenant(db: &Db, id: TenantId, name: &str) -> Result<TenantId, Error> {
    let mut tx = db.begin(Scope::Tenant(id)).await?;
    if tenants::find(&mut tx, id).await?.is_none() {
        tenants::insert(&mut tx, id, name).await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// Users belong to no tenant: found by their email. In a transaction, like every statement, so
/// a pooler that multiplexes transactions keeps its two halves on one server.
pub async fn user(db: &Db, email: &str, name: &str) -> Result<UserId, Error> {
    let mut tx = db.pool().begin().await?;
    let user = match users::find_by_email(&mut tx, email).await? {
        Some(user) => user,
        None => users::insert(&mut tx, email, name).await?,
    };
    tx.commit().await?;
    Ok(user.id)
}

/// Grants the role (replacing the member's earlier one).
pub async fn member(
    db: &Db,
    tenant: TenantId,
    user: UserId,
    role: TenantRole,
) -> Result<(), Error> {
    let mut tx = db.begin(Scope::Tenant(tenant)).await?;
    memberships::grant(&mut tx, tenant, user, role).await?;
    tx.commit().await?;
    Ok(())
}

/// The tenant's agent of that name.
pub async fn agent(db: &Db, tenant: TenantId, plan: &AgentPlan<'_>) -> Result<AgentId, Error> {
    let mut tx = db.begin(Scope::Tenant(tenant)).await?;
    let found = agents::list(&mut tx)
        .await?
        .into_iter()
        .find(|a| a.name == plan.name);
    let agent = match found {
        Some(agent) => agent,
        None => {
            agents::insert(
                &mut tx,
                NewAgent {
                    tenant_id: tenant,
                    name: plan.name,
                    system_prompt: plan.system_prompt,
                    provider: plan.provider,
                    model: plan.model,
                    settings: plan.settings.clone(),
                },
            )
            .await?
        }
    };
    tx.commit().await?;
    Ok(agent.id)
}

/// The user's conversation with the agent.
pub async fn conversation(
    db: &Db,
    tenant: TenantId,
    agent: AgentId,
    user: UserId,
) -> Result<ConversationId, Error> {
    let mut tx = db.begin(Scope::Tenant(tenant)).await?;
    let conversation = conversations::get_or_create(&mut tx, tenant, agent, user)
        .await?
        .row
        .id;
    tx.commit().await?;
    Ok(conversation)
}
