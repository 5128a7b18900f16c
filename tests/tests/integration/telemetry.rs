//! Operations: each event's metric in CloudWatch's embedded metric format (the JSON asserted,
//! not just that something was written), a real message path recording its metrics, the same
//! metrics in Prometheus' format from `konstruct-local`, and logs that carry no token, no message
//! text and no colour codes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use shared::ErrorCode;
use shared::db::agents::Provider;
use shared::domain::Role;
use shared::telemetry::{self, Event, JobOutcome, NAMESPACE, PostOutcome};

use crate::helpers::harness::Harness;
use crate::helpers::llm::FakeLlm;
use crate::helpers::local::{Env, Local, authenticated, converse, expect, open, send};
use crate::helpers::orchestrator::{conversation_with, orchestrator, records_for, run};
use crate::helpers::{Captured, TestDb, eventually, seed, token};

/// One metric as CloudWatch would extract it from a document.
#[derive(Debug, Clone, PartialEq)]
struct Metric {
    unit: String,
    /// Dimension name → value.
    dimensions: BTreeMap<String, String>,
    values: Vec<f64>,
}

/// The metrics of embedded-metric-format documents, one JSON document per line, by name.
fn extracted(text: &str) -> BTreeMap<String, Vec<Metric>> {
    let mut found: BTreeMap<String, Vec<Metric>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let doc: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], NAMESPACE, "{line}");
        assert!(doc["_aws"]["Timestamp"].is_u64(), "{line}");
        let names: Vec<String> = directive["Dimensions"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_owned())
            .collect();
        let dimensions: BTreeMap<String, String> = names
            .iter()
            .map(|n| (n.clone(), doc[n].as_str().unwrap_or_default().to_owned()))
            .collect();
        for metric in directive["Metrics"].as_array().unwrap() {
            let name = metric["Name"].as_str().unwrap().to_owned();
            let values = match &doc[&name] {
                Value::Array(values) => values.iter().map(|v| v.as_f64().unwrap()).collect(),
                value => vec![value.as_f64().unwrap_or_else(|| panic!("{name}: {line}"))],
            };
            found.entry(name).or_default().push(Metric {
                unit: metric["Unit"].as_str().unwrap_or_default().to_owned(),
                dimensions: dimensions.clone(),
                values,
            });
        }
    }
    found
}

fn dims(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The embedded-metric-format recorder, installed once per process as a function installs it
/// (nextest runs each test in a process of its own; under `cargo test` other tests' metrics
/// may join these, so the assertions look for what is expected among what was written).
fn emf() -> &'static metrics_cloudwatch_embedded::Collector {
    telemetry::lambda_start("ws-message");
    telemetry::collector().expect("the recorder is installed")
}

#[test]
fn each_event_becomes_its_metric_in_the_embedded_metric_format() {
    let collector = emf();
    {
        for event in [
            Event::MessageAccepted,
            Event::MessageRefused(ErrorCode::RateLimited),
            Event::Job(JobOutcome::DeadLettered),
            Event::AgentLatency(Duration::from_millis(250)),
            Event::TimeToFirstChunk(Duration::from_millis(40)),
            Event::ReplyLatency(Duration::from_millis(900)),
            Event::AgentFailure { transient: true },
            Event::OutputTokens(42),
            Event::Post {
                outcome: PostOutcome::Gone,
                latency: Duration::from_millis(12),
            },
        ] {
            telemetry::record(event);
        }
    }
    let mut written = Vec::new();
    collector.flush(&mut written).unwrap();
    let text = String::from_utf8(written).unwrap();
    let found = extracted(&text);

    let expect = |name: &str, unit: &str, extra: &[(&str, &str)], values: &[f64]| {
        let mut dimensions = dims(&[("function", "ws-message")]);
        dimensions.extend(dims(extra));
        let metrics = found
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
        assert!(
            metrics.iter().any(|m| m.unit == unit
                && m.dimensions == dimensions
                && values.iter().all(|v| m.values.contains(v))),
            "{name} {unit} {dimensions:?} {values:?} not in {metrics:?}"
        );
    };
    expect("MessagesAccepted", "Count", &[("route", "message")], &[1.0]);
    expect(
        "MessagesRefused",
        "Count",
        &[("route", "message"), ("code", "rate_limited")],
        &[1.0],
    );
    expect("Jobs", "Count", &[("outcome", "dead_lettered")], &[1.0]);
    expect("AgentLatency", "Milliseconds", &[], &[250.0]);
    expect("TimeToFirstChunk", "Milliseconds", &[], &[40.0]);
    expect("ReplyLatency", "Milliseconds", &[], &[900.0]);
    expect("AgentFailures", "Count", &[("kind", "transient")], &[1.0]);
    expect("OutputTokens", "Count", &[], &[42.0]);
    expect("Posts", "Count", &[("outcome", "gone")], &[1.0]);
    expect("PostLatency", "Milliseconds", &[], &[12.0]);
    // Counted once by `lambda_start`.
    expect("ColdStarts", "Count", &[], &[1.0]);
    // Low cardinality: no id is ever a dimension.
    for metric in found.values().flatten() {
        for name in metric.dimensions.keys() {
            assert!(
                ["function", "route", "code", "outcome", "kind"].contains(&name.as_str()),
                "{name} is not a dimension"
            );
        }
    }
}

/// A message through the route and the orchestrator records what a team watches.
#[tokio::test]
async fn a_message_path_records_its_metrics() {
    let collector = emf();
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let refused = h
        .send("tab", &json!({ "type": "message", "text": "" }).to_string())
        .await;
    assert_eq!(refused["code"], "bad_request");
    let records = records_for(&h, "tab", &["hello"]).await;
    assert!(run(&state, records).await.is_empty());

    let mut written = Vec::new();
    collector.flush(&mut written).unwrap();
    let text = String::from_utf8(written).unwrap();
    let found = extracted(&text);
    for name in [
        "MessagesAccepted",
        "MessagesRefused",
        "Jobs",
        "AgentLatency",
        "TimeToFirstChunk",
        "ReplyLatency",
        "Posts",
        "PostLatency",
    ] {
        assert!(found.contains_key(name), "{name} missing from:\n{text}");
    }
    assert!(
        found["Jobs"]
            .iter()
            .any(|m| m.dimensions["outcome"] == "answered")
    );
    assert!(
        found["MessagesRefused"]
            .iter()
            .any(|m| m.dimensions["code"] == "bad_request")
    );
    assert!(
        found["Posts"]
            .iter()
            .all(|m| m.dimensions["outcome"] == "delivered"),
        "{text}"
    );
}

/// `konstruct-local` serves the same metrics in Prometheus' text format; its log, written to a
/// pipe, has no colour codes; and at the default level a whole message path (auth, message,
/// reply, history) logs neither the token nor the message's text.
#[tokio::test]
async fn konstruct_local_serves_prometheus_metrics_and_logs_no_secret_no_text_no_colour() {
    let (test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let server = Local::start_with(
        &Env::new(&test),
        &["serve"],
        // The default filter of `konstruct-local`, which the test stack otherwise narrows.
        &[("RUST_LOG", "info,sqlx=warn")],
    )
    .await;
    let secret_text = "my-account-number-is-99887766";
    let bearer = token(s.user, Role::CustomerOperator);
    let mut socket = authenticated(&server.address, &s, s.conversation).await;
    let response = converse(&mut socket, secret_text).await;
    assert!(response["text"].as_str().unwrap().contains(secret_text));
    let history = reqwest::Client::new()
        .get(format!(
            "http://{}/api/portal/chat/conversations/{}/messages",
            server.address, s.conversation
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), 200);
    // A refused auth is logged at the default level: the log is not empty.
    let mut refused = open(&server.address, s.conversation).await;
    send(
        &mut refused,
        json!({ "type": "auth", "token": "not.a.token" }),
    )
    .await;
    expect(&mut refused, "error").await;

    let metrics = reqwest::get(format!("http://{}/metrics", server.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "MessagesAccepted{route=\"message\"} 1",
        "Jobs{outcome=\"answered\"} 1",
        "ReplyLatency",
        "AgentLatency",
        "Posts{outcome=\"delivered\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    eventually("the refused auth in the log", || async {
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("auth refused"))
    })
    .await;
    let log = server.log.lock().unwrap().join("\n");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log:\n{log}"
    );
    assert!(!log.contains(&bearer), "the token is logged:\n{log}");
    assert!(
        !log.contains(secret_text),
        "the message text is logged:\n{log}"
    );
    server.stop().await;
}

/// One message followed across the route and the orchestrator: the route's X-Ray trace header
/// travels in the SQS message's `AWSTraceHeader` attribute (as Lambda's runtime gives it, in
/// `_X_AMZN_TRACE_ID`), and the log lines of both carry the message's ids and that trace.
#[tokio::test]
async fn a_messages_trace_and_ids_follow_it_through_the_queue_into_the_orchestrator() {
    let header = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
    // SAFETY: nextest runs this test in a process of its own; nothing else reads the
    // environment meanwhile.
    unsafe { std::env::set_var(shared::queue::TRACE_ENV, header) };
    let h = Harness::new().await;
    let llm = FakeLlm::hello().await;
    let state = orchestrator(&h, &llm);
    let conversation = conversation_with(&h, Provider::Openai, "gpt-test").await;
    h.open_session_on("tab", conversation).await;
    let (logs, _guard) = Captured::start();
    let records = records_for(&h, "tab", &["hello"]).await;
    unsafe { std::env::remove_var(shared::queue::TRACE_ENV) };
    assert_eq!(
        records[0]
            .attributes
            .get(shared::queue::TRACE_ATTRIBUTE)
            .map(String::as_str),
        Some(header),
        "the trace header travels with the job"
    );
    let job: shared::job::Job = serde_json::from_str(records[0].body.as_deref().unwrap()).unwrap();
    assert!(run(&state, records).await.is_empty());

    let accepted = logs.lines_with("message accepted");
    assert_eq!(accepted.len(), 1, "{}", logs.text());
    for (name, value) in [
        ("connection_id", "tab".to_owned()),
        ("conversation_id", conversation.to_string()),
        ("message_id", job.message_id.to_string()),
    ] {
        assert!(
            has_field(&accepted[0], name, &value),
            "{name} in {}",
            accepted[0]
        );
    }
    let finished = logs.lines_with("job finished");
    assert_eq!(finished.len(), 1, "{}", logs.text());
    for (name, value) in [
        ("conversation_id", conversation.to_string()),
        ("message_id", job.message_id.to_string()),
        ("trace", header.to_owned()),
    ] {
        assert!(
            has_field(&finished[0], name, &value),
            "{name} in {}",
            finished[0]
        );
    }
}

/// Whether a formatted log line carries `name` with `value` (quoted or not).
fn has_field(line: &str, name: &str, value: &str) -> bool {
    line.contains(&format!("{name}={value}")) || line.contains(&format!("{name}=\"{value}\""))
}
