//! The orchestrator's settings, plain data read once at start: how long and how often an agent
//! is tried, output limits, the providers' endpoints and allowed models, the fan-out to sockets,
//! and a job's limits. `OrchestratorState::load` builds the components from them.

use std::num::NonZeroU32;
use std::time::Duration;

use super::{ConfigError, Lookup, defaulted, http_url, positive, raw, set};

/// Everything the orchestrator reads besides the database, the mode and its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchestratorSettings {
    pub retry: RetryPolicy,
    pub output: OutputLimits,
    pub fanout: FanoutSettings,
    /// `OPENAI_BASE_URL`: an OpenAI-compatible API.
    pub openai_base_url: String,
    /// `BEDROCK_MODEL_IDS`: the model ids that may be invoked (set but blank: none; unset:
    /// `None`, any).
    pub bedrock_model_ids: Option<Vec<String>>,
    /// `MAX_RECEIVE_COUNT`: receives of a job before the queue gives up on it
    /// (SQS's `maxReceiveCount`); the user is told of a transient failure only on the last.
    pub max_receives: u32,
    /// `JOB_BUDGET_SECONDS`: the time a job may need; none starts with less left
    /// before the invocation's deadline.
    pub job_budget: Duration,
    /// `DEAD_LETTER_QUEUE_URL`: aws mode, where a job that will not be tried again goes.
    pub dead_letter_url: Option<String>,
}

impl OrchestratorSettings {
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            retry: RetryPolicy::from_lookup(&lookup)?,
            output: OutputLimits::from_lookup(&lookup)?,
            fanout: FanoutSettings::from_lookup(&lookup)?,
            openai_base_url: http_url(&lookup, "OPENAI_BASE_URL")?
                .ok_or_else(|| ConfigError::new("OPENAI_BASE_URL", "has no default"))?,
            // Set but blank allows none: the value as set, not `optional`'s.
            bedrock_model_ids: raw(&lookup, "BEDROCK_MODEL_IDS").map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            max_receives: u32::try_from(defaulted(&lookup, "MAX_RECEIVE_COUNT")?)
                .unwrap_or(u32::MAX),
            job_budget: Duration::from_secs(defaulted(&lookup, "JOB_BUDGET_SECONDS")?),
            dead_letter_url: http_url(&lookup, "DEAD_LETTER_QUEUE_URL")?,
        })
    }
}

/// The table's defaults.
impl Default for OrchestratorSettings {
    fn default() -> Self {
        Self::from_lookup(|_: &str| None).expect("the variables table's defaults read")
    }
}

/// How long and how often an agent is tried within one job (the agent runs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `AGENT_TIMEOUT_SECONDS`: one attempt's limit.
    pub attempt_timeout: Duration,
    /// `AGENT_MAX_ATTEMPTS`: attempts of a retryable failure.
    pub max_attempts: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// The table's defaults.
impl Default for RetryPolicy {
    fn default() -> Self {
        Self::from_lookup(&|_: &str| None).expect("the variables table's defaults read")
    }
}

impl RetryPolicy {
    /// The pause after a first failed attempt, doubling up to [`RetryPolicy::MAX_BACKOFF`].
    pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(4);

    fn from_lookup(lookup: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            attempt_timeout: Duration::from_secs(defaulted(lookup, "AGENT_TIMEOUT_SECONDS")?),
            max_attempts: usize::try_from(defaulted(lookup, "AGENT_MAX_ATTEMPTS")?)
                .unwrap_or(usize::MAX),
            min_backoff: Self::MIN_BACKOFF,
            max_backoff: Self::MAX_BACKOFF,
        })
    }
}

/// Bounds on what one reply may cost: the model's output tokens (a deployment default, an
/// agent's own `max_tokens` setting up to a deployment maximum) and the stored reply's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// `AGENT_DEFAULT_MAX_TOKENS` (at most `max_tokens`).
    pub default_max_tokens: u32,
    /// `AGENT_MAX_TOKENS`.
    pub max_tokens: u32,
    /// `REPLY_MAX_BYTES`.
    pub max_reply_bytes: usize,
}

/// The table's defaults.
impl Default for OutputLimits {
    fn default() -> Self {
        Self::from_lookup(&|_: &str| None).expect("the variables table's defaults read")
    }
}

impl OutputLimits {
    fn from_lookup(lookup: &impl Lookup) -> Result<Self, ConfigError> {
        let tokens = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let max_tokens = tokens(defaulted(lookup, "AGENT_MAX_TOKENS")?);
        let default_max_tokens = tokens(defaulted(lookup, "AGENT_DEFAULT_MAX_TOKENS")?);
        // Set above the maximum is refused; the table's default above a lower maximum that is
        // set is lowered to it.
        if set(lookup, "AGENT_DEFAULT_MAX_TOKENS").is_some() && default_max_tokens > max_tokens {
            return Err(ConfigError::new(
                "AGENT_DEFAULT_MAX_TOKENS",
                format!("must not exceed AGENT_MAX_TOKENS ({max_tokens})"),
            ));
        }
        Ok(Self {
            default_max_tokens: default_max_tokens.min(max_tokens),
            max_tokens,
            max_reply_bytes: usize::try_from(defaulted(lookup, "REPLY_MAX_BYTES")?)
                .unwrap_or(usize::MAX),
        })
    }
}

/// How frames reach the sockets of a conversation through the connection-management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutSettings {
    /// `FANOUT_CONCURRENCY`: posts in flight for one frame.
    pub concurrency: usize,
    /// `POST_TIMEOUT_MS`: one post's limit.
    pub post_timeout: Duration,
    /// `POST_BUDGET_PER_SECOND` shared evenly by `POST_BUDGET_SHARES` processes: this
    /// process's posts a second, at least one; `None` when no budget is set.
    pub post_budget: Option<NonZeroU32>,
}

/// The table's defaults.
impl Default for FanoutSettings {
    fn default() -> Self {
        Self::from_lookup(&|_: &str| None).expect("the variables table's defaults read")
    }
}

impl FanoutSettings {
    pub fn from_lookup(lookup: &impl Lookup) -> Result<Self, ConfigError> {
        let post_budget = match positive(lookup, "POST_BUDGET_PER_SECOND")? {
            Some(budget) => {
                let shares = defaulted(lookup, "POST_BUDGET_SHARES")?;
                NonZeroU32::new(u32::try_from((budget / shares).max(1)).unwrap_or(u32::MAX))
            }
            None => None,
        };
        Ok(Self {
            concurrency: usize::try_from(defaulted(lookup, "FANOUT_CONCURRENCY")?)
                .unwrap_or(usize::MAX),
            post_timeout: Duration::from_millis(defaulted(lookup, "POST_TIMEOUT_MS")?),
            post_budget,
        })
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
        assert_eq!(settings.openai_base_url, "https://api.openai.com/v1");
        assert_eq!(settings.bedrock_model_ids, None);
    }
}
