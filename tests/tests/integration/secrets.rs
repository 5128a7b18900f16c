//! Secrets read from Secrets Manager (moto's server mode, through the real SDK client): named by
//! `…_SECRET_ARN`, read when the function starts, read again when they stop authenticating.

use std::str::FromStr;
use std::time::Duration;

use serde_json::json;
use shared::auth::{TokenVerifier, issue_token};
use shared::config::{AuthConfig, DatabaseConfig};
use shared::db::{Db, Scope};
use shared::domain::{Role, TenantId, UserId};
use shared::secrets::{Secret, Secrets};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::TestDb;
use crate::helpers::secrets::{client, config, create, rotate};

fn signed_with(secret: &str) -> String {
    let config = AuthConfig {
        secret: Secret::fixed("PORTAL_JWT_SECRET", secret),
        issuer: None,
        audience: None,
    };
    issue_token(
        &config,
        UserId::new(),
        Role::CustomerOperator,
        Duration::from_secs(600),
    )
    .unwrap()
}

const OLD: &str = "the-old-portal-secret-0123456789abcdef";
const NEW: &str = "the-new-portal-secret-0123456789abcdef";

/// How often the tests' secrets may be read again after failures: a test waits this, not
/// `Secret::MIN_REFRESH`, for a rotation to be read.
const REFRESH: Duration = Duration::from_secs(1);

#[tokio::test]
async fn the_token_secret_is_read_by_arn_and_a_rotation_takes_effect_without_a_restart() {
    let client = client();
    let arn = create(&client, OLD).await;
    let lookup = |name: &str| (name == "PORTAL_JWT_SECRET_ARN").then(|| arn.clone());
    let secrets = Secrets::new(&config()).refreshing_at_most_every(REFRESH);
    let config = AuthConfig::load(lookup, &secrets).await.unwrap();
    assert!(config.secret.is_managed());
    let tokens = TokenVerifier::new(&config);
    tokens.verify_fresh(&signed_with(OLD)).await.unwrap();

    rotate(&client, &arn, NEW).await;
    // Read again at most once per interval: a token right after the start is judged by the
    // value read at start.
    assert!(tokens.verify_fresh(&signed_with(NEW)).await.is_err());
    tokio::time::sleep(REFRESH).await;
    tokens
        .verify_fresh(&signed_with(NEW))
        .await
        .expect("the rotated secret is read again after a signature fails");
    assert!(
        tokens.verify_fresh(&signed_with(OLD)).await.is_err(),
        "the old secret no longer verifies"
    );
}

#[tokio::test]
async fn a_secret_named_twice_or_unreadable_is_refused_naming_its_variable() {
    let client = client();
    let arn = create(&client, OLD).await;
    let secrets = Secrets::new(&config());

    let both = |name: &str| match name {
        "PORTAL_JWT_SECRET_ARN" => Some(arn.clone()),
        "PORTAL_JWT_SECRET" => Some(OLD.to_owned()),
        _ => None,
    };
    let err = AuthConfig::load(both, &secrets).await.unwrap_err();
    assert_eq!(err.var, "PORTAL_JWT_SECRET_ARN", "{err}");

    let missing = format!("{}-gone", arn);
    let err = AuthConfig::load(
        |name: &str| (name == "PORTAL_JWT_SECRET_ARN").then(|| missing.clone()),
        &secrets,
    )
    .await
    .unwrap_err();
    assert_eq!(err.var, "PORTAL_JWT_SECRET_ARN", "{err}");
    assert!(err.to_string().contains("could not be read"), "{err}");

    let short = create(&client, "short").await;
    let err = AuthConfig::load(
        |name: &str| (name == "PORTAL_JWT_SECRET_ARN").then(|| short.clone()),
        &secrets,
    )
    .await
    .unwrap_err();
    assert_eq!(err.var, "PORTAL_JWT_SECRET", "{err}");
    assert!(
        !err.to_string().contains("short"),
        "the value is never repeated: {err}"
    );

    // Where no secret may be read (the local mode), an ARN is refused rather than ignored.
    let err = AuthConfig::load(
        |name: &str| (name == "PORTAL_JWT_SECRET_ARN").then(|| arn.clone()),
        &Secrets::none(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.var, "PORTAL_JWT_SECRET_ARN", "{err}");
}

#[tokio::test]
async fn the_database_secret_may_be_rds_json_and_a_rotated_login_is_read_again() {
    let (test, _db) = TestDb::migrated().await;
    let url = PgConnectOptions::from_str(&test.url).unwrap();
    let rds = |username: &str| {
        json!({
            "engine": "postgres",
            "username": username,
            "password": "unused-here-trust-auth",
            "host": url.get_host(),
            "port": url.get_port(),
            "dbname": url.get_database().unwrap(),
        })
        .to_string()
    };
    let client = client();
    // The stored login is wrong (a role that does not exist), as after a rotation the function
    // has not seen yet.
    let arn = create(&client, &rds("konstruct_nobody")).await;
    let config = DatabaseConfig::load_role(
        |name: &str| (name == "DATABASE_URL_SECRET_ARN").then(|| arn.clone()),
        &Secrets::new(&config()).refreshing_at_most_every(REFRESH),
        "DATABASE_URL",
        "DATABASE_URL_SECRET_ARN",
    )
    .await
    .unwrap();
    let db = Db::connect_lazy(&config);
    assert!(db.begin(Scope::Tenant(TenantId::new())).await.is_err());

    rotate(&client, &arn, &rds("konstruct_app")).await;
    tokio::time::sleep(REFRESH).await;
    let tx = db
        .begin(Scope::Tenant(TenantId::new()))
        .await
        .expect("a failed login reads the secret again and connects with the new one");
    tx.commit().await.unwrap();
}
