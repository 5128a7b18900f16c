//! The orchestrator's settings: how long and how often an agent is tried, output limits, the
//! providers' endpoints and allowed models, the fan-out to sockets, and a job's limits.

use std::sync::Arc;
use std::time::Duration;

use super::{ConfigError, Lookup, http_url, positive, raw};
use crate::agent::{Bedrock, DEFAULT_BASE_URL, OpenAi, OutputLimits, RetryPolicy};
use crate::db::Db;
use crate::delivery::{ConnectionsFanout, Delivery, PostBudget};
use crate::orchestrator::{DEFAULT_JOB_BUDGET, DEFAULT_MAX_RECEIVES};
use crate::secrets::Secrets;

impl RetryPolicy {
    /// `AGENT_TIMEOUT_SECONDS` and `AGENT_MAX_ATTEMPTS`, each optional.
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let mut policy = Self::default();
        if let Some(seconds) = positive(&lookup, "AGENT_TIMEOUT_SECONDS")? {
            policy.attempt_timeout = Duration::from_secs(seconds);
        }
        if let Some(attempts) = positive(&lookup, "AGENT_MAX_ATTEMPTS")? {
            policy.max_attempts = usize::try_from(attempts).unwrap_or(usize::MAX);
        }
        Ok(policy)
    }
}

impl OutputLimits {
    /// `AGENT_DEFAULT_MAX_TOKENS`, `AGENT_MAX_TOKENS` and `REPLY_MAX_BYTES`, each optional.
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let mut limits = Self::default();
        let tokens = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if let Some(v) = positive(&lookup, "AGENT_MAX_TOKENS")? {
            limits.max_tokens = tokens(v);
            limits.default_max_tokens = limits.default_max_tokens.min(limits.max_tokens);
        }
        if let Some(v) = positive(&lookup, "AGENT_DEFAULT_MAX_TOKENS")? {
            if tokens(v) > limits.max_tokens {
                return Err(ConfigError::new(
                    "AGENT_DEFAULT_MAX_TOKENS",
                    format!("must not exceed AGENT_MAX_TOKENS ({})", limits.max_tokens),
                ));
            }
            limits.default_max_tokens = tokens(v);
        }
        if let Some(v) = positive(&lookup, "REPLY_MAX_BYTES")? {
            limits.max_reply_bytes = usize::try_from(v).unwrap_or(usize::MAX);
        }
        Ok(limits)
    }
}

impl ConnectionsFanout {
    /// `FANOUT_CONCURRENCY` and `POST_TIMEOUT_MS`, each optional.
    pub fn from_lookup(
        db: Db,
        delivery: Arc<dyn Delivery>,
        lookup: impl Lookup,
    ) -> Result<Self, ConfigError> {
        let mut fanout = Self::new(db, delivery);
        if let Some(n) = positive(&lookup, "FANOUT_CONCURRENCY")? {
            fanout.concurrency = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(ms) = positive(&lookup, "POST_TIMEOUT_MS")? {
            fanout.post_timeout = std::time::Duration::from_millis(ms);
        }
        fanout.budget =
            post_budget(&lookup)?.map(|per_second| Arc::new(PostBudget::new(per_second)));
        Ok(fanout)
    }
}

impl OpenAi {
    /// `OPENAI_BASE_URL` (default OpenAI's) and the key: `OPENAI_API_KEY`, or the secret
    /// `OPENAI_API_KEY_SECRET_ARN` names (optional: local servers such as Ollama need none).
    pub async fn load(lookup: impl Lookup, secrets: &Secrets) -> Result<Self, ConfigError> {
        let base_url =
            http_url(&lookup, "OPENAI_BASE_URL")?.unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
        let api_key = secrets
            .load(&lookup, "OPENAI_API_KEY", "OPENAI_API_KEY_SECRET_ARN")
            .await?;
        Ok(Self::with_key(&base_url, api_key))
    }
}

impl Bedrock {
    /// `BEDROCK_MODEL_IDS`: the allowed model ids, comma-separated (set: an empty value allows
    /// none; unset: any).
    pub fn from_lookup(client: aws_sdk_bedrockruntime::Client, lookup: impl Lookup) -> Self {
        let bedrock = Self::new(client);
        // Set but blank allows none: the value as set, not `optional`'s.
        match raw(&lookup, "BEDROCK_MODEL_IDS") {
            Some(list) => bedrock.allowing(
                list.split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            None => bedrock,
        }
    }
}

/// `POST_BUDGET_PER_SECOND` shared evenly by `POST_BUDGET_SHARES` processes (default 1): this
/// process's posts a second, at least one; `None` when no budget is set.
pub fn post_budget(lookup: &impl Lookup) -> Result<Option<std::num::NonZeroU32>, ConfigError> {
    let Some(budget) = positive(lookup, "POST_BUDGET_PER_SECOND")? else {
        return Ok(None);
    };
    let shares = positive(lookup, "POST_BUDGET_SHARES")?.unwrap_or(1);
    let share = u32::try_from((budget / shares).max(1)).unwrap_or(u32::MAX);
    Ok(std::num::NonZeroU32::new(share))
}

/// `MAX_RECEIVE_COUNT`: receives of a job before the queue gives up.
pub fn max_receives(lookup: &impl Lookup) -> Result<u32, ConfigError> {
    Ok(
        positive(lookup, "MAX_RECEIVE_COUNT")?.map_or(DEFAULT_MAX_RECEIVES, |n| {
            u32::try_from(n).unwrap_or(u32::MAX)
        }),
    )
}

/// `JOB_BUDGET_SECONDS`: the time a job may need before an invocation's deadline.
pub fn job_budget(lookup: &impl Lookup) -> Result<Duration, ConfigError> {
    Ok(positive(lookup, "JOB_BUDGET_SECONDS")?.map_or(DEFAULT_JOB_BUDGET, Duration::from_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_posting_budget_is_shared_among_the_instances() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(post_budget(&vars(&[])).unwrap(), None);
        let share = |pairs| post_budget(&vars(pairs)).unwrap().unwrap().get();
        assert_eq!(share(&[("POST_BUDGET_PER_SECOND", "2000")]), 2000);
        assert_eq!(
            share(&[
                ("POST_BUDGET_PER_SECOND", "2000"),
                ("POST_BUDGET_SHARES", "20")
            ]),
            100
        );
        assert_eq!(
            share(&[
                ("POST_BUDGET_PER_SECOND", "5"),
                ("POST_BUDGET_SHARES", "20")
            ]),
            1
        );
        assert!(post_budget(&vars(&[("POST_BUDGET_PER_SECOND", "-1")])).is_err());
    }

    #[tokio::test]
    async fn the_openai_base_url_must_be_http_and_defaults_to_openai() {
        let secrets = Secrets::none();
        let err = OpenAi::load(
            |name: &str| (name == "OPENAI_BASE_URL").then(|| "ftp://x".to_owned()),
            &secrets,
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.var, "OPENAI_BASE_URL");
        assert!(OpenAi::load(|_: &str| None, &secrets).await.is_ok());
    }
}
