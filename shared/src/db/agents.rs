//! `agents`: a tenant's AI agents and how each one is run.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;

use crate::Error;
use crate::domain::{AgentId, TenantId};

/// Which provider runs an agent (`agents.provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Provider {
    /// Deterministic, no network: local runs, demos and benchmarks.
    Echo,
    /// Any OpenAI-compatible chat-completions endpoint.
    Openai,
    /// Amazon Bedrock's Converse API.
    Bedrock,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Agent {
    pub id: AgentId,
    pub tenant_id: TenantId,
    pub name: String,
    pub system_prompt: String,
    pub provider: Provider,
    pub model: String,
    pub settings: Value,
    pub is_active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewAgent<'a> {
    pub tenant_id: TenantId,
    pub name: &'a str,
    pub system_prompt: &'a str,
    pub provider: Provider,
    pub model: &'a str,
    pub settings: Value,
}

pub async fn insert(conn: &mut PgConnection, agent: NewAgent<'_>) -> Result<Agent, Error> {
    Ok(crate::checked!(
        query_as,
        "insert into agents (tenant_id, name, system_prompt, provider, model, settings)
         values ($1, $2, $3, $4, $5, $6) returning *",
        agent.tenant_id,
        agent.name,
        agent.system_prompt,
        agent.provider,
        agent.model,
        agent.settings
    )
    .fetch_one(conn)
    .await?)
}

pub async fn find(conn: &mut PgConnection, id: AgentId) -> Result<Option<Agent>, Error> {
    Ok(
        crate::checked!(query_as, "select * from agents where id = $1", id)
            .fetch_optional(conn)
            .await?,
    )
}

/// The agents the transaction's scope can see, by name.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<Agent>, Error> {
    Ok(
        crate::checked!(query_as, "select * from agents order by name, id")
            .fetch_all(conn)
            .await?,
    )
}
