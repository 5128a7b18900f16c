//! `user_tenant_roles`: who belongs to which tenant, and as what. Tenant-scoped, so a
//! membership is only found inside its tenant's scope.

use sqlx::PgConnection;

use crate::Error;
use crate::domain::{TenantId, TenantRole, UserId};

/// Adds the user to the tenant, or changes the role they have there.
pub async fn grant(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    user_id: UserId,
    role: TenantRole,
) -> Result<(), Error> {
    crate::checked!(
        query,
        "insert into user_tenant_roles (tenant_id, user_id, role) values ($1, $2, $3)
         on conflict (tenant_id, user_id) do update set role = excluded.role",
        tenant_id,
        user_id,
        role
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The user's role in the tenant, if they are a member.
pub async fn role_of(
    conn: &mut PgConnection,
    tenant_id: TenantId,
    user_id: UserId,
) -> Result<Option<TenantRole>, Error> {
    Ok(crate::checked!(
        query_scalar,
        "select role from user_tenant_roles where tenant_id = $1 and user_id = $2",
        tenant_id,
        user_id
    )
    .fetch_optional(conn)
    .await?)
}
