//! `web_conversations`: one per (tenant, agent, user).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use super::Upserted;
use crate::Error;
use crate::domain::{AgentId, ConversationId, ListLimit, TenantId, UserId};
use crate::error::ResultExt;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Conversation {
    pub id: ConversationId,
    pub tenant_id: TenantId,
    pub agent_id: AgentId,
    pub user_id: UserId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The user's conversation with the agent, created if it does not exist yet. Safe under
/// concurrent calls: the unique key decides, and a loser of the race reads the winner's row
/// (under READ COMMITTED, the conflicting insert has committed by the time it is seen).
pub async fn get_or_create(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    agent_id: AgentId,
    user_id: UserId,
) -> Result<Upserted<Conversation>, Error> {
    let created: Option<Conversation> = crate::checked!(
        query_as,
        "insert into web_conversations (tenant_id, agent_id, user_id) values ($1, $2, $3)
         on conflict (tenant_id, agent_id, user_id) do nothing
         returning *",
        tenant_id,
        agent_id,
        user_id
    )
    .fetch_optional(&mut *conn)
    .await
    .on_constraint("web_conversations_agent_fkey", || {
        Error::NotFound("no such agent in this tenant".into())
    })
    .on_constraint("web_conversations_user_id_fkey", || {
        Error::NotFound("no such user".into())
    })?;
    if let Some(row) = created {
        return Ok(Upserted { row, created: true });
    }
    let row = crate::checked!(
        query_as,
        "select * from web_conversations where tenant_id = $1 and agent_id = $2 and user_id = $3",
        tenant_id,
        agent_id,
        user_id
    )
    .fetch_one(conn)
    .await?;
    Ok(Upserted {
        row,
        created: false,
    })
}

pub async fn find(
    conn: &mut PgConnection,
    id: ConversationId,
) -> Result<Option<Conversation>, Error> {
    Ok(crate::checked!(
        query_as,
        "select * from web_conversations where id = $1",
        id
    )
    .fetch_optional(conn)
    .await?)
}

/// A line of the conversation list: the conversation, its agent's name and the start of its
/// newest message.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ConversationSummary {
    pub id: ConversationId,
    pub tenant_id: TenantId,
    pub agent_id: AgentId,
    pub agent_name: String,
    pub user_id: UserId,
    pub updated_at: DateTime<Utc>,
    /// The first characters of the newest message; `null` for an empty conversation.
    pub last_message_preview: Option<String>,
}

/// How many characters of the newest message a list line shows.
pub const PREVIEW_CHARS: i32 = 120;

/// Which conversations a list shows; row-level security bounds it further to the transaction's
/// scope.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListFilter {
    pub tenant_id: Option<TenantId>,
    pub user_id: Option<UserId>,
    pub limit: ListLimit,
}

/// Conversations, most recently updated first.
pub async fn list(
    conn: &mut PgConnection,
    filter: ListFilter,
) -> Result<Vec<ConversationSummary>, Error> {
    Ok(crate::checked!(
        query_as,
        "select c.id, c.tenant_id, c.agent_id, a.name as agent_name, c.user_id, c.updated_at,
                (select left(m.content, $4) from web_conversation_messages m
                 where m.conversation_id = c.id
                 order by m.created_at desc, m.id desc limit 1) as last_message_preview
         from web_conversations c
         join agents a on a.id = c.agent_id
         where ($1::uuid is null or c.tenant_id = $1)
           and ($2::uuid is null or c.user_id = $2)
         order by c.updated_at desc, c.id desc
         limit $3",
        filter.tenant_id,
        filter.user_id,
        i64::from(filter.limit.get()),
        PREVIEW_CHARS
    )
    .fetch_all(conn)
    .await?)
}
