use shared::db::MIGRATOR;

use crate::helpers::TestDb;

async fn public_objects(test: &TestDb) -> (i64, i64) {
    let tables: i64 = sqlx::query_scalar(
        "select count(*) from pg_tables
         where schemaname = 'public' and tablename <> '_sqlx_migrations'",
    )
    .fetch_one(&test.pool)
    .await
    .unwrap();
    let functions: i64 = sqlx::query_scalar(
        "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public'",
    )
    .fetch_one(&test.pool)
    .await
    .unwrap();
    (tables, functions)
}

#[tokio::test]
async fn migrations_go_up_from_empty_down_to_empty_and_up_again() {
    let test = TestDb::empty().await;
    assert_eq!(public_objects(&test).await, (0, 0));

    MIGRATOR.run(&test.migrator).await.expect("up from empty");
    let (tables, functions) = public_objects(&test).await;
    assert_eq!(tables, 9, "every table of the schema");
    assert_eq!(
        functions, 20,
        "the row-level security helpers, the authorization rule and the message path's steps"
    );

    MIGRATOR
        .undo(&test.migrator, 0)
        .await
        .expect("down to empty");
    assert_eq!(public_objects(&test).await, (0, 0));

    MIGRATOR.run(&test.migrator).await.expect("up again");
    assert_eq!(public_objects(&test).await, (tables, functions));
}

#[tokio::test]
async fn every_tenant_scoped_table_forces_row_level_security() {
    let (test, _db) = TestDb::migrated().await;
    let unprotected: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'public' and c.relkind = 'r'
           and c.relname not in ('portal_users', '_sqlx_migrations')
           and not (c.relrowsecurity and c.relforcerowsecurity)
         order by 1",
    )
    .fetch_all(&test.pool)
    .await
    .unwrap();
    assert!(
        unprotected.is_empty(),
        "tables without forced RLS: {unprotected:?}"
    );
}
