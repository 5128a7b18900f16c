//! Row-level security as the application role: the last line of tenant isolation.

use shared::db::{Db, Scope, connections};
use shared::domain::{ConnectionId, MessageText, Role, TenantId};
use sqlx::{AssertSqlSafe, PgConnection};

use crate::helpers::seed::owner;
use crate::helpers::{Seed, TestDb, caller, seed};

/// Every tenant-scoped table and the column that names its tenant.
const TENANT_TABLES: [(&str, &str); 7] = [
    ("tenants", "id"),
    ("user_tenant_roles", "tenant_id"),
    ("agents", "tenant_id"),
    ("channel_connections", "tenant_id"),
    ("web_conversations", "tenant_id"),
    ("web_conversation_messages", "tenant_id"),
    ("ws_connections", "tenant_id"),
];

/// Two tenants with a row in every tenant-scoped table each.
async fn two_tenants(db: &Db) -> (Seed, Seed) {
    let a = seed(db, "alpha").await;
    let b = seed(db, "beta").await;
    for s in [&a, &b] {
        let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
        let conversation = shared::db::conversations::find(&mut tx, s.conversation)
            .await
            .unwrap()
            .unwrap();
        let text = MessageText::parse("hello").unwrap();
        tests::stack::store_history(&mut tx, &conversation, &text)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        // The portal's table: its owner writes it.
        let mut tx = owner(db).begin(Scope::Tenant(s.tenant)).await.unwrap();
        sqlx::query(
            "insert into channel_connections (tenant_id, channel_type, workspace_id)
             values ($1, 'web', $2)",
        )
        .bind(s.tenant)
        .bind(s.tenant.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let id = ConnectionId::parse(&format!("conn-{}", s.tenant.as_uuid().simple())).unwrap();
        let mut tx = db.begin(Scope::Connection(&id)).await.unwrap();
        connections::insert(&mut tx, &id, s.conversation, "http://127.0.0.1:1/local")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let expires_at = chrono::Utc::now() + chrono::Duration::minutes(10);
        let mut tx = db
            .begin(Scope::Binding {
                connection: &id,
                user: s.user,
            })
            .await
            .unwrap();
        shared::db::message_path::bind(
            &mut tx,
            &id,
            s.user,
            Role::CustomerOperator,
            expires_at,
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    (a, b)
}

async fn count(conn: &mut PgConnection, table: &str, column: &str, tenant: TenantId) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "select count(*) from {table} where {column} = $1"
    )))
    .bind(tenant)
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn count_all(conn: &mut PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("select count(*) from {table}")))
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Statements that try to write a row into `b` while working in another tenant.
/// The user is A's, so no statement can fail on a unique key before RLS has its say.
fn inserts_into(a: &Seed, b: &Seed) -> Vec<String> {
    let (t, u, ag, c) = (b.tenant, a.user, b.agent, b.conversation);
    vec![
        "insert into tenants (name) values ('intruder')".to_owned(),
        format!(
            "insert into user_tenant_roles (tenant_id, user_id, role) values ('{t}', '{u}', 'customer_admin')"
        ),
        format!("insert into agents (tenant_id, name) values ('{t}', 'intruder')"),
        format!(
            "insert into channel_connections (tenant_id, channel_type, workspace_id) values ('{t}', 'slack', 'intruder')"
        ),
        format!(
            "insert into web_conversations (tenant_id, agent_id, user_id) values ('{t}', '{ag}', '{u}')"
        ),
        format!(
            "insert into web_conversation_messages (conversation_id, tenant_id, role, content) values ('{c}', '{t}', 'user', 'intruder')"
        ),
        format!(
            "insert into ws_connections (connection_id, conversation_id, tenant_id, user_id, role, endpoint, authenticated_at) values ('intruder', '{c}', '{t}', '{u}', 'customer_admin', 'x', now())"
        ),
    ]
}

fn is_rls_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("42501"))
}

#[tokio::test]
async fn the_application_role_is_neither_superuser_nor_bypassrls() {
    let (test, db) = TestDb::migrated().await;
    let (superuser, bypass): (bool, bool) =
        sqlx::query_as("select rolsuper, rolbypassrls from pg_roles where rolname = current_user")
            .fetch_one(&test.pool)
            .await
            .unwrap();
    assert!(!superuser, "the application role must not be a superuser");
    assert!(!bypass, "the application role must not have BYPASSRLS");
    db.verify_runtime_role()
        .await
        .expect("the role check accepts it");
}

#[tokio::test]
async fn a_tenant_scope_sees_only_its_own_rows_in_every_table() {
    let (_test, db) = TestDb::migrated().await;
    let (a, b) = two_tenants(&db).await;
    let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
    for (table, column) in TENANT_TABLES {
        assert!(
            count(&mut tx, table, column, a.tenant).await > 0,
            "{table}: own rows visible"
        );
        assert_eq!(
            count(&mut tx, table, column, b.tenant).await,
            0,
            "{table}: select of B"
        );
        assert_eq!(
            count_all(&mut tx, table).await,
            count(&mut tx, table, column, a.tenant).await,
            "{table}: an unfiltered select returns only A's rows"
        );
    }
}

#[tokio::test]
async fn a_tenant_scope_cannot_update_or_delete_another_tenants_rows() {
    let (_test, db) = TestDb::migrated().await;
    let (a, b) = two_tenants(&db).await;
    // As the owner: the functions' role may not write the portal's tables at all (the grants
    // test); row-level security, forced, holds the owner too.
    let mut tx = owner(&db).begin(Scope::Tenant(a.tenant)).await.unwrap();
    for (table, column) in TENANT_TABLES {
        let updated = sqlx::query(AssertSqlSafe(format!(
            "update {table} set {column} = {column} where {column} = $1"
        )))
        .bind(b.tenant)
        .execute(&mut *tx)
        .await
        .unwrap();
        assert_eq!(updated.rows_affected(), 0, "{table}: update of B");
        let deleted = sqlx::query(AssertSqlSafe(format!(
            "delete from {table} where {column} = $1"
        )))
        .bind(b.tenant)
        .execute(&mut *tx)
        .await
        .unwrap();
        assert_eq!(deleted.rows_affected(), 0, "{table}: delete of B");
        let unfiltered = sqlx::query(AssertSqlSafe(format!(
            "update {table} set {column} = {column}"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        assert_eq!(
            unfiltered.rows_affected() as i64,
            count(&mut tx, table, column, a.tenant).await,
            "{table}: an unfiltered update touches only A's rows"
        );
    }
    tx.commit().await.unwrap();

    let mut tx = db.begin(Scope::Tenant(b.tenant)).await.unwrap();
    for (table, column) in TENANT_TABLES {
        assert!(
            count(&mut tx, table, column, b.tenant).await > 0,
            "{table}: B's rows survive"
        );
    }
}

#[tokio::test]
async fn a_tenant_scope_cannot_insert_into_or_move_rows_to_another_tenant() {
    let (_test, db) = TestDb::migrated().await;
    let (a, b) = two_tenants(&db).await;
    for statement in inserts_into(&a, &b) {
        let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
        let err = sqlx::query(AssertSqlSafe(statement.clone()))
            .execute(&mut *tx)
            .await
            .expect_err(&statement);
        assert!(is_rls_violation(&err), "{statement}: {err}");
    }
    for (table, column) in TENANT_TABLES.into_iter().skip(1) {
        let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
        let err = sqlx::query(AssertSqlSafe(format!("update {table} set {column} = $1")))
            .bind(b.tenant)
            .execute(&mut *tx)
            .await
            .expect_err(table);
        assert!(is_rls_violation(&err), "{table}: moving a row to B: {err}");
    }
}

#[tokio::test]
async fn with_no_tenant_set_nothing_is_visible() {
    let (test, db) = TestDb::migrated().await;
    two_tenants(&db).await;
    let mut conn = test.pool.acquire().await.unwrap();
    for (table, _) in TENANT_TABLES {
        assert_eq!(
            count_all(&mut conn, table).await,
            0,
            "{table} without a tenant"
        );
    }
    // A transaction-local setting reads as '' once its transaction has ended; the policies
    // must treat that as "no tenant" rather than fail on the cast or match anything.
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::query("select set_config('app.current_tenant', gen_random_uuid()::text, true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for (table, _) in TENANT_TABLES {
        assert_eq!(
            count_all(&mut conn, table).await,
            0,
            "{table} after a scoped transaction"
        );
    }
}

#[tokio::test]
async fn a_platform_admin_scope_reads_every_tenant_but_writes_none() {
    let (_test, db) = TestDb::migrated().await;
    let (a, b) = two_tenants(&db).await;
    let admin = caller(a.user, Role::PlatformAdmin)
        .platform_admin()
        .unwrap();
    // As the owner: the functions' role may not write the portal's tables at all (the grants
    // test); row-level security, forced, holds the owner too.
    let mut tx = owner(&db).begin(Scope::AllTenants(admin)).await.unwrap();
    for (table, column) in TENANT_TABLES {
        // Sockets are no business of the portal's lists: the read scope leaves them out.
        let readable = table != "ws_connections";
        let (in_a, in_b) = (
            count(&mut tx, table, column, a.tenant).await,
            count(&mut tx, table, column, b.tenant).await,
        );
        assert_eq!((in_a > 0, in_b > 0), (readable, readable), "{table}");
        let updated = sqlx::query(AssertSqlSafe(format!(
            "update {table} set {column} = {column}"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        assert_eq!(
            updated.rows_affected(),
            0,
            "{table}: the read scope updates nothing"
        );
        let deleted = sqlx::query(AssertSqlSafe(format!("delete from {table}")))
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(
            deleted.rows_affected(),
            0,
            "{table}: the read scope deletes nothing"
        );
    }
    drop(tx);
    for statement in inserts_into(&a, &b) {
        let mut tx = db.begin(Scope::AllTenants(admin)).await.unwrap();
        let err = sqlx::query(AssertSqlSafe(statement.clone()))
            .execute(&mut *tx)
            .await
            .expect_err(&statement);
        assert!(is_rls_violation(&err), "{statement}: {err}");
    }
}

#[tokio::test]
async fn a_conversation_key_reveals_that_conversation_row_and_nothing_else() {
    let (_test, db) = TestDb::migrated().await;
    let (a, b) = two_tenants(&db).await;
    let mut tx = db.begin(Scope::Conversation(a.conversation)).await.unwrap();
    let visible: Vec<uuid::Uuid> = sqlx::query_scalar("select id from web_conversations")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, vec![a.conversation.as_uuid()]);
    for (table, _) in TENANT_TABLES {
        if table != "web_conversations" {
            assert_eq!(
                count_all(&mut tx, table).await,
                0,
                "{table} under a conversation key"
            );
        }
    }
    let updated = sqlx::query("update web_conversations set updated_at = now()")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 0, "the key is read-only");
    drop(tx);

    let mut tx = db.begin(Scope::Conversation(b.conversation)).await.unwrap();
    let found = shared::db::conversations::find(&mut tx, a.conversation)
        .await
        .unwrap();
    assert_eq!(found, None, "B's key does not reveal A's conversation");
}

#[tokio::test]
async fn a_connection_key_reveals_that_connection_row_and_nothing_else() {
    let (_test, db) = TestDb::migrated().await;
    let (a, b) = two_tenants(&db).await;
    let id = ConnectionId::parse(&format!("conn-{}", a.tenant.as_uuid().simple())).unwrap();
    let mut tx = db.begin(Scope::Connection(&id)).await.unwrap();
    let visible: Vec<String> = sqlx::query_scalar("select connection_id from ws_connections")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, vec![id.as_str().to_owned()]);
    for (table, _) in TENANT_TABLES {
        if table != "ws_connections" {
            assert_eq!(
                count_all(&mut tx, table).await,
                0,
                "{table} under a connection key"
            );
        }
    }
    let other = ConnectionId::parse(&format!("conn-{}", b.tenant.as_uuid().simple())).unwrap();
    assert!(!connections::delete(&mut tx, &other).await.unwrap());
}
