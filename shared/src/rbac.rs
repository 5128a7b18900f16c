//! Tenant access, read from the database: a token proves who the caller is, never which
//! tenants they may act in (PROTOCOL §1).
//!
//! Call these inside a transaction scoped to the tenant in question. In any other scope the
//! membership is invisible and the check fails closed.

use sqlx::PgConnection;

use crate::Error;
use crate::auth::PortalCaller;
use crate::db::conversations::{self, Conversation};
use crate::db::{Db, Scope, Tx, memberships};
use crate::domain::{ConversationId, TenantId, TenantRole};

/// Why a caller may act in a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantAccess {
    PlatformAdmin,
    Member(TenantRole),
}

/// The caller belongs to the tenant, or is a platform admin.
pub async fn require_tenant_member(
    conn: &mut PgConnection,
    caller: &PortalCaller,
    tenant_id: TenantId,
) -> Result<TenantAccess, Error> {
    if caller.platform_admin().is_some() {
        return Ok(TenantAccess::PlatformAdmin);
    }
    match memberships::role_of(conn, tenant_id, caller.user_id()).await? {
        Some(role) => Ok(TenantAccess::Member(role)),
        None => Err(Error::Forbidden("not a member of this tenant".into())),
    }
}

/// The caller administers the tenant (`customer_admin` there), or is a platform admin.
pub async fn require_tenant_admin(
    conn: &mut PgConnection,
    caller: &PortalCaller,
    tenant_id: TenantId,
) -> Result<TenantAccess, Error> {
    match require_tenant_member(conn, caller, tenant_id).await? {
        TenantAccess::Member(TenantRole::CustomerOperator) => Err(Error::Forbidden(
            "this needs the customer_admin role in the tenant".into(),
        )),
        access => Ok(access),
    }
}

/// The caller may see this conversation: a platform admin, or its owner while still a member
/// of its tenant. Membership alone does not expose another user's conversation.
pub async fn require_conversation_access(
    conn: &mut PgConnection,
    caller: &PortalCaller,
    conversation: &Conversation,
) -> Result<TenantAccess, Error> {
    let access = require_tenant_member(conn, caller, conversation.tenant_id).await?;
    if access == TenantAccess::PlatformAdmin || conversation.user_id == caller.user_id() {
        Ok(access)
    } else {
        Err(Error::Forbidden("not your conversation".into()))
    }
}

/// Opens a transaction in the conversation's tenant once the caller may see the conversation:
/// `not_found` when there is no such conversation, `forbidden` when it is not theirs.
///
/// The tenant comes from the row itself, read through the conversation's own narrow scope.
pub async fn open_conversation(
    db: &Db,
    caller: &PortalCaller,
    id: ConversationId,
) -> Result<(Tx, Conversation), Error> {
    let not_found = || Error::NotFound("no such conversation".into());
    let mut probe = db.begin(Scope::Conversation(id)).await?;
    let tenant_id = conversations::find(&mut probe, id)
        .await?
        .ok_or_else(not_found)?
        .tenant_id;
    probe.rollback().await?;

    let mut tx = db.begin(Scope::Tenant(tenant_id)).await?;
    let conversation = conversations::find(&mut tx, id)
        .await?
        .ok_or_else(not_found)?;
    require_conversation_access(&mut tx, caller, &conversation).await?;
    Ok((tx, conversation))
}
