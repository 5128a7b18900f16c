use std::collections::HashSet;
use std::sync::Arc;

use shared::Error;
use shared::db::{Scope, conversations};
use shared::domain::AgentId;

use tokio::sync::Barrier;

use crate::helpers::{TestDb, seed, seed_agent, seed_tenant, seed_user};

#[tokio::test]
async fn get_or_create_under_20_concurrent_calls_yields_one_row() {
    let (_test, db) = TestDb::migrated().await;
    let tenant = seed_tenant(&db, "acme").await;
    let user = seed_user(&db, "ada").await;
    let agent = seed_agent(&db, tenant, "helper").await;

    // All 20 transactions are open before any of them inserts.
    let barrier = Arc::new(Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (db, barrier) = (db.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
                barrier.wait().await;
                let got = conversations::get_or_create(&mut tx, tenant, agent, user)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                got
            })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap());
    }

    let ids: HashSet<_> = results.iter().map(|r| r.row.id).collect();
    assert_eq!(ids.len(), 1, "every caller got the same conversation");
    assert_eq!(
        results.iter().filter(|r| r.created).count(),
        1,
        "exactly one created it"
    );
    let mut tx = db.begin(Scope::Tenant(tenant)).await.unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from web_conversations")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn get_or_create_returns_the_existing_conversation_the_second_time() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let mut tx = db.begin(Scope::Tenant(s.tenant)).await.unwrap();
    let again = conversations::get_or_create(&mut tx, s.tenant, s.agent, s.user)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.row.id, s.conversation);
    assert_eq!(again.row.user_id, s.user);
    assert_eq!(again.row.agent_id, s.agent);
}

#[tokio::test]
async fn get_or_create_refuses_an_agent_of_another_tenant() {
    let (_test, db) = TestDb::migrated().await;
    let a = seed(&db, "alpha").await;
    let b = seed(&db, "beta").await;
    for agent in [b.agent, AgentId::new()] {
        let mut tx = db.begin(Scope::Tenant(a.tenant)).await.unwrap();
        let err = conversations::get_or_create(&mut tx, a.tenant, agent, a.user)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    }
}
