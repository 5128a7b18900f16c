//! `openai`: any OpenAI-compatible `/chat/completions` endpoint (OpenAI, Ollama, vLLM, LiteLLM),
//! streamed over server-sent events.

use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{AgentError, AgentReply, AgentRequest, Deltas, ModelClient, cap};
use crate::db::messages::{MessageRole, StopReason, Usage};
use crate::secrets::Secret;

/// Request fields an agent's `settings` may set; the rest of the body is the provider's (the
/// output limit is set from [`crate::config::orchestrator::OutputLimits`]).
const SETTINGS: [&str; 4] = [
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
];

pub struct OpenAi {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<Secret>,
}

impl OpenAi {
    pub fn new(base_url: &str, api_key: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("the HTTP client builds with its default TLS");
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.map(|key| Secret::fixed("OPENAI_API_KEY", key)),
        }
    }

    /// A client of `base_url` with its key as [`crate::config::load_secret`] read it.
    pub fn with_key(base_url: &str, api_key: Option<Secret>) -> Self {
        let mut openai = Self::new(base_url, None);
        openai.api_key = api_key;
        openai
    }

    fn body(request: &AgentRequest<'_>) -> Value {
        let agent = request.agent;
        let mut messages = Vec::new();
        if !agent.system_prompt.trim().is_empty() {
            messages.push(json!({ "role": "system", "content": agent.system_prompt }));
        }
        for turn in request.history {
            let role = match turn.role {
                MessageRole::User => "user",
                MessageRole::Assistant => "assistant",
            };
            let mut message = json!({ "role": role, "content": turn.content });
            if turn.by_someone_else {
                message["name"] = json!(super::ADMIN_NAME);
            }
            messages.push(message);
        }
        let mut body = Map::new();
        body.insert("model".into(), json!(agent.model));
        body.insert("messages".into(), Value::Array(messages));
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({ "include_usage": true }));
        // Newer OpenAI models take only `max_completion_tokens`; an agent that names it gets it.
        let limit_key = if agent.settings.get("max_completion_tokens").is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        body.insert(limit_key.into(), json!(request.max_tokens));
        if let Some(settings) = agent.settings.as_object() {
            for key in SETTINGS {
                if let Some(value) = settings.get(key) {
                    body.insert(key.into(), value.clone());
                }
            }
        }
        Value::Object(body)
    }
}

#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    error: Option<Value>,
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    message: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

impl From<OpenAiUsage> for Usage {
    fn from(u: OpenAiUsage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
        }
    }
}

fn stop_reason(finish_reason: Option<&str>) -> StopReason {
    match finish_reason {
        Some("length") => StopReason::Length,
        _ => StopReason::End,
    }
}

/// The most bytes a non-streamed completion may have for a reply of `max_reply_bytes`: JSON
/// escapes a character in at most six bytes, plus room for the envelope.
fn max_body_bytes(max_reply_bytes: usize) -> usize {
    max_reply_bytes.saturating_mul(6).saturating_add(64 * 1024)
}

/// The body of a non-streamed answer, refused past `limit` bytes without reading further.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, AgentError> {
    let mut body = Vec::new();
    while let Some(piece) = response
        .chunk()
        .await
        .map_err(|e| AgentError::retryable(format!("completion unreadable: {e}")))?
    {
        if body.len() + piece.len() > limit {
            return Err(AgentError::permanent(format!(
                "the completion is over {limit} bytes"
            )));
        }
        body.extend_from_slice(&piece);
    }
    Ok(body)
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

fn by_status(status: StatusCode, detail: &str) -> AgentError {
    let message = format!("agent endpoint answered {status}: {detail}");
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        AgentError::retryable(message)
    } else {
        AgentError::permanent(message)
    }
}

#[async_trait]
impl ModelClient for OpenAi {
    async fn reply(
        &self,
        request: &AgentRequest<'_>,
        deltas: &Deltas,
    ) -> Result<AgentReply, AgentError> {
        if request.agent.model.trim().is_empty() {
            return Err(AgentError::permanent("the agent has no model configured"));
        }
        let mut call = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .json(&Self::body(request));
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.current().expose_secret());
        }
        let response = call
            .send()
            .await
            .map_err(|e| AgentError::retryable(format!("agent endpoint unreachable: {e}")))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED
            && let Some(key) = &self.api_key
            && key.refresh().await
        {
            // A rotated key: the next attempt uses the new one.
            return Err(AgentError::retryable(
                "the model endpoint refused the old API key",
            ));
        }
        if !status.is_success() {
            let detail = response.text().await.unwrap_or_default();
            return Err(by_status(
                status,
                detail.chars().take(300).collect::<String>().trim(),
            ));
        }
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let max_bytes = request.max_reply_bytes;
        if !streamed {
            // A server that ignores `stream` answers with one completion.
            let body = read_limited(response, max_body_bytes(max_bytes)).await?;
            let whole: StreamChunk = serde_json::from_slice(&body)
                .map_err(|e| AgentError::retryable(format!("unreadable completion: {e}")))?;
            let usage = whole.usage.map(Usage::from);
            let (text, finish) = whole
                .choices
                .into_iter()
                .find_map(|c| Some((c.message?.content?, c.finish_reason)))
                .filter(|(text, _)| !text.is_empty())
                .ok_or_else(|| AgentError::permanent("the agent returned an empty reply"))?;
            let mut reply = AgentReply::capped(text, stop_reason(finish.as_deref()), max_bytes);
            reply.usage = usage;
            return Ok(reply);
        }

        let mut reply = String::new();
        let mut stop = StopReason::End;
        let mut usage = None;
        let mut events = response.bytes_stream().eventsource();
        'events: while let Some(event) = events.next().await {
            let broken = |what: String| {
                // Pieces already went out: a retry would repeat them.
                if reply.is_empty() {
                    AgentError::retryable(what)
                } else {
                    AgentError::permanent(what)
                }
            };
            let event = event.map_err(|e| broken(format!("reply stream broke: {e}")))?;
            if event.data.trim() == "[DONE]" {
                break;
            }
            let chunk: StreamChunk = serde_json::from_str(&event.data)
                .map_err(|e| broken(format!("unreadable stream event: {e}")))?;
            if let Some(error) = chunk.error {
                return Err(AgentError::permanent(format!(
                    "agent stream error: {error}"
                )));
            }
            usage = chunk.usage.map(Usage::from).or(usage);
            for choice in chunk.choices {
                if let Some(finish) = choice.finish_reason.as_deref() {
                    stop = stop_reason(Some(finish));
                }
                let Some(mut piece) = choice.delta.and_then(|d| d.content) else {
                    continue;
                };
                let over = cap(&mut piece, max_bytes - reply.len());
                if !piece.is_empty() {
                    reply.push_str(&piece);
                    deltas.send(piece);
                }
                if over {
                    // The cap: the rest of the stream is not read (dropping it closes it).
                    stop = StopReason::Length;
                    break 'events;
                }
            }
        }
        if reply.is_empty() {
            return Err(AgentError::permanent("the agent returned an empty reply"));
        }
        Ok(AgentReply {
            text: reply,
            stop,
            usage,
        })
    }
}
