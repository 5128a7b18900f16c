use chrono::{DateTime, Duration, Utc};
use shared::Error;
use shared::config::routes::{Limits, SocketCaps};
use shared::db::{Db, Scope, connections, message_path};
use shared::domain::{ConnectionId, ConversationId, Role, TenantId, UserId};

use crate::helpers::seed::owner;
use crate::helpers::{TestDb, seed, seed_user};

fn id(s: &str) -> ConnectionId {
    ConnectionId::parse(s).unwrap()
}

fn later() -> DateTime<Utc> {
    Utc::now() + Duration::minutes(10)
}

async fn bound(
    db: &Db,
    name: &str,
    s: &crate::helpers::Seed,
    user: UserId,
    role: Role,
    expires_at: DateTime<Utc>,
) -> ConnectionId {
    let conn_id = id(name);
    let mut tx = db.begin(Scope::Connection(&conn_id)).await.unwrap();
    connections::insert(&mut tx, &conn_id, s.conversation, "https://x/prod")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    rebind(db, &conn_id, s, user, role, expires_at).await;
    conn_id
}

/// Binds the connection again, as a fresh `auth` does: through `auth`'s own two statements
/// (`bind` leaves the socket catching up; `resume`, owing it nothing, makes it live).
async fn rebind(
    db: &Db,
    conn_id: &ConnectionId,
    s: &crate::helpers::Seed,
    user: UserId,
    role: Role,
    expires_at: DateTime<Utc>,
) {
    let mut tx = db
        .begin(Scope::Binding {
            connection: conn_id,
            user,
        })
        .await
        .unwrap();
    message_path::bind(
        &mut tx,
        conn_id,
        user,
        role,
        expires_at,
        SocketCaps::default(),
        Limits::default(),
    )
    .await
    .unwrap();
    message_path::resume(&mut tx, conn_id, s.conversation, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn recipients(db: &Db, tenant: TenantId, s: &crate::helpers::Seed) -> Vec<String> {
    let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
    let listed = message_path::recipients(&mut tx, tenant, s.conversation)
        .await
        .unwrap();
    listed
        .into_iter()
        .map(|r| r.connection_id.to_string())
        .collect()
}

#[tokio::test]
async fn only_sockets_still_authorized_are_recipients() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let admin = seed_user(&db, "admin").await;
    bound(&db, "owner", &s, s.user, Role::CustomerOperator, later()).await;
    bound(
        &db,
        "expired",
        &s,
        s.user,
        Role::CustomerOperator,
        Utc::now() - Duration::seconds(1),
    )
    .await;
    bound(&db, "admin", &s, admin, Role::PlatformAdmin, later()).await;
    assert_eq!(recipients(&db, s.tenant, &s).await, ["owner", "admin"]);

    // A fresh token renews the expired socket.
    rebind(
        &db,
        &id("expired"),
        &s,
        s.user,
        Role::CustomerOperator,
        later(),
    )
    .await;
    assert_eq!(
        recipients(&db, s.tenant, &s).await,
        ["owner", "expired", "admin"]
    );

    // The owner leaves the tenant: their sockets stop receiving, the platform admin's do not.
    let mut tx = owner(&db).begin(Scope::Tenant(s.tenant)).await.unwrap();
    tests::stack::revoke_membership(&mut tx, s.tenant, s.user)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(recipients(&db, s.tenant, &s).await, ["admin"]);
}

#[tokio::test]
async fn a_connection_is_recorded_bound_listed_and_forgotten() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let conn_id = id("L0SM9cOFvHcCIhw=");

    let mut tx = db.begin(Scope::Connection(&conn_id)).await.unwrap();
    let recorded = connections::insert(&mut tx, &conn_id, s.conversation, "https://x/prod")
        .await
        .unwrap();
    assert_eq!(recorded.binding(), None, "not authenticated yet");
    tx.commit().await.unwrap();

    // Unauthenticated connections receive nothing.
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    assert!(
        message_path::recipients(&mut tx, s.tenant, s.conversation)
            .await
            .unwrap()
            .is_empty()
    );
    drop(tx);

    rebind(&db, &conn_id, &s, s.user, Role::CustomerOperator, later()).await;
    let mut tx = db.begin(Scope::Connection(&conn_id)).await.unwrap();
    let bound = connections::find(&mut tx, &conn_id).await.unwrap().unwrap();
    let binding = bound.binding().expect("bound");
    assert_eq!(
        (binding.tenant_id, binding.user_id, binding.role),
        (s.tenant, s.user, Role::CustomerOperator)
    );
    assert_eq!(bound.endpoint, "https://x/prod");
    tx.commit().await.unwrap();

    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let listed = message_path::recipients(&mut tx, s.tenant, s.conversation)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].connection_id, conn_id);
    assert!(
        connections::delete(&mut tx, &conn_id).await.unwrap(),
        "the stale one goes"
    );
    assert!(
        !connections::delete(&mut tx, &conn_id).await.unwrap(),
        "already gone"
    );
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn binding_needs_a_conversation_the_caller_may_see() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    for (conversation, name, refused) in [
        (a.conversation, "other-tenant", "forbidden"),
        (ConversationId::new(), "missing", "not_found"),
    ] {
        let conn_id = id(name);
        let mut tx = db.begin(Scope::Connection(&conn_id)).await.unwrap();
        connections::insert(&mut tx, &conn_id, conversation, "https://x/prod")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let mut tx = db
            .begin(Scope::Binding {
                connection: &conn_id,
                user: b.user,
            })
            .await
            .unwrap();
        let err = message_path::bind(
            &mut tx,
            &conn_id,
            b.user,
            Role::CustomerOperator,
            later(),
            SocketCaps::default(),
            Limits::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code().as_str(), refused, "{name}: {err:?}");
    }
}

#[tokio::test]
async fn a_connection_id_is_recorded_once() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let conn_id = id("dup");
    let mut tx = db.begin(Scope::Connection(&conn_id)).await.unwrap();
    connections::insert(&mut tx, &conn_id, s.conversation, "e")
        .await
        .unwrap();
    let err = connections::insert(&mut tx, &conn_id, s.conversation, "e")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
}
