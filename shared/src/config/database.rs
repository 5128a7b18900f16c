//! The Postgres connection: the URL or the RDS secret, the pool, the pooler, the timeouts.

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;

use super::{
    ConfigError, Lookup, defaulted, defaulted_number, deployed, load_secret, optional,
    warn_if_plain,
};
use crate::secrets::{Secret, Secrets};

/// The Postgres connection. Lambdas keep their pools tiny: Postgres, not Lambda, is what does
/// not scale by itself (RDS Proxy sits in front in AWS).
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub options: PgConnectOptions,
    pub max_connections: u32,
    /// Where the options came from, read again when a login fails (a rotated password).
    pub credentials: Option<Secret>,
    /// The URL names a pooler that multiplexes transactions (RDS Proxy, PgBouncer in
    /// transaction mode): statements are then prepared unnamed (see `db::query`).
    pub pooled: bool,
    /// How long any transaction's statements may wait for a lock, and run.
    pub timeouts: TxTimeouts,
}

/// Every transaction runs under `lock_timeout` and `statement_timeout` (set in its `BEGIN`
/// round trip), so no bug can hold a conversation, or a function's connection, for long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxTimeouts {
    pub lock: Duration,
    pub statement: Duration,
}

/// The table's defaults.
impl Default for TxTimeouts {
    fn default() -> Self {
        Self::from_lookup(&|_: &str| None).expect("the variables table's defaults read")
    }
}

impl TxTimeouts {
    fn from_lookup(lookup: &impl Lookup) -> Result<Self, ConfigError> {
        let ms = |var| Ok::<_, ConfigError>(Duration::from_millis(defaulted(lookup, var)?));
        Ok(Self {
            lock: ms("DATABASE_LOCK_TIMEOUT_MS")?,
            statement: ms("DATABASE_STATEMENT_TIMEOUT_MS")?,
        })
    }
}

impl DatabaseConfig {
    /// The functions' connection, from the plain `DATABASE_URL`.
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let secret = optional(&lookup, "DATABASE_URL").map(|v| Secret::fixed("DATABASE_URL", v));
        Self::with_secret(&lookup, secret, "DATABASE_URL")
    }

    /// The functions' connection: `DATABASE_URL`, or the secret `DATABASE_URL_SECRET_ARN`
    /// names (a URL, or the JSON Secrets Manager keeps for an RDS database).
    pub async fn load(lookup: impl Lookup, secrets: &Secrets) -> Result<Self, ConfigError> {
        Self::load_role(lookup, secrets, "DATABASE_URL", "DATABASE_URL_SECRET_ARN").await
    }

    /// The migrator's connection (the role that owns the schema): `MIGRATOR_DATABASE_URL` or
    /// `MIGRATOR_DATABASE_URL_SECRET_ARN`.
    pub async fn load_migrator(
        lookup: impl Lookup,
        secrets: &Secrets,
    ) -> Result<Self, ConfigError> {
        Self::load_role(
            lookup,
            secrets,
            "MIGRATOR_DATABASE_URL",
            "MIGRATOR_DATABASE_URL_SECRET_ARN",
        )
        .await
    }

    /// One role's connection: the plain `var` or the secret `arn_var` names.
    pub async fn load_role(
        lookup: impl Lookup,
        secrets: &Secrets,
        var: &'static str,
        arn_var: &'static str,
    ) -> Result<Self, ConfigError> {
        let secret = load_secret(&lookup, secrets, var, arn_var).await?;
        let config = Self::with_secret(&lookup, secret, var)?;
        if deployed(&lookup)
            && let Some(secret) = &config.credentials
        {
            warn_if_plain(secret, arn_var);
        }
        Ok(config)
    }

    fn with_secret(
        lookup: &impl Lookup,
        secret: Option<Secret>,
        var: &'static str,
    ) -> Result<Self, ConfigError> {
        let secret = secret.ok_or_else(|| ConfigError::new(var, "is not set"))?;
        let options = connect_options(secret.current().expose_secret())
            .map_err(|problem| ConfigError::new(var, problem))?;
        let max_connections = defaulted_number(lookup, "DATABASE_MAX_CONNECTIONS")?;
        let pooled = match optional(lookup, "DATABASE_POOLED")
            .as_deref()
            .map(str::trim)
        {
            None => deployed(lookup),
            Some("true" | "1" | "on") => true,
            Some("false" | "0" | "off") => false,
            Some(_) => return Err(ConfigError::new("DATABASE_POOLED", "must be true or false")),
        };
        Ok(Self {
            options,
            max_connections,
            credentials: Some(secret),
            pooled,
            timeouts: TxTimeouts::from_lookup(lookup)?,
        })
    }
}

/// Connection options from a `postgres://` URL or from the JSON Secrets Manager keeps for an
/// RDS database (`{"username", "password", "host", "port", "dbname"}`, as its rotation
/// functions write it).
pub fn connect_options(value: &str) -> Result<PgConnectOptions, String> {
    // No `extra_float_digits` startup parameter (sqlx's default sends one; nothing here reads
    // floats as text): poolers refuse startup parameters they do not track.
    parse_connect_options(value).map(|options| options.extra_float_digits(None))
}

fn parse_connect_options(value: &str) -> Result<PgConnectOptions, String> {
    let value = value.trim();
    if value.starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Rds {
            username: String,
            password: String,
            host: String,
            port: Option<u16>,
            dbname: Option<String>,
        }
        let rds: Rds = serde_json::from_str(value).map_err(|_| {
            "is JSON without the username, password and host of a database secret".to_owned()
        })?;
        let mut options = PgConnectOptions::new()
            .host(&rds.host)
            .port(rds.port.unwrap_or(5432))
            .username(&rds.username)
            .password(&rds.password);
        if let Some(dbname) = &rds.dbname {
            options = options.database(dbname);
        }
        return Ok(options);
    }
    if !["postgres://", "postgresql://"]
        .iter()
        .any(|scheme| value.starts_with(scheme))
    {
        return Err("must be a postgres:// URL".to_owned());
    }
    // The parser's message may quote the URL, password included: never repeat it.
    PgConnectOptions::from_str(value).map_err(|_| "is not a valid Postgres URL".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::vars;

    #[test]
    fn database_config_names_the_bad_variable() {
        assert_eq!(
            DatabaseConfig::from_lookup(vars(&[])).unwrap_err().var,
            "DATABASE_URL"
        );
        assert_eq!(
            DatabaseConfig::from_lookup(vars(&[("DATABASE_URL", "mysql://x")]))
                .unwrap_err()
                .var,
            "DATABASE_URL"
        );
        let err = DatabaseConfig::from_lookup(vars(&[
            ("DATABASE_URL", "postgres://app@127.0.0.1:5432/app"),
            ("DATABASE_MAX_CONNECTIONS", "zero"),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "DATABASE_MAX_CONNECTIONS");
        let ok = DatabaseConfig::from_lookup(vars(&[(
            "DATABASE_URL",
            "postgres://app@127.0.0.1:5432/app",
        )]))
        .unwrap();
        assert_eq!(ok.max_connections, 2);
    }
}
