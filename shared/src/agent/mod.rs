//! Agents: what turns a conversation into a reply. The provider is chosen per agent row
//! (`agents.provider`); each provider says whether a failure is worth retrying.

mod bedrock;
mod echo;
mod openai;

use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use tokio::sync::mpsc;

pub use bedrock::Bedrock;
pub use echo::Echo;
pub use openai::OpenAi;

use crate::config::{ConfigError, positive};
use crate::db::agents::{Agent, Provider as ProviderKind};
use crate::db::messages::MessageRole;

/// One message of the conversation as context: the last one is the user message to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: MessageRole,
    pub content: String,
}

/// What a provider is asked.
#[derive(Debug, Clone, Copy)]
pub struct AgentRequest<'a> {
    pub agent: &'a Agent,
    pub history: &'a [Turn],
}

impl AgentRequest<'_> {
    /// The text being answered.
    pub fn question(&self) -> &str {
        self.history
            .last()
            .map(|t| t.content.as_str())
            .unwrap_or("")
    }
}

/// A provider's failure; `retryable` when trying again may succeed (timeouts, 429, 5xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub retryable: bool,
    pub message: String,
}

impl AgentError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }
}

/// Where a streaming provider sends each piece of its reply as it arrives.
pub type Deltas = mpsc::UnboundedSender<String>;

#[async_trait]
pub trait Provider: Send + Sync {
    /// The whole reply. A provider that streams also sends each piece to `deltas`; it must not
    /// report a retryable error once it has sent one, since a retry would repeat the pieces.
    async fn reply(
        &self,
        request: &AgentRequest<'_>,
        deltas: &Deltas,
    ) -> Result<String, AgentError>;
}

/// How long and how often an agent is tried within one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempt_timeout: Duration,
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
    /// `AGENT_TIMEOUT_SECONDS` and `AGENT_MAX_ATTEMPTS`, each optional.
    pub fn from_lookup(lookup: impl crate::config::Lookup) -> Result<Self, ConfigError> {
        let mut policy = Self::default();
        if let Some(seconds) = positive(&lookup, "AGENT_TIMEOUT_SECONDS")? {
            policy.attempt_timeout = Duration::from_secs(seconds);
        }
        if let Some(attempts) = positive(&lookup, "AGENT_MAX_ATTEMPTS")? {
            policy.max_attempts = usize::try_from(attempts).unwrap_or(usize::MAX);
        }
        Ok(policy)
    }

    /// Runs the provider: each attempt bounded by the timeout, retryable failures tried again
    /// with exponential backoff and jitter.
    pub async fn run(
        &self,
        provider: &dyn Provider,
        request: &AgentRequest<'_>,
        deltas: &Deltas,
    ) -> Result<String, AgentError> {
        let attempt = || async {
            tokio::time::timeout(self.attempt_timeout, provider.reply(request, deltas))
                .await
                .unwrap_or_else(|_| {
                    Err(AgentError::retryable(format!(
                        "no reply within {} s",
                        self.attempt_timeout.as_secs_f32()
                    )))
                })
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(self.min_backoff)
                    .with_max_delay(self.max_backoff)
                    .with_max_times(self.max_attempts.saturating_sub(1))
                    .with_jitter(),
            )
            .when(|e: &AgentError| e.retryable)
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "agent failed; retrying"))
            .await
    }
}

/// Every provider, built once per process; an agent row picks one.
pub struct Agents {
    pub echo: Echo,
    pub openai: OpenAi,
    pub bedrock: Bedrock,
}

impl Agents {
    pub fn provider(&self, agent: &Agent) -> &dyn Provider {
        match agent.provider {
            ProviderKind::Echo => &self.echo,
            ProviderKind::Openai => &self.openai,
            ProviderKind::Bedrock => &self.bedrock,
        }
    }
}
