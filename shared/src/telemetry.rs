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

/// The counters [`record`] emits (a test records every [`Event`] and holds it to these lists;
/// the registry gives them to the template check).
pub const COUNTERS: &[&str] = &[
    "MessagesAccepted",
    "MessagesRefused",
    "Jobs",
    "AgentFailures",
    "OutputTokens",
    "Posts",
    "PostBudgetWaits",
    "ColdStarts",
];
/// The histograms [`record`] emits, in milliseconds.
pub const HISTOGRAMS: &[&str] = &[
    "AgentLatency",
    "TimeToFirstChunk",
    "ReplyLatency",
    "PostLatency",
];

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
    for name in COUNTERS {
        let description = if *name == "OutputTokens" {
            "output tokens of replies"
        } else {
            ""
        };
        describe_counter!(*name, Unit::Count, description);
    }
    for name in HISTOGRAMS {
        describe_histogram!(*name, Unit::Milliseconds, "");
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString};

    use super::*;

    /// Names what is registered, by kind.
    #[derive(Default)]
    struct Names(Arc<Mutex<Vec<(&'static str, String)>>>);

    impl Recorder for Names {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.0.lock().unwrap().push(("counter", key.name().into()));
            Counter::noop()
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.0.lock().unwrap().push(("gauge", key.name().into()));
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.0
                .lock()
                .unwrap()
                .push(("histogram", key.name().into()));
            Histogram::noop()
        }
    }

    #[test]
    fn every_event_is_a_listed_metric_and_every_listed_metric_is_recorded() {
        let recorder = Names::default();
        let seen = recorder.0.clone();
        let ms = Duration::from_millis(1);
        metrics::with_local_recorder(&recorder, || {
            for event in [
                Event::MessageAccepted,
                Event::MessageRefused(ErrorCode::RateLimited),
                Event::Job(JobOutcome::Answered),
                Event::AgentLatency(ms),
                Event::TimeToFirstChunk(ms),
                Event::ReplyLatency(ms),
                Event::AgentFailure { transient: true },
                Event::OutputTokens(3),
                Event::Post {
                    outcome: PostOutcome::Gone,
                    latency: ms,
                },
                Event::PostBudgetWait,
                Event::ColdStart,
            ] {
                record(event);
            }
        });
        let seen = seen.lock().unwrap();
        let mut counters: Vec<&str> = seen
            .iter()
            .filter(|(kind, _)| *kind == "counter")
            .map(|(_, name)| name.as_str())
            .collect();
        let mut histograms: Vec<&str> = seen
            .iter()
            .filter(|(kind, _)| *kind == "histogram")
            .map(|(_, name)| name.as_str())
            .collect();
        assert_eq!(seen.len(), counters.len() + histograms.len(), "{seen:?}");
        counters.sort_unstable();
        counters.dedup();
        histograms.sort_unstable();
        histograms.dedup();
        let mut listed_counters = COUNTERS.to_vec();
        listed_counters.sort_unstable();
        let mut listed_histograms = HISTOGRAMS.to_vec();
        listed_histograms.sort_unstable();
        assert_eq!(counters, listed_counters);
        assert_eq!(histograms, listed_histograms);
    }
}
