//! Secrets (PROTOCOL §4, invariant 8). A deployed function names each secret it uses by its
//! Secrets Manager ARN (`PORTAL_JWT_SECRET_ARN`, `DATABASE_URL_SECRET_ARN`,
//! `OPENAI_API_KEY_SECRET_ARN`) and reads the value when its execution environment starts, so
//! the value is never in the function's configuration. The local mode and the tests name the
//! value itself (`PORTAL_JWT_SECRET`, …).
//!
//! A value read from Secrets Manager is kept for the life of the process and read again when
//! it fails to authenticate something (a token's signature, a database login, a model call
//! answered 401): a rotated secret takes effect without a redeploy. Reads after a failure are
//! spaced by [`Secret::MIN_REFRESH`] (a reader may space them otherwise:
//! [`Secrets::refreshing_at_most_every`]), so a stream of forged tokens costs one read per
//! interval.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

/// The AWS SDK's configuration from the environment and a secrets reader through it: what a
/// function loads before its state.
pub async fn aws_config() -> (aws_config::SdkConfig, Secrets) {
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let secrets = Secrets::new(&aws);
    (aws, secrets)
}

/// Reads secrets from Secrets Manager; [`Secrets::none`] where only plain variables are
/// expected.
#[derive(Clone, Debug)]
pub struct Secrets {
    client: Option<aws_sdk_secretsmanager::Client>,
    min_refresh: Duration,
}

impl Secrets {
    /// A reader through the SDK's configuration (`AWS_ENDPOINT_URL_SECRETS_MANAGER` points it
    /// at an emulator).
    pub fn new(aws: &aws_config::SdkConfig) -> Self {
        Self {
            client: Some(aws_sdk_secretsmanager::Client::new(aws)),
            min_refresh: Secret::MIN_REFRESH,
        }
    }

    /// The secrets this reader reads are read again at most once per `interval` after failures
    /// ([`Secret::MIN_REFRESH`] unless set): a test of a rotation waits that long, not the
    /// production interval.
    pub fn refreshing_at_most_every(self, interval: Duration) -> Self {
        Self {
            min_refresh: interval,
            ..self
        }
    }

    /// Plain variables only: a `…_SECRET_ARN` variable is refused.
    pub fn none() -> Self {
        Self {
            client: None,
            min_refresh: Secret::MIN_REFRESH,
        }
    }

    /// The secret `var` stands for, read from Secrets Manager by its ARN; the problem, to be
    /// told against the variable that named it, when it cannot be read.
    pub async fn read(&self, var: &'static str, arn: &str) -> Result<Secret, String> {
        let client = self
            .client
            .clone()
            .ok_or_else(|| "is not read here (set the value itself)".to_owned())?;
        let managed = Managed {
            client,
            arn: arn.trim().to_owned(),
            last_read: tokio::sync::Mutex::new(Instant::now()),
            min_refresh: self.min_refresh,
        };
        let value = managed.read().await?;
        Ok(Secret(Arc::new(Inner {
            var,
            value: RwLock::new(value),
            managed: Some(managed),
        })))
    }
}

/// One secret's current value; cheap to clone (clones share the value).
#[derive(Clone)]
pub struct Secret(Arc<Inner>);

struct Inner {
    /// The variable it stands for, for messages (never the value).
    var: &'static str,
    value: RwLock<SecretString>,
    managed: Option<Managed>,
}

struct Managed {
    client: aws_sdk_secretsmanager::Client,
    arn: String,
    last_read: tokio::sync::Mutex<Instant>,
    min_refresh: Duration,
}

impl Managed {
    async fn read(&self) -> Result<SecretString, String> {
        let output = self
            .client
            .get_secret_value()
            .secret_id(&self.arn)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "names a secret that could not be read: {}",
                    aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
                )
            })?;
        output
            .secret_string()
            .filter(|v| !v.trim().is_empty())
            .map(|v| SecretString::from(v.trim().to_owned()))
            .ok_or_else(|| "names a secret with no SecretString value".to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("var", &self.0.var)
            .field("managed", &self.0.managed.is_some())
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// The shortest interval between two reads after failures, unless the reader sets another.
    pub const MIN_REFRESH: Duration = Duration::from_secs(5);

    /// A value given directly (local mode, tests); [`Secret::refresh`] never changes it.
    pub fn fixed(var: &'static str, value: impl Into<String>) -> Self {
        Self(Arc::new(Inner {
            var,
            value: RwLock::new(SecretString::from(value.into())),
            managed: None,
        }))
    }

    /// Whether it was read from Secrets Manager.
    pub fn is_managed(&self) -> bool {
        self.0.managed.is_some()
    }

    /// The variable this secret stands for.
    pub fn var(&self) -> &'static str {
        self.0.var
    }

    pub fn current(&self) -> SecretString {
        self.0.value.read().expect("secret lock").clone()
    }

    /// After the current value failed to authenticate: reads the secret again, unless it was
    /// read less than its reader's interval ([`Secret::MIN_REFRESH`]) ago or is not managed. True when the value
    /// changed (the caller then tries again with it).
    pub async fn refresh(&self) -> bool {
        let Some(managed) = &self.0.managed else {
            return false;
        };
        let mut last_read = managed.last_read.lock().await;
        if last_read.elapsed() < managed.min_refresh {
            return false;
        }
        *last_read = Instant::now();
        match managed.read().await {
            Ok(value) => {
                let mut current = self.0.value.write().expect("secret lock");
                let changed = current.expose_secret() != value.expose_secret();
                if changed {
                    tracing::info!(secret = self.0.var, "secret changed; using the new value");
                    *current = value;
                }
                changed
            }
            Err(problem) => {
                tracing::warn!(secret = self.0.var, %problem, "secret could not be read again");
                false
            }
        }
    }
}
