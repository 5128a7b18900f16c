//! The message path's steps, each one round trip: a socket bound to its caller (`socket`), a
//! user message accepted from it (`accept`), what a job needs read (`job`), the reply stored as
//! it streams (`reply`). The steps every message takes are calls of PL/pgSQL functions sent
//! with their scope as one simple query ([`Db::call`](crate::db::Db::call)). Every step also
//! answers who may see the conversation now, so no step needs a second query for it (STYLE 13:
//! one round trip per step).
//!
//! Authorization lives in the SQL function `authorized_connections`
//! (migration `…_authorization`): a socket counts while its token has not expired and its user
//! is still the conversation's owner and a member of its tenant, or a platform admin.

mod accept;
mod branch;
mod job;
mod reply;
mod socket;

pub use accept::*;
pub use branch::*;
pub use job::*;
pub use reply::*;
pub use socket::*;

use serde::Deserialize;
use sqlx::PgConnection;

use crate::Error;
use crate::domain::{ConnectionId, ConversationId, TenantId};

/// A socket that a conversation's frames may go to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, sqlx::FromRow)]
pub struct Recipient {
    pub connection_id: ConnectionId,
    /// The connection-management endpoint that reaches it.
    pub endpoint: String,
}

/// The sockets a conversation's frames may go to now, in the tenant's scope.
pub async fn recipients(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    conversation_id: ConversationId,
) -> Result<Vec<Recipient>, Error> {
    Ok(crate::checked!(
        query_as,
        "select connection_id, endpoint from live_connections($1, $2)",
        tenant_id,
        conversation_id
    )
    .fetch_all(conn)
    .await?)
}
