//! The two database roles (PROTOCOL §4, invariant 4): the migrator owns the schema; the runtime
//! role the functions use owns nothing, so no statement it runs can switch row-level security
//! off, and a function connected as an owner refuses to work.

use serde_json::json;
use shared::db::{Db, Scope};
use shared::domain::Role;
use sqlx::{AssertSqlSafe, Connection};

use crate::helpers::local::{Env, Local};
use crate::helpers::{Seed, TestDb, seed, token};

/// The SQLSTATE a statement failed with.
async fn refused(test: &TestDb, statement: &str) -> String {
    let mut conn = test.pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let err = sqlx::query(AssertSqlSafe(statement.to_owned()))
        .execute(&mut *tx)
        .await
        .expect_err(statement);
    match err {
        sqlx::Error::Database(db) => db.code().unwrap_or_default().into_owned(),
        other => panic!("{statement}: {other}"),
    }
}

#[tokio::test]
async fn the_runtime_role_cannot_switch_row_level_security_off_or_change_the_schema() {
    let (test, _db) = TestDb::migrated().await;
    for statement in [
        "alter table web_conversations no force row level security",
        "alter table web_conversation_messages disable row level security",
        "drop policy tenant_isolation on tenants",
        "create policy open on web_conversations using (true)",
        "create table intruder (id int)",
        "drop table ws_connections",
        "alter table agents add column intruder text",
        "set role konstruct_migrator",
        "create function app_is_platform_admin() returns boolean language sql as 'select true'",
    ] {
        let code = refused(&test, statement).await;
        assert!(
            code == "42501" || code == "42723",
            "{statement}: expected insufficient privilege, got {code}"
        );
    }
    // The migrations' ledger is the migrator's alone.
    assert_eq!(
        refused(&test, "delete from _sqlx_migrations").await,
        "42501"
    );
}

/// The runtime role holds, per table and operation, exactly the list kept beside the code
/// (`shared::db::grants`): `portal_users` read-only, nothing the functions do not do.
#[tokio::test]
async fn the_runtime_role_holds_the_grants_the_code_lists_and_no_more() {
    let (test, _db) = TestDb::migrated().await;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select table_name::text, privilege_type::text
         from information_schema.role_table_grants
         where grantee = 'konstruct_runtime' and table_schema = 'public'
         order by 1, 2",
    )
    .fetch_all(&test.migrator)
    .await
    .unwrap();
    let mut granted: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (table, privilege) in rows {
        granted.entry(table).or_default().push(privilege);
    }
    let listed: std::collections::BTreeMap<String, Vec<String>> =
        shared::db::grants::RUNTIME_GRANTS
            .iter()
            .map(|(table, ops)| {
                (
                    table.to_string(),
                    ops.iter().map(|o| o.to_string()).collect(),
                )
            })
            .collect();
    assert_eq!(granted, listed);
    for statement in [
        "update portal_users set name = 'mallory'",
        "insert into tenants (id, name) values (gen_random_uuid(), 'x')",
        "delete from user_tenant_roles",
        "update agents set is_active = false",
        "delete from web_conversations",
    ] {
        assert_eq!(refused(&test, statement).await, "42501", "{statement}");
    }
}

#[tokio::test]
async fn the_runtime_role_reads_and_writes_through_row_level_security() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    db.verify_runtime_role()
        .await
        .expect("the runtime role passes");
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let conversations: i64 = sqlx::query_scalar("select count(*) from web_conversations")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(conversations, 1);
    // Without a scope it sees nothing, as before.
    let unscoped: i64 = sqlx::query_scalar("select count(*) from web_conversations")
        .fetch_one(&test.pool)
        .await
        .unwrap();
    assert_eq!(unscoped, 0);
}

#[tokio::test]
async fn a_handle_connected_as_the_owner_refuses_to_work_and_says_why() {
    let (test, _db) = TestDb::migrated().await;
    let owner = Db::from_pool(test.migrator.clone());
    let err = owner
        .begin(Scope::Tenant(shared::domain::TenantId::new()))
        .await
        .expect_err("the owner's handle refuses");
    let message = err.to_string();
    assert!(
        message.contains("konstruct_migrator") && message.contains("owns"),
        "{message}"
    );
    // It keeps refusing: nothing was remembered as verified.
    assert!(
        owner
            .begin(Scope::Tenant(shared::domain::TenantId::new()))
            .await
            .is_err()
    );
}

async fn list_conversations(server: &tests::stack::Server, s: &Seed) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!(
            "http://{}/api/portal/chat/conversations?tenant_id={}",
            server.address, s.tenant
        ))
        .bearer_auth(token(s.user, Role::CustomerOperator))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn konstruct_local_started_as_the_owner_serves_nothing() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let mut env = Env::new(&test);
    env.database_url = test.migrator_url.clone();
    let server = Local::start(&env, &["serve", "--no-worker"]).await;
    let response = list_conversations(&server, &s).await;
    assert_eq!(response.status(), 500);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], json!("internal"), "{body}");
    server.stop().await;

    // The same server as the runtime role answers.
    let server = Local::start(&Env::new(&test), &["serve", "--no-worker"]).await;
    assert_eq!(list_conversations(&server, &s).await.status(), 200);
    server.stop().await;
}
