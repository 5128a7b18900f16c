//! Typed configuration from the environment (PROTOCOL §4): the one place the system reads it.
//!
//! Each part reads its variables through a [`Lookup`]: a process passes [`env`], a test a map.
//! A missing or malformed variable fails with an error naming it. Every variable is documented
//! once, in [`variables`] (the README's configuration table is its output). Settings are plain
//! data and this module imports no feature: it holds the readers of tokens, mode and CORS;
//! `database` the connection's; [`routes`] the WebSocket routes' limits; [`orchestrator`] the
//! orchestrator's (agent retries, output limits, providers, fan-out). Each binary builds its
//! components from these in one call at start (README, Layout).

mod database;
pub mod orchestrator;
pub mod routes;
pub mod variables;

pub use database::{DatabaseConfig, TxTimeouts, connect_options};

use secrecy::ExposeSecret;

use crate::secrets::{Secret, Secrets};

/// A variable that is missing or malformed; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {var} {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(var: &'static str, problem: impl Into<String>) -> Self {
        Self {
            var,
            problem: problem.into(),
        }
    }
}

/// Where configuration values come from: the process environment or, in tests, a map.
pub trait Lookup: Fn(&str) -> Option<String> {}
impl<F: Fn(&str) -> Option<String>> Lookup for F {}

/// The process environment.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A variable's value as set, blank included. Every read of the configuration comes here, and a
/// variable missing from [`variables::VARIABLES`] (so from the README) fails in debug builds.
pub fn raw(lookup: &impl Lookup, var: &'static str) -> Option<String> {
    debug_assert!(
        variables::documented(var),
        "{var} is read but not documented in shared/src/config/variables.rs"
    );
    lookup(var)
}

/// A variable's value as set; blank counts as unset.
pub fn set(lookup: &impl Lookup, var: &'static str) -> Option<String> {
    raw(lookup, var).filter(|v| !v.trim().is_empty())
}

/// A variable's value ([`set`]), or else the table's default for it
/// ([`variables::default_of`], the one place defaults are written), if it has one.
pub fn optional(lookup: &impl Lookup, var: &'static str) -> Option<String> {
    set(lookup, var).or_else(|| variables::default_of(var).map(str::to_owned))
}

/// A positive integer the table gives a default to (so it is always there).
pub fn defaulted(lookup: &impl Lookup, var: &'static str) -> Result<u64, ConfigError> {
    positive(lookup, var)?.ok_or_else(|| ConfigError::new(var, "has no default in the table"))
}

/// An optional positive integer.
pub fn positive(lookup: &impl Lookup, var: &'static str) -> Result<Option<u64>, ConfigError> {
    optional(lookup, var)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::new(var, "must be a positive integer"))
        })
        .transpose()
}

/// A defaulted positive number that fits a `u32`.
pub fn defaulted_number(lookup: &impl Lookup, var: &'static str) -> Result<u32, ConfigError> {
    u32::try_from(defaulted(lookup, var)?).map_err(|_| ConfigError::new(var, "is too large"))
}

/// The secret `var` names: read from Secrets Manager when `arn_var` (its ARN) is set, else the
/// plain variable's value; `None` when neither is set. Both set is refused: which one counts
/// would be a guess.
pub async fn load_secret(
    lookup: &impl Lookup,
    secrets: &Secrets,
    var: &'static str,
    arn_var: &'static str,
) -> Result<Option<Secret>, ConfigError> {
    match (optional(lookup, var), optional(lookup, arn_var)) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            arn_var,
            format!("and {var} are both set; set one"),
        )),
        (Some(value), None) => Ok(Some(Secret::fixed(var, value))),
        (None, None) => Ok(None),
        (None, Some(arn)) => secrets
            .read(var, &arn)
            .await
            .map(Some)
            .map_err(|problem| ConfigError::new(arn_var, problem)),
    }
}

fn required(lookup: &impl Lookup, var: &'static str) -> Result<String, ConfigError> {
    optional(lookup, var).ok_or_else(|| ConfigError::new(var, "is not set"))
}

/// Portal token checks (PROTOCOL §1).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub secret: Secret,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl AuthConfig {
    /// HS256 keys shorter than the hash output are guessable; the contract asks for 32 bytes.
    pub const MIN_SECRET_BYTES: usize = 32;

    /// From the plain variables (local mode, development commands, tests).
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let secret = optional(&lookup, "PORTAL_JWT_SECRET")
            .map(|value| Secret::fixed("PORTAL_JWT_SECRET", value));
        Self::with_secret(&lookup, secret)
    }

    /// From the environment, reading the secret from Secrets Manager when
    /// `PORTAL_JWT_SECRET_ARN` names it. In aws mode, warns of what a deployment should set.
    pub async fn load(lookup: impl Lookup, secrets: &Secrets) -> Result<Self, ConfigError> {
        let secret = load_secret(
            &lookup,
            secrets,
            "PORTAL_JWT_SECRET",
            "PORTAL_JWT_SECRET_ARN",
        )
        .await?;
        let config = Self::with_secret(&lookup, secret)?;
        if deployed(&lookup) {
            warn_if_plain(&config.secret, "PORTAL_JWT_SECRET_ARN");
            for (var, value) in [
                ("PORTAL_JWT_ISSUER", &config.issuer),
                ("PORTAL_JWT_AUDIENCE", &config.audience),
            ] {
                if value.is_none() {
                    tracing::warn!(
                        variable = var,
                        "{var} is not set: tokens are accepted whoever issued them for whomever; \
                         set the portal's value (template parameters PortalJwtIssuer, PortalJwtAudience)"
                    );
                }
            }
        }
        Ok(config)
    }

    fn with_secret(lookup: &impl Lookup, secret: Option<Secret>) -> Result<Self, ConfigError> {
        let secret = secret.ok_or_else(|| {
            ConfigError::new(
                "PORTAL_JWT_SECRET",
                "is not set (nor PORTAL_JWT_SECRET_ARN)",
            )
        })?;
        if secret.current().expose_secret().len() < Self::MIN_SECRET_BYTES {
            return Err(ConfigError::new(
                "PORTAL_JWT_SECRET",
                format!("must be at least {} bytes", Self::MIN_SECRET_BYTES),
            ));
        }
        Ok(Self {
            secret,
            issuer: optional(lookup, "PORTAL_JWT_ISSUER"),
            audience: optional(lookup, "PORTAL_JWT_AUDIENCE"),
        })
    }
}

/// Whether this is a deployed function (`KONSTRUCT_MODE=aws`, however spaced or cased).
pub fn deployed(lookup: &impl Lookup) -> bool {
    optional(lookup, "KONSTRUCT_MODE").is_some_and(|m| m.trim().eq_ignore_ascii_case("aws"))
}

/// A deployed function should name its secrets by ARN: a value in its configuration can be
/// read by anyone who may read the function's configuration.
fn warn_if_plain(secret: &Secret, arn_var: &'static str) {
    if !secret.is_managed() {
        tracing::warn!(
            variable = secret.var(),
            "{} is in the function's configuration; name the secret with {arn_var} instead",
            secret.var()
        );
    }
}

/// Which edges the process uses: AWS's (SQS, connection-management API) or the laptop's (Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Aws { queue_url: String },
    Local { redis_url: String },
}

impl Mode {
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        match required(&lookup, "KONSTRUCT_MODE")?.trim() {
            "aws" => {
                let queue_url = http_url(&lookup, "QUEUE_URL")?
                    .ok_or_else(|| ConfigError::new("QUEUE_URL", "is not set"))?;
                if !queue_url.ends_with(".fifo") {
                    return Err(ConfigError::new(
                        "QUEUE_URL",
                        "must name a FIFO queue (.fifo)",
                    ));
                }
                Ok(Self::Aws { queue_url })
            }
            "local" => {
                let redis_url = required(&lookup, "REDIS_URL")?;
                if !redis_url.starts_with("redis://") && !redis_url.starts_with("rediss://") {
                    return Err(ConfigError::new("REDIS_URL", "must be a redis:// URL"));
                }
                Ok(Self::Local { redis_url })
            }
            other => Err(ConfigError::new(
                "KONSTRUCT_MODE",
                format!("must be `aws` or `local`, not `{other}`"),
            )),
        }
    }
}

pub fn http_url(lookup: &impl Lookup, var: &'static str) -> Result<Option<String>, ConfigError> {
    match optional(lookup, var) {
        Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
            Ok(Some(url.trim_end_matches('/').to_owned()))
        }
        Some(_) => Err(ConfigError::new(var, "must be an http(s) URL")),
        None => Ok(None),
    }
}

/// Prefix of every Redis key the system owns besides the per-tenant ones
/// (`KONSTRUCT_REDIS_PREFIX`); separate stacks can share one Redis.
pub fn redis_prefix(lookup: &impl Lookup) -> String {
    optional(lookup, "KONSTRUCT_REDIS_PREFIX").unwrap_or_default()
}

/// `WS_MANAGEMENT_ENDPOINT`: where the connection-management API is, e.g.
/// `https://{api-id}.execute-api.{region}.amazonaws.com/{stage}`. When absent it is derived from
/// each event's domain and stage (which a custom domain name would break).
pub fn management_endpoint(lookup: &impl Lookup) -> Result<Option<String>, ConfigError> {
    http_url(lookup, "WS_MANAGEMENT_ENDPOINT")
}

/// Which browser origins may call the REST API (`CORS_ALLOWED_ORIGINS`: a comma-separated list
/// of origins, or `*`). Unset means none: the portal is then served from the API's own origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsConfig {
    Any,
    Origins(Vec<String>),
}

impl CorsConfig {
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let Some(raw) = optional(&lookup, "CORS_ALLOWED_ORIGINS") else {
            return Ok(Self::Origins(Vec::new()));
        };
        if raw.trim() == "*" {
            return Ok(Self::Any);
        }
        let origins: Vec<String> = raw
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        if let Some(bad) = origins.iter().find(|o| {
            !(o.starts_with("https://") || o.starts_with("http://"))
                || http::HeaderValue::from_str(o).is_err()
        }) {
            return Err(ConfigError::new(
                "CORS_ALLOWED_ORIGINS",
                format!("has `{bad}`, which is not an http(s) origin"),
            ));
        }
        Ok(Self::Origins(origins))
    }
}

/// A [`Lookup`] over a fixed list of variables, for the settings' unit tests.
#[cfg(test)]
pub(crate) fn vars(pairs: &[(&str, &str)]) -> impl Lookup + use<> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| map.get(k).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn auth_config_requires_a_long_secret() {
        let err = AuthConfig::from_lookup(vars(&[])).unwrap_err();
        assert_eq!(err.var, "PORTAL_JWT_SECRET");
        let err = AuthConfig::from_lookup(vars(&[("PORTAL_JWT_SECRET", "short")])).unwrap_err();
        assert_eq!(err.var, "PORTAL_JWT_SECRET");
        assert!(err.to_string().contains("32 bytes"));
        let ok = AuthConfig::from_lookup(vars(&[
            ("PORTAL_JWT_SECRET", SECRET),
            ("PORTAL_JWT_ISSUER", "https://portal.example"),
            ("PORTAL_JWT_AUDIENCE", ""),
        ]))
        .unwrap();
        assert_eq!(ok.issuer.as_deref(), Some("https://portal.example"));
        assert_eq!(ok.audience, None);
    }

    #[test]
    fn cors_origins_are_checked() {
        assert_eq!(
            CorsConfig::from_lookup(vars(&[])).unwrap(),
            CorsConfig::Origins(vec![])
        );
        assert_eq!(
            CorsConfig::from_lookup(vars(&[("CORS_ALLOWED_ORIGINS", "*")])).unwrap(),
            CorsConfig::Any
        );
        assert_eq!(
            CorsConfig::from_lookup(vars(&[(
                "CORS_ALLOWED_ORIGINS",
                "http://localhost:3000, https://portal.example/"
            )]))
            .unwrap(),
            CorsConfig::Origins(vec![
                "http://localhost:3000".into(),
                "https://portal.example".into()
            ])
        );
        let err = CorsConfig::from_lookup(vars(&[("CORS_ALLOWED_ORIGINS", "portal.example")]))
            .unwrap_err();
        assert_eq!(err.var, "CORS_ALLOWED_ORIGINS");
    }

    #[test]
    fn mode_needs_its_edges() {
        assert_eq!(
            Mode::from_lookup(vars(&[])).unwrap_err().var,
            "KONSTRUCT_MODE"
        );
        assert_eq!(
            Mode::from_lookup(vars(&[("KONSTRUCT_MODE", "cloud")]))
                .unwrap_err()
                .var,
            "KONSTRUCT_MODE"
        );
        assert_eq!(
            Mode::from_lookup(vars(&[("KONSTRUCT_MODE", "aws")]))
                .unwrap_err()
                .var,
            "QUEUE_URL"
        );
        assert_eq!(
            Mode::from_lookup(vars(&[
                ("KONSTRUCT_MODE", "aws"),
                ("QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/work"),
            ]))
            .unwrap_err()
            .var,
            "QUEUE_URL"
        );
        assert_eq!(
            Mode::from_lookup(vars(&[("KONSTRUCT_MODE", "local")]))
                .unwrap_err()
                .var,
            "REDIS_URL"
        );
        assert_eq!(
            Mode::from_lookup(vars(&[
                ("KONSTRUCT_MODE", "aws"),
                (
                    "QUEUE_URL",
                    "https://sqs.eu-west-1.amazonaws.com/1/work.fifo"
                ),
            ]))
            .unwrap(),
            Mode::Aws {
                queue_url: "https://sqs.eu-west-1.amazonaws.com/1/work.fifo".into(),
            }
        );
        let endpoint = management_endpoint(&vars(&[(
            "WS_MANAGEMENT_ENDPOINT",
            "http://127.0.0.1:8080/",
        )]))
        .unwrap();
        assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:8080"));
        let err = management_endpoint(&vars(&[("WS_MANAGEMENT_ENDPOINT", "execute-api.example")]))
            .unwrap_err();
        assert_eq!(err.var, "WS_MANAGEMENT_ENDPOINT");
        assert_eq!(
            Mode::from_lookup(vars(&[
                ("KONSTRUCT_MODE", "local"),
                ("REDIS_URL", "redis://127.0.0.1:6379"),
            ]))
            .unwrap(),
            Mode::Local {
                redis_url: "redis://127.0.0.1:6379".into()
            }
        );
    }
}
