//! The orchestrator's settings, plain data read once at start: how long and how often an agent
//! is tried, output limits, the providers' endpoints and allowed models, the fan-out to sockets,
//! and a job's limits. `OrchestratorState::load` builds the components from them.

use std::num::NonZeroU32;
use std::time::Duration;

use super::{ConfigError, Lookup, http_url, positive, raw};

/// OpenAI's API, where `OPENAI_BASE_URL` points when unset.
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Everything the orchestrator reads besides the database, the mode and its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchestratorSettings {
    pub retry: RetryPolicy,
    pub output: OutputLimits,
    pub fanout: FanoutSettings,
    /// `OPENAI_BASE_URL`: an OpenAI-compatible API (default OpenAI's).
    pub openai_base_url: String,
    /// `BEDROCK_MODEL_IDS`: the model ids that may be invoked (set but blank: none; unset:
    /// `None`, any).
    pub bedrock_model_ids: Option<Vec<String>>,
    /// `MAX_RECEIVE_COUNT` (default 5): receives of a job before the queue gives up on it
    /// (SQS's `maxReceiveCount`); the user is told of a transient failure only on the last.
    pub max_receives: u32,
    /// `JOB_BUDGET_SECONDS` (default 30): the time a job may need; none starts with less left
    /// before the invocation's deadline.
    pub job_budget: Duration,
    /// `DEAD_LETTER_QUEUE_URL`: aws mode, where a job that will not be tried again goes.
    pub dead_letter_url: Option<String>,
}

impl OrchestratorSettings {
    pub const DEFAULT_MAX_RECEIVES: u32 = 5;
    pub const DEFAULT_JOB_BUDGET: Duration = Duration::from_secs(30);

    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            retry: RetryPolicy::from_lookup(&lookup)?,
            output: OutputLimits::from_lookup(&lookup)?,
            fanout: FanoutSettings::from_lookup(&lookup)?,
            openai_base_url: http_url(&lookup, "OPENAI_BASE_URL")?
                .unwrap_or_else(|| DEFAULT_OPENAI_BASE_URL.to_owned()),
            // Set but blank allows none: the value as set, not `optional`'s.
            bedrock_model_ids: raw(&lookup, "BEDROCK_MODEL_IDS").map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            max_receives: positive(&lookup, "MAX_RECEIVE_COUNT")?
                .map_or(Self::DEFAULT_MAX_RECEIVES, |n| {
                    u32::try_from(n).unwrap_or(u32::MAX)
                }),
            job_budget: positive(&lookup, "JOB_BUDGET_SECONDS")?
                .map_or(Self::DEFAULT_JOB_BUDGET, Duration::from_secs),
            dead_letter_url: http_url(&lookup, "DEAD_LETTER_QUEUE_URL")?,
        })
    }
}

/// How long and how often an agent is tried within one job (the agent runs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `AGENT_TIMEOUT_SECONDS` (default 60): one attempt's limit.
    pub attempt_timeout: Duration,
    /// `AGENT_MAX_ATTEMPTS` (default 3): attempts of a retryable failure.
    pub max_attempts: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(60),
            max_attempts: 3,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
        }
    }
}

impl RetryPolicy {
    fn from_lookup(lookup: &impl Lookup) -> Result<Self, ConfigError> {
        let mut policy = Self::default();
        if let Some(seconds) = positive(lookup, "AGENT_TIMEOUT_SECONDS")? {
            policy.attempt_timeout = Duration::from_secs(seconds);
        }
        if let Some(attempts) = positive(lookup, "AGENT_MAX_ATTEMPTS")? {
            policy.max_attempts = usize::try_from(attempts).unwrap_or(usize::MAX);
        }
        Ok(policy)
    }
}

/// Bounds on what one reply may cost: the model's output tokens (a deployment default, an
/// agent's own `max_tokens` setting up to a deployment maximum) and the stored reply's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// `AGENT_DEFAULT_MAX_TOKENS` (default 1024, at most `max_tokens`).
    pub default_max_tokens: u32,
    /// `AGENT_MAX_TOKENS` (default 4096).
    pub max_tokens: u32,
    /// `REPLY_MAX_BYTES` (default 64 KiB).
    pub max_reply_bytes: usize,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            default_max_tokens: 1024,
            max_tokens: 4096,
            max_reply_bytes: 64 * 1024,
        }
    }
}

impl OutputLimits {
    fn from_lookup(lookup: &impl Lookup) -> Result<Self, ConfigError> {
        let mut limits = Self::default();
        let tokens = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if let Some(v) = positive(lookup, "AGENT_MAX_TOKENS")? {
            limits.max_tokens = tokens(v);
            limits.default_max_tokens = limits.default_max_tokens.min(limits.max_tokens);
        }
        if let Some(v) = positive(lookup, "AGENT_DEFAULT_MAX_TOKENS")? {
            if tokens(v) > limits.max_tokens {
                return Err(ConfigError::new(
                    "AGENT_DEFAULT_MAX_TOKENS",
                    format!("must not exceed AGENT_MAX_TOKENS ({})", limits.max_tokens),
                ));
            }
            limits.default_max_tokens = tokens(v);
        }
        if let Some(v) = positive(lookup, "REPLY_MAX_BYTES")? {
            limits.max_reply_bytes = usize::try_from(v).unwrap_or(usize::MAX);
        }
        Ok(limits)
    }
}

/// How frames reach the sockets of a conversation through the connection-management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutSettings {
    /// `FANOUT_CONCURRENCY` (default 8): posts in flight for one frame.
    pub concurrency: usize,
    /// `POST_TIMEOUT_MS` (default 3000): one post's limit.
    pub post_timeout: Duration,
    /// `POST_BUDGET_PER_SECOND` shared evenly by `POST_BUDGET_SHARES` processes (default 1):
    /// this process's posts a second, at least one; `None` when no budget is set.
    pub post_budget: Option<NonZeroU32>,
}

impl Default for FanoutSettings {
    fn default() -> Self {
        Self {
            concurrency: 8,
            post_timeout: Duration::from_secs(3),
            post_budget: None,
        }
    }
}

impl FanoutSettings {
    pub fn from_lookup(lookup: &impl Lookup) -> Result<Self, ConfigError> {
        let mut fanout = Self::default();
        if let Some(n) = positive(lookup, "FANOUT_CONCURRENCY")? {
            fanout.concurrency = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(ms) = positive(lookup, "POST_TIMEOUT_MS")? {
            fanout.post_timeout = Duration::from_millis(ms);
        }
        if let Some(budget) = positive(lookup, "POST_BUDGET_PER_SECOND")? {
            let shares = positive(lookup, "POST_BUDGET_SHARES")?.unwrap_or(1);
            let share = u32::try_from((budget / shares).max(1)).unwrap_or(u32::MAX);
            fanout.post_budget = NonZeroU32::new(share);
        }
        Ok(fanout)
    }
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
        let budget = |pairs| FanoutSettings::from_lookup(&vars(pairs)).map(|f| f.post_budget);
        assert_eq!(budget(&[]).unwrap(), None);
        let share = |pairs| budget(pairs).unwrap().unwrap().get();
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
        assert!(budget(&[("POST_BUDGET_PER_SECOND", "-1")]).is_err());
    }

    #[test]
    fn the_openai_base_url_must_be_http_and_defaults_to_openai() {
        let err = OrchestratorSettings::from_lookup(|name: &str| {
            (name == "OPENAI_BASE_URL").then(|| "ftp://x".to_owned())
        })
        .unwrap_err();
        assert_eq!(err.var, "OPENAI_BASE_URL");
        let settings = OrchestratorSettings::from_lookup(|_: &str| None).unwrap();
        assert_eq!(settings.openai_base_url, DEFAULT_OPENAI_BASE_URL);
        assert_eq!(settings.bedrock_model_ids, None);
    }
}
