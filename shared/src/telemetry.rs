//! Operational metrics: what a team running the chat watches (how long people wait, how often
//! the agent fails, whether sockets are lost). Recorded through the `metrics` facade, so the
//! same calls feed CloudWatch on AWS (the embedded metric format: JSON lines in the function's
//! log, flushed after each invocation, no API call) and Prometheus on a laptop
//! (`konstruct-local`'s `/metrics`).
//!
//! Dimensions stay few and bounded: the function (set once per process), and per metric a
//! route, an outcome, an error code or a failure kind. Never a tenant, user or conversation id:
//! those belong in log lines, which carry them.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_cloudwatch_embedded::{Builder, Collector};

use crate::ErrorCode;

/// The CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "Konstruct/WebChat";

/// How a job ended on this receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Done: a reply stored and sent (or a stored one sent again), or nothing left to do (the
    /// conversation or the message is gone, or another attempt owns the reply).
    Answered,
    /// Retrying cannot help (the user was told `agent_failed`).
    Failed,
    /// A transient failure; the queue delivers it again.
    Retried,
    /// A transient failure on the last receive: the user was told, the queue dead-letters it.
    DeadLettered,
}

impl JobOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// How one post to a socket went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostOutcome {
    Delivered,
    /// The socket was gone (410): forgotten.
    Gone,
    Failed,
}

impl PostOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Gone => "gone",
            Self::Failed => "failed",
        }
    }
}

/// Everything counted or timed; each variant is one metric (see [`record`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// A user message stored and queued.
    MessageAccepted,
    /// A frame of the message route refused, by the contract's error code (`rate_limited`
    /// among them).
    MessageRefused(ErrorCode),
    Job(JobOutcome),
    /// From asking the agent to its last piece.
    AgentLatency(Duration),
    /// From asking the agent to the first chunk stored and sent: what a person waits for.
    TimeToFirstChunk(Duration),
    /// From the user message stored to the `response` posted.
    ReplyLatency(Duration),
    /// An agent call that failed: `transient` (retried) or `permanent`.
    AgentFailure {
        transient: bool,
    },
    /// Output tokens of a reply, when the provider reported them.
    OutputTokens(u32),
    Post {
        outcome: PostOutcome,
        latency: Duration,
    },
    /// A post waited for the process's share of the posting budget.
    PostBudgetWait,
    /// A process (a Lambda execution environment) started.
    ColdStart,
}

/// Records one event.
pub fn record(event: Event) {
    match event {
        Event::MessageAccepted => counter!("MessagesAccepted", "route" => "message").increment(1),
        Event::MessageRefused(code) => {
            counter!("MessagesRefused", "route" => "message", "code" => code.as_str()).increment(1);
        }
        Event::Job(outcome) => counter!("Jobs", "outcome" => outcome.label()).increment(1),
        Event::AgentLatency(d) => histogram!("AgentLatency").record(millis(d)),
        Event::TimeToFirstChunk(d) => histogram!("TimeToFirstChunk").record(millis(d)),
        Event::ReplyLatency(d) => histogram!("ReplyLatency").record(millis(d)),
        Event::AgentFailure { transient } => {
            let kind = if transient { "transient" } else { "permanent" };
            counter!("AgentFailures", "kind" => kind).increment(1);
        }
        Event::OutputTokens(n) => counter!("OutputTokens").increment(u64::from(n)),
        Event::Post { outcome, latency } => {
            counter!("Posts", "outcome" => outcome.label()).increment(1);
            histogram!("PostLatency").record(millis(latency));
        }
        Event::PostBudgetWait => counter!("PostBudgetWaits").increment(1),
        Event::ColdStart => counter!("ColdStarts").increment(1),
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Tells the recorder each metric's unit (CloudWatch shows them; Prometheus ignores them).
pub fn describe() {
    for name in [
        "MessagesAccepted",
        "MessagesRefused",
        "Jobs",
        "AgentFailures",
        "Posts",
        "ColdStarts",
    ] {
        describe_counter!(name, Unit::Count, "");
    }
    describe_counter!("OutputTokens", Unit::Count, "output tokens of replies");
    for name in [
        "AgentLatency",
        "TimeToFirstChunk",
        "ReplyLatency",
        "PostLatency",
    ] {
        describe_histogram!(name, Unit::Milliseconds, "");
    }
}

static COLLECTOR: OnceLock<&'static Collector> = OnceLock::new();

/// What a Lambda function does first: metrics go to its log in the embedded metric format,
/// each document with `function` as a dimension, and its cold start is counted. Only the first
/// call in a process installs anything.
pub fn lambda_start(function: &'static str) {
    let installed = Builder::new()
        .cloudwatch_namespace(NAMESPACE)
        .with_dimension("function", function)
        .init();
    match installed {
        Ok(collector) => {
            let _ = COLLECTOR.set(collector);
            describe();
            record(Event::ColdStart);
        }
        Err(e) => tracing::warn!(error = %e, "metrics recorder not installed"),
    }
}

/// The collector [`lambda_start`] installed.
pub fn collector() -> Option<&'static Collector> {
    COLLECTOR.get().copied()
}

/// Writes what was recorded since the last flush to stdout, where Lambda sends it to
/// CloudWatch Logs; called after each invocation. Nothing without [`lambda_start`].
pub fn flush() {
    if let Some(collector) = collector()
        && let Err(e) = collector.flush(std::io::stdout().lock())
    {
        tracing::warn!(error = %e, "metrics not written");
    }
}
