//! `tenants`: visible only inside their own scope (or to a platform admin's read scope).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::Error;
use crate::domain::TenantId;

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// Creates a tenant; run it in `Scope::Tenant(id)` with the new id, since row-level security
/// admits a tenant row only into its own scope.
pub async fn insert(conn: &mut PgConnection, id: TenantId, name: &str) -> Result<Tenant, Error> {
    Ok(crate::checked!(
        query_as,
        "insert into tenants (id, name) values ($1, $2) returning *",
        id,
        name
    )
    .fetch_one(conn)
    .await?)
}

pub async fn find(conn: &mut PgConnection, id: TenantId) -> Result<Option<Tenant>, Error> {
    Ok(
        crate::checked!(query_as, "select * from tenants where id = $1", id)
            .fetch_optional(conn)
            .await?,
    )
}
