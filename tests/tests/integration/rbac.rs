use shared::db::{Scope, conversations};
use shared::domain::{Role, TenantId, TenantRole};
use shared::rbac::{
    TenantAccess, require_conversation_access, require_tenant_admin, require_tenant_member,
};
use shared::{Error, ErrorCode};

use crate::helpers::seed::owner;
use crate::helpers::{TestDb, caller, seed, seed_member, seed_user};

fn forbidden<T: std::fmt::Debug>(result: Result<T, Error>) {
    let err = result.expect_err("access must be refused");
    assert_eq!(err.code(), ErrorCode::Forbidden, "{err:?}");
}

#[tokio::test]
async fn members_pass_and_non_members_are_forbidden() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    let member = caller(a.user, Role::CustomerOperator);

    let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
    assert_eq!(
        require_tenant_member(&mut tx, &member, a.tenant)
            .await
            .unwrap(),
        TenantAccess::Member(TenantRole::CustomerOperator)
    );
    drop(tx);
    let mut tx = db.begin(Scope::Tenant(b.tenant)).await.unwrap();
    forbidden(require_tenant_member(&mut tx, &member, b.tenant).await);
    drop(tx);

    // The token's role claims nothing about tenants: a customer_admin token is no membership.
    let outsider = caller(seed_user(&db, "outsider").await, Role::CustomerAdmin);
    let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
    forbidden(require_tenant_member(&mut tx, &outsider, a.tenant).await);
}

#[tokio::test]
async fn a_check_in_the_wrong_scope_fails_closed() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    let member = caller(a.user, Role::CustomerOperator);
    let mut tx = db.begin(Scope::Tenant(b.tenant)).await.unwrap();
    forbidden(require_tenant_member(&mut tx, &member, a.tenant).await);
}

#[tokio::test]
async fn a_platform_admin_may_act_in_any_tenant() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let admin = caller(seed_user(&db, "root").await, Role::PlatformAdmin);
    for tenant in [a.tenant, TenantId::new()] {
        let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
        assert_eq!(
            require_tenant_member(&mut tx, &admin, tenant)
                .await
                .unwrap(),
            TenantAccess::PlatformAdmin
        );
        assert_eq!(
            require_tenant_admin(&mut tx, &admin, tenant).await.unwrap(),
            TenantAccess::PlatformAdmin
        );
    }
}

#[tokio::test]
async fn admin_only_checks_need_customer_admin_in_that_tenant() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    let admin_user = seed_user(&db, "boss").await;
    seed_member(&db, a.tenant, admin_user, TenantRole::CustomerAdmin).await;
    seed_member(&db, b.tenant, admin_user, TenantRole::CustomerOperator).await;
    let admin = caller(admin_user, Role::CustomerAdmin);

    let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
    assert_eq!(
        require_tenant_admin(&mut tx, &admin, a.tenant)
            .await
            .unwrap(),
        TenantAccess::Member(TenantRole::CustomerAdmin)
    );
    forbidden(
        require_tenant_admin(&mut tx, &caller(a.user, Role::CustomerOperator), a.tenant).await,
    );
    drop(tx);
    let mut tx = db.begin(Scope::Tenant(b.tenant)).await.unwrap();
    forbidden(require_tenant_admin(&mut tx, &admin, b.tenant).await);
}

#[tokio::test]
async fn a_conversation_is_open_to_its_owner_and_platform_admins_only() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let colleague = seed_user(&db, "colleague").await;
    seed_member(&db, a.tenant, colleague, TenantRole::CustomerAdmin).await;
    let root = seed_user(&db, "root").await;

    let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
    let conversation = conversations::find(&mut tx, a.conversation)
        .await
        .unwrap()
        .unwrap();
    require_conversation_access(
        &mut tx,
        &caller(a.user, Role::CustomerOperator),
        &conversation,
    )
    .await
    .expect("the owner");
    assert_eq!(
        require_conversation_access(&mut tx, &caller(root, Role::PlatformAdmin), &conversation)
            .await
            .unwrap(),
        TenantAccess::PlatformAdmin
    );
    forbidden(
        require_conversation_access(
            &mut tx,
            &caller(colleague, Role::CustomerAdmin),
            &conversation,
        )
        .await,
    );

    // An owner who has left the tenant loses the conversation too.
    let mut portal = owner(&db).begin(Scope::Tenant(a.tenant)).await.unwrap();
    tests::stack::revoke_membership(&mut portal, a.tenant, a.user)
        .await
        .unwrap();
    portal.commit().await.unwrap();
    forbidden(
        require_conversation_access(
            &mut tx,
            &caller(a.user, Role::CustomerOperator),
            &conversation,
        )
        .await,
    );
}
