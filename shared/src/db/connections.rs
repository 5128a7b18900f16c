//! `ws_connections`: the open WebSockets. A row is created at `$connect` knowing only its
//! conversation, bound to a user, tenant and role by `auth`, and deleted at `$disconnect` or
//! when delivery finds it gone.
//!
//! Open a [`Scope::Connection`](super::Scope::Connection) to reach one row by its id, or a
//! tenant scope to list a conversation's connections.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::Error;
use crate::domain::{ConnectionId, ConversationId, Role, TenantId, UserId};
use crate::error::ResultExt;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Connection {
    pub connection_id: ConnectionId,
    pub conversation_id: ConversationId,
    pub endpoint: String,
    pub connected_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    #[sqlx(flatten)]
    binding: BindingRow,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct BindingRow {
    tenant_id: Option<TenantId>,
    user_id: Option<UserId>,
    role: Option<Role>,
    authenticated_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
}

/// Who a connection belongs to, once `auth` has succeeded on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub role: Role,
    pub authenticated_at: DateTime<Utc>,
    /// The expiry of the token it authenticated with; the binding counts until then.
    pub expires_at: DateTime<Utc>,
}

impl Connection {
    /// `None` until the connection has authenticated.
    pub fn binding(&self) -> Option<Binding> {
        let b = &self.binding;
        Some(Binding {
            tenant_id: b.tenant_id?,
            user_id: b.user_id?,
            role: b.role?,
            authenticated_at: b.authenticated_at?,
            expires_at: b.expires_at?,
        })
    }
}

/// Records a new connection (`$connect`).
pub async fn insert(
    conn: &mut PgConnection,
    id: &ConnectionId,
    conversation_id: ConversationId,
    endpoint: &str,
) -> Result<Connection, Error> {
    crate::checked!(
        query_as,
        "insert into ws_connections (connection_id, conversation_id, endpoint)
         values ($1, $2, $3) returning *",
        id,
        conversation_id,
        endpoint
    )
    .fetch_one(conn)
    .await
    .on_constraint("ws_connections_pkey", || {
        Error::Conflict("connection id is already recorded".into())
    })
}

pub async fn find(conn: &mut PgConnection, id: &ConnectionId) -> Result<Option<Connection>, Error> {
    Ok(crate::checked!(
        query_as,
        "select * from ws_connections where connection_id = $1",
        id
    )
    .fetch_optional(conn)
    .await?)
}

/// Forgets the connection; `false` when it was not recorded (or not visible in this scope).
pub async fn delete(conn: &mut PgConnection, id: &ConnectionId) -> Result<bool, Error> {
    let deleted = crate::checked!(
        query,
        "delete from ws_connections where connection_id = $1",
        id
    )
    .execute(conn)
    .await?;
    Ok(deleted.rows_affected() > 0)
}

/// A socket that never authenticated, forgotten by [`forget_unauthenticated`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unauthenticated {
    pub connection_id: ConnectionId,
    pub endpoint: String,
}

/// Deletes the rows of sockets that have not authenticated `older_than` after connecting (at
/// most `limit`, oldest first) and returns them, in a
/// [`Scope::Unauthenticated`](super::Scope) transaction. A socket that authenticates meanwhile
/// finds its row gone and is refused.
pub async fn forget_unauthenticated(
    conn: &mut PgConnection,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<Vec<Unauthenticated>, Error> {
    Ok(crate::checked!(
        query_as,
        "delete from ws_connections
         where connection_id in (
             select connection_id from ws_connections
             where authenticated_at is null
               and connected_at < now() - make_interval(secs => $1)
             order by connected_at
             limit $2)
           and authenticated_at is null
         returning connection_id, endpoint",
        older_than.as_secs_f64(),
        limit
    )
    .fetch_all(conn)
    .await?)
}
