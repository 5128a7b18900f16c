//! Portal tokens signed with the stacks' test secret, and callers made from them.

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use shared::auth::{PortalCaller, TokenVerifier};
use shared::config::AuthConfig;
use shared::domain::{Role, UserId};

use super::SECRET;

pub fn auth_config() -> AuthConfig {
    AuthConfig::from_lookup(|name| (name == "PORTAL_JWT_SECRET").then(|| SECRET.to_owned()))
        .unwrap()
}

pub fn verifier() -> TokenVerifier {
    TokenVerifier::new(&auth_config())
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Signs arbitrary claims with the test secret and HS256.
pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn token(user: UserId, role: Role) -> String {
    sign(&json!({ "sub": user, "role": role, "exp": now() + 600 }))
}

/// A verified caller, made the only way callers are made: from a token.
pub fn caller(user: UserId, role: Role) -> PortalCaller {
    verifier().verify(&token(user, role)).unwrap()
}

/// The clock passes a token's expiry, for the sockets bound with it: their stored expiry (the
/// token's `exp`, which is all the server compares with `now()`) is set a second into the past.
/// Returns how many sockets it found; a test asserts it, which also checks the binding took
/// the token's `exp`. No test waits for a token to expire.
pub async fn expire_sockets(
    db: &shared::db::Db,
    tenant: shared::domain::TenantId,
    exp: i64,
) -> u64 {
    let mut tx = db
        .begin(shared::db::Scope::Tenant(tenant))
        .await
        .expect("a tenant transaction");
    let expired = shared::db::query(
        "update ws_connections set expires_at = now() - interval '1 second'
         where expires_at = to_timestamp($1)",
    )
    .bind(exp as f64)
    .execute(&mut *tx)
    .await
    .expect("expire the sockets")
    .rows_affected();
    tx.commit().await.expect("commit");
    expired
}
