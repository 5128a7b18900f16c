//! Portal session tokens (PROTOCOL §1): HS256 JWTs that prove who the caller is. They never
//! prove tenant access; that is read from the database (see `rbac`).

use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, TokenData, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::config::AuthConfig;
use crate::domain::{Role, UserId};
use crate::secrets::Secret;

/// Longer tokens are refused before any decoding work; real portal tokens are a few hundred
/// bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A caller whose token verified. Only [`TokenVerifier::verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalCaller {
    user_id: UserId,
    role: Role,
    expires_at: DateTime<Utc>,
}

impl PortalCaller {
    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// When the token stops proving who the caller is (its `exp`): a socket authenticated with
    /// it is authorized until then, and no longer (PROTOCOL §1).
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }

    /// Proof that this caller is a platform admin, for the few paths that widen access.
    pub fn platform_admin(&self) -> Option<PlatformAdmin> {
        (self.role == Role::PlatformAdmin).then_some(PlatformAdmin(()))
    }
}

/// Held only by code acting for a verified `platform_admin` caller; the database's
/// cross-tenant read scope can only be opened with one.
#[derive(Debug, Clone, Copy)]
pub struct PlatformAdmin(());

/// The token, trimmed, if it is worth decoding: longer ones are refused unread.
fn bounded(token: &str) -> Result<&str, Error> {
    let token = token.trim();
    if token.is_empty() {
        return Err(Error::Unauthenticated("missing token".into()));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Error::Unauthenticated("token is too long".into()));
    }
    Ok(token)
}

/// The caller a decoded token proves, or why it proves nothing.
fn caller(decoded: jsonwebtoken::errors::Result<TokenData<Claims>>) -> Result<PortalCaller, Error> {
    let claims = decoded
        .map_err(|e| {
            let reason = match e.kind() {
                ErrorKind::ExpiredSignature => "token has expired",
                ErrorKind::ImmatureSignature => "token is not valid yet",
                ErrorKind::InvalidSignature => "token signature does not verify",
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    "token must be signed with HS256"
                }
                ErrorKind::InvalidIssuer => "token has the wrong issuer",
                ErrorKind::InvalidAudience => "token has the wrong audience",
                ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim",
                _ => "token is malformed",
            };
            Error::Unauthenticated(reason.into())
        })?
        .claims;
    let expires_at = DateTime::from_timestamp(claims.exp, 0)
        .ok_or_else(|| Error::Unauthenticated("token expiry is out of range".into()))?;
    Ok(PortalCaller {
        user_id: claims.sub,
        role: claims.role,
        expires_at,
    })
}

fn key_of(secret: &Secret) -> DecodingKey {
    DecodingKey::from_secret(secret.current().expose_secret().as_bytes())
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: UserId,
    role: Role,
    exp: i64,
}

/// Verifies portal tokens; built once per process from [`AuthConfig`].
///
/// The key follows its secret: when a token's signature does not verify,
/// [`TokenVerifier::verify_fresh`] reads a managed secret again (see [`crate::secrets`]) and, if
/// it changed, verifies with the new one, so rotating the portal's secret needs no redeploy.
#[derive(Clone)]
pub struct TokenVerifier {
    key: Arc<RwLock<DecodingKey>>,
    secret: Secret,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    pub fn new(config: &AuthConfig) -> Self {
        // The algorithm is pinned: a token whose header names any other (or `none`) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 0;
        let mut required = vec!["exp", "sub"];
        match &config.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Self {
            key: Arc::new(RwLock::new(key_of(&config.secret))),
            secret: config.secret.clone(),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<PortalCaller, Error> {
        let token = bounded(token)?;
        caller(self.decode(token))
    }

    /// [`TokenVerifier::verify`], reading the secret again once if the signature does not
    /// verify with the current one.
    pub async fn verify_fresh(&self, token: &str) -> Result<PortalCaller, Error> {
        let token = bounded(token)?;
        let mut decoded = self.decode(token);
        if matches!(&decoded, Err(e) if *e.kind() == ErrorKind::InvalidSignature)
            && self.secret.refresh().await
        {
            *self.key.write().expect("key lock") = key_of(&self.secret);
            decoded = self.decode(token);
        }
        caller(decoded)
    }

    fn decode(&self, token: &str) -> jsonwebtoken::errors::Result<TokenData<Claims>> {
        let key = self.key.read().expect("key lock").clone();
        jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
    }

    /// Reads `Authorization: Bearer <token>`.
    pub async fn verify_bearer(&self, header: Option<&str>) -> Result<PortalCaller, Error> {
        let header = header.ok_or_else(|| Error::Unauthenticated("missing bearer token".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Error::Unauthenticated("expected a bearer token".into()))?;
        self.verify_fresh(token).await
    }
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: UserId,
    role: Role,
    exp: i64,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Mints a portal token, as the portal would: for development tools and tests only, never for
/// a deployed system (the portal issues its own).
pub fn issue_token(
    config: &AuthConfig,
    user: UserId,
    role: Role,
    ttl: std::time::Duration,
) -> Result<String, Error> {
    let now = chrono::Utc::now().timestamp();
    let claims = IssuedClaims {
        sub: user,
        role,
        exp: now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
        iat: now,
        iss: config.issuer.as_deref(),
        aud: config.audience.as_deref(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(config.secret.current().expose_secret().as_bytes()),
    )
    .map_err(|e| Error::Internal(format!("cannot sign a token: {e}")))
}
