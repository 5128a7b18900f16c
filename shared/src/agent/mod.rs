//! Agents: what turns a conversation into a reply. The provider is chosen per agent row
//! (`agents.provider`); each provider says whether a failure is worth retrying.

mod bedrock;
mod echo;
mod openai;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use bedrock::Bedrock;
pub use echo::Echo;
pub use openai::OpenAi;

use crate::config::orchestrator::{OutputLimits, RetryPolicy};
use crate::db::agents::{Agent, Provider};
use crate::db::messages::{MessageRole, StopReason, Usage};

/// One message of the conversation as context: the last one is the user message to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: MessageRole,
    pub content: String,
    /// A user message the conversation's owner did not write (a platform admin did): carried
    /// as data, so that no text the owner types can pass for it (OpenAI: the message's
    /// `name`; Bedrock's Converse has no such field: a content block of its own says it).
    pub by_someone_else: bool,
}

/// The `name` an OpenAI-compatible user message written by a platform admin carries.
pub const ADMIN_NAME: &str = "platform_admin";

/// The content block that precedes a platform admin's words in a Bedrock message.
pub const ADMIN_MARK: &str = "[written by a platform administrator, not the conversation's owner]";

/// What a provider is asked.
#[derive(Debug, Clone, Copy)]
pub struct AgentRequest<'a> {
    pub agent: &'a Agent,
    pub history: &'a [Turn],
    /// The model's output limit (`max_tokens`), already resolved by [`OutputLimits`].
    pub max_tokens: u32,
    /// The reply is cut at this many bytes (on a character boundary), ending with
    /// [`StopReason::Length`].
    pub max_reply_bytes: usize,
}

/// A provider's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReply {
    pub text: String,
    pub stop: StopReason,
    pub usage: Option<Usage>,
}

impl AgentReply {
    /// A reply that ended as the model meant it to, unless it is over `max_bytes`: then it is
    /// cut there and ends with [`StopReason::Length`].
    pub fn capped(mut text: String, stop: StopReason, max_bytes: usize) -> Self {
        let stop = if cap(&mut text, max_bytes) {
            StopReason::Length
        } else {
            stop
        };
        Self {
            text,
            stop,
            usage: None,
        }
    }
}

/// Cuts `text` to at most `max_bytes` on a character boundary; says whether it cut.
pub fn cap(text: &mut String, max_bytes: usize) -> bool {
    if text.len() <= max_bytes {
        return false;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

impl OutputLimits {
    /// The agent's `max_tokens` (or `max_completion_tokens`) setting, at most the deployment's
    /// maximum; the deployment's default when the agent sets none.
    pub fn max_tokens_for(&self, agent: &Agent) -> u32 {
        ["max_tokens", "max_completion_tokens"]
            .iter()
            .find_map(|key| agent.settings.get(*key)?.as_u64())
            .filter(|&n| n > 0)
            .map_or(self.default_max_tokens, |n| {
                u32::try_from(n).unwrap_or(u32::MAX).min(self.max_tokens)
            })
    }
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

/// Where a streaming provider sends each piece of its reply as it arrives. It remembers whether
/// any piece went out: a failure after that is not retried, since a retry would repeat them.
#[derive(Debug)]
pub struct Deltas {
    pieces: mpsc::UnboundedSender<String>,
    sent: std::sync::atomic::AtomicBool,
}

impl Deltas {
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (pieces, received) = mpsc::unbounded_channel();
        let deltas = Self {
            pieces,
            sent: std::sync::atomic::AtomicBool::new(false),
        };
        (deltas, received)
    }

    /// Sends a piece on; the receiver going away (the job abandoned) is not the provider's
    /// concern.
    pub fn send(&self, piece: String) {
        self.sent.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.pieces.send(piece);
    }

    pub fn any_sent(&self) -> bool {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A client of one model provider (echo, OpenAI-compatible, Bedrock); the agent row's
/// [`Provider`] picks which.
#[async_trait]
pub trait ModelClient: Send + Sync {
    /// The whole reply, at most `request.max_reply_bytes` long. A provider that streams also
    /// sends each piece to `deltas`; it must not report a retryable error once it has sent
    /// one, since a retry would repeat the pieces.
    async fn reply(
        &self,
        request: &AgentRequest<'_>,
        deltas: &Deltas,
    ) -> Result<AgentReply, AgentError>;
}

/// Running the policy the deployment set.
impl RetryPolicy {
    /// Asks the model: each attempt bounded by the timeout and by `deadline` (when the job
    /// must be done), retryable failures tried again with exponential backoff and jitter while
    /// time is left.
    pub async fn run(
        &self,
        client: &dyn ModelClient,
        request: &AgentRequest<'_>,
        deltas: &Deltas,
        deadline: Option<Instant>,
    ) -> Result<AgentReply, AgentError> {
        let left = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let attempt = || async {
            let limit = left().map_or(self.attempt_timeout, |l| l.min(self.attempt_timeout));
            if limit.is_zero() {
                return Err(AgentError::retryable("no time left for the agent"));
            }
            tokio::time::timeout(limit, client.reply(request, deltas))
                .await
                .unwrap_or_else(|_| {
                    Err(AgentError::retryable(format!(
                        "no reply within {} s",
                        limit.as_secs_f32()
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
            .when(|e: &AgentError| {
                e.retryable && !deltas.any_sent() && left().is_none_or(|l| l > self.min_backoff)
            })
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "agent failed; retrying"))
            .await
    }
}

/// A client of every provider, built once per process; an agent row picks one.
pub struct Agents {
    pub echo: Echo,
    pub openai: OpenAi,
    pub bedrock: Bedrock,
}

impl Agents {
    pub fn client(&self, agent: &Agent) -> &dyn ModelClient {
        match agent.provider {
            Provider::Echo => &self.echo,
            Provider::Openai => &self.openai,
            Provider::Bedrock => &self.bedrock,
        }
    }
}
