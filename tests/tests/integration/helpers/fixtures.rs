//! The ids and secret of the event fixtures (`tests/fixtures/events/`).
//!
//! The fixtures are signed with the local development secret below and name fixed ids, so
//! they also work with `cargo lambda invoke chat-api --data-file …` against a database seeded
//! with those ids.

use shared::auth::TokenVerifier;
use shared::config::AuthConfig;
use shared::db::{Db, Scope};

pub const FIXTURE_SECRET: &str = "konstruct-local-development-secret-0123456789";
pub const TENANT: &str = "7d1d8c52-6a0c-4c38-9a43-2f1f6c1f0a01";
pub const USER: &str = "3b6f1f0e-2d5a-4f5e-8d2b-9c1e4a7b5c02";
pub const AGENT: &str = "5a2e9f3c-8b1d-4e6a-9f7c-1d3b5e7a9c03";

pub async fn seed_fixture_ids(db: &Db) {
    let db = &crate::helpers::seed::owner(db);
    sqlx::query(
        "insert into portal_users (id, email, name) values ($1::uuid, 'ada@example.test', 'Ada')",
    )
    .bind(USER)
    .execute(db.pool())
    .await
    .unwrap();
    let mut tx = db
        .begin(Scope::Tenant(TENANT.parse().unwrap()))
        .await
        .unwrap();
    for statement in [
        "insert into tenants (id, name) values ($1::uuid, 'Fixture tenant')",
        "insert into user_tenant_roles (tenant_id, user_id, role) values ($1::uuid, $2::uuid, 'customer_operator')",
        "insert into agents (id, tenant_id, name) values ($3::uuid, $1::uuid, 'Fixture agent')",
    ] {
        sqlx::query(statement)
            .bind(TENANT)
            .bind(USER)
            .bind(AGENT)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Verifies tokens signed with the fixtures' development secret.
pub fn fixture_verifier() -> TokenVerifier {
    let config = AuthConfig::from_lookup(|name| {
        (name == "PORTAL_JWT_SECRET").then(|| FIXTURE_SECRET.to_owned())
    })
    .unwrap();
    TokenVerifier::new(&config)
}
