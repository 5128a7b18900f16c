//! Portal tokens (PROTOCOL §1): every way a token can be wrong is refused as unauthenticated.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shared::auth::{MAX_TOKEN_BYTES, TokenVerifier};
use shared::config::AuthConfig;
use shared::domain::{Role, UserId};
use shared::{Error, ErrorCode};

use crate::helpers::{SECRET, now, sign, token, verifier};

fn refused(result: Result<shared::auth::PortalCaller, Error>) -> String {
    let err = result.expect_err("the token must be refused");
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err:?}");
    err.to_string()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn good_claims() -> Value {
    json!({ "sub": UserId::new(), "role": "customer_operator", "exp": now() + 300 })
}

#[tokio::test]
async fn a_valid_token_gives_the_caller() {
    let user = UserId::new();
    for role in [
        Role::PlatformAdmin,
        Role::CustomerAdmin,
        Role::CustomerOperator,
    ] {
        let caller = verifier().verify(&token(user, role)).unwrap();
        assert_eq!(caller.user_id(), user);
        assert_eq!(caller.role(), role);
        assert_eq!(
            caller.platform_admin().is_some(),
            role == Role::PlatformAdmin
        );
    }
    let caller = verifier()
        .verify_bearer(Some(&format!(
            "Bearer {}",
            token(user, Role::CustomerAdmin)
        )))
        .await
        .unwrap();
    assert_eq!(caller.user_id(), user);
}

#[test]
fn an_expired_token_is_refused() {
    let mut claims = good_claims();
    claims["exp"] = json!(now() - 1);
    assert!(refused(verifier().verify(&sign(&claims))).contains("expired"));
}

#[test]
fn a_token_not_valid_yet_is_refused() {
    let mut claims = good_claims();
    claims["nbf"] = json!(now() + 600);
    assert!(refused(verifier().verify(&sign(&claims))).contains("not valid yet"));
}

#[test]
fn a_token_signed_with_another_secret_is_refused() {
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &good_claims(),
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    assert!(refused(verifier().verify(&forged)).contains("signature"));
}

#[test]
fn a_tampered_payload_is_refused() {
    let good = sign(&good_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims = good_claims();
    claims["role"] = json!("platform_admin");
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    refused(verifier().verify(&tampered));
}

#[test]
fn alg_none_is_refused() {
    let header = json!({ "alg": "none", "typ": "JWT" });
    let unsigned = format!("{}.{}.", b64(&header), b64(&good_claims()));
    refused(verifier().verify(&unsigned));
}

#[test]
fn another_algorithm_in_the_header_is_refused() {
    // The same secret with HS512: the signature is genuine, the algorithm is not the pinned one.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &good_claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert!(refused(verifier().verify(&hs512)).contains("HS256"));
    // An RS256 header over an HMAC signature: the classic algorithm-confusion attempt.
    let good = sign(&good_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let confused = format!(
        "{}.{}.{}",
        b64(&json!({ "alg": "RS256", "typ": "JWT" })),
        parts[1],
        parts[2]
    );
    refused(verifier().verify(&confused));
}

#[test]
fn missing_or_unknown_claims_are_refused() {
    for field in ["sub", "role", "exp"] {
        let mut claims = good_claims();
        claims.as_object_mut().unwrap().remove(field);
        refused(verifier().verify(&sign(&claims)));
    }
    for (field, value) in [
        ("role", json!("superuser")),
        ("role", json!(null)),
        ("sub", json!("not-a-uuid")),
        ("sub", json!(42)),
        ("exp", json!("tomorrow")),
    ] {
        let mut claims = good_claims();
        claims[field] = value;
        refused(verifier().verify(&sign(&claims)));
    }
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    for junk in [
        "", "   ", "abc", "a.b", "a.b.c", "....", "Bearer x", "é.é.é",
    ] {
        refused(verifier().verify(junk));
    }
    let huge = format!("{}.{}.x", "a".repeat(MAX_TOKEN_BYTES), "b");
    assert!(refused(verifier().verify(&huge)).contains("too long"));
    refused(verifier().verify_bearer(None).await);
    refused(verifier().verify_bearer(Some("Basic dXNlcjpwYXNz")).await);
    refused(verifier().verify_bearer(Some(&sign(&good_claims()))).await);
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let config = AuthConfig::from_lookup(|name| match name {
        "PORTAL_JWT_SECRET" => Some(SECRET.to_owned()),
        "PORTAL_JWT_ISSUER" => Some("https://portal.konstruct.test".to_owned()),
        "PORTAL_JWT_AUDIENCE" => Some("webchat".to_owned()),
        _ => None,
    })
    .unwrap();
    let strict = TokenVerifier::new(&config);
    let mut claims = good_claims();
    claims["iss"] = json!("https://portal.konstruct.test");
    claims["aud"] = json!("webchat");
    strict.verify(&sign(&claims)).expect("matching iss and aud");

    let mut wrong_issuer = claims.clone();
    wrong_issuer["iss"] = json!("https://evil.test");
    assert!(refused(strict.verify(&sign(&wrong_issuer))).contains("issuer"));
    let mut wrong_audience = claims.clone();
    wrong_audience["aud"] = json!("billing");
    assert!(refused(strict.verify(&sign(&wrong_audience))).contains("audience"));
    refused(strict.verify(&sign(&good_claims())));

    // Without the settings, iss and aud are not required and not checked.
    verifier()
        .verify(&sign(&claims))
        .expect("unchecked when not configured");
}
