//! Driving the orchestrator: its state against the fake model servers and the harness's
//! management API, user messages turned into queued jobs and SQS records, and what it stored.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::sqs::{SqsEvent, SqsMessage};
use serde_json::{Value, json};
use shared::agent::{Agents, Bedrock, Echo, OpenAi};
use shared::config::orchestrator::{OrchestratorSettings, OutputLimits, RetryPolicy};
use shared::db::Scope;
use shared::db::agents::Provider;
use shared::db::messages::{self, MessageRole, MessageStatus, PageFrom};
use shared::delivery::{ConnectionsFanout, ManagementApi};
use shared::domain::{ConversationId, PageLimit};
use shared::job::Job;
use shared::orchestrator::{ContextLimits, OrchestratorState, handle};

use crate::helpers::aws::{Queued, drain, sdk_config};
use crate::helpers::harness::Harness;
use crate::helpers::llm::FakeLlm;
use crate::helpers::{eventually, seed_agent_with};

/// Every provider, talking to the fake model server.
pub fn agents(llm: &FakeLlm) -> Agents {
    let bedrock = aws_sdk_bedrockruntime::Client::from_conf(
        aws_sdk_bedrockruntime::config::Builder::from(&sdk_config())
            .endpoint_url(&llm.endpoint)
            .build(),
    );
    Agents {
        echo: Echo,
        openai: OpenAi::new(&llm.base_url, Some("sk-test".into())),
        bedrock: Bedrock::new(bedrock),
    }
}

pub fn orchestrator(h: &Harness, llm: &FakeLlm) -> OrchestratorState {
    OrchestratorState {
        db: h.db.clone(),
        fanout: Arc::new(ConnectionsFanout::new(
            h.db.clone(),
            Arc::new(ManagementApi::new(sdk_config())),
        )),
        agents: Arc::new(agents(llm)),
        retry: RetryPolicy {
            attempt_timeout: Duration::from_secs(2),
            max_attempts: 3,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        context: ContextLimits::default(),
        output: OutputLimits::default(),
        max_receives: OrchestratorSettings::default().max_receives,
        job_budget: OrchestratorSettings::default().job_budget,
        redrive: None,
    }
}

/// The seeded user's conversation with the tenant's agent of this provider and model (one
/// agent per provider and model: the seeder finds agents by name).
pub async fn conversation_with(h: &Harness, provider: Provider, model: &str) -> ConversationId {
    let name = format!("{provider:?} {model}");
    let agent = seed_agent_with(&h.db, h.seed.tenant, &name, provider, model).await;
    crate::helpers::conversation_for(&h.db, h.seed.tenant, agent, h.seed.user).await
}

/// The jobs the message route queued for these messages, as the orchestrator receives them.
pub async fn queued_jobs(h: &Harness, connection: &str, texts: &[&str]) -> Vec<Job> {
    jobs_from(h, connection, texts)
        .await
        .into_iter()
        .map(|q| serde_json::from_value(q.body).unwrap())
        .collect()
}

/// The SQS records the route queued for these messages.
pub async fn records_for(h: &Harness, connection: &str, texts: &[&str]) -> Vec<SqsMessage> {
    jobs_from(h, connection, texts)
        .await
        .iter()
        .map(Queued::record)
        .collect()
}

/// Another OpenAI-backed conversation of the seeded user, with an agent of this name.
pub async fn conversation_with_named(h: &Harness, name: &str) -> ConversationId {
    let agent = seed_agent_with(&h.db, h.seed.tenant, name, Provider::Openai, "gpt-test").await;
    crate::helpers::conversation_for(&h.db, h.seed.tenant, agent, h.seed.user).await
}

/// Sends user messages on a socket and returns the jobs the route queued, in order.
pub async fn jobs_from(h: &Harness, connection: &str, texts: &[&str]) -> Vec<Queued> {
    for text in texts {
        let ack = h
            .send(
                connection,
                &json!({ "type": "message", "text": text }).to_string(),
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    drain(&h.queue).await
}

fn batch(records: Vec<SqsMessage>) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = records;
    event
}

/// The record as SQS hands it over on its `n`th receive.
pub fn on_receive(mut record: SqsMessage, n: u32) -> SqsMessage {
    record
        .attributes
        .insert("ApproximateReceiveCount".into(), n.to_string());
    record
}

pub async fn run(state: &OrchestratorState, records: Vec<SqsMessage>) -> Vec<String> {
    handle(state, batch(records), None)
        .await
        .response()
        .batch_item_failures
        .into_iter()
        .map(|f| f.item_identifier)
        .collect()
}

/// Every message of the conversation, oldest first.
pub async fn stored(h: &Harness, conversation: ConversationId) -> Vec<messages::Message> {
    let mut tx = h.db.begin(Scope::Tenant(h.seed.tenant)).await.unwrap();
    messages::page(
        &mut tx,
        conversation,
        messages::Branch::All,
        PageFrom::Newest,
        PageLimit::new(200).unwrap(),
    )
    .await
    .unwrap()
    .into_iter()
    .map(|item| item.message)
    .collect()
}

/// The conversation's replies that have ended, oldest first.
pub async fn replies(h: &Harness, conversation: ConversationId) -> Vec<messages::Message> {
    stored(h, conversation)
        .await
        .into_iter()
        .filter(|m| m.role == MessageRole::Assistant && m.status != MessageStatus::Streaming)
        .collect()
}

/// The conversation's reply once it streams with some text stored: what a test that acts in
/// the middle of a stream waits for (the model's next pieces are still to come).
pub async fn streaming_reply(h: &Harness, conversation: ConversationId) -> messages::Message {
    eventually("a reply streaming with text", || async {
        stored(h, conversation).await.into_iter().find(|m| {
            m.role == MessageRole::Assistant
                && m.status == MessageStatus::Streaming
                && !m.content.is_empty()
        })
    })
    .await
}

pub fn of_type<'a>(frames: &'a [Value], kind: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == kind).collect()
}
