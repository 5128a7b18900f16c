//! `openai`: any OpenAI-compatible `/chat/completions` endpoint (OpenAI, Ollama, vLLM, LiteLLM),
//! streamed over server-sent events.

use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{AgentError, AgentRequest, Deltas, Provider};
use crate::config::{ConfigError, Lookup};
use crate::db::messages::MessageRole;

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Request fields an agent's `settings` may set; the rest of the body is the provider's.
const SETTINGS: [&str; 6] = [
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
];

pub struct OpenAi {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<SecretString>,
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
            api_key: api_key.map(SecretString::from),
        }
    }

    /// `OPENAI_BASE_URL` (default OpenAI's) and `OPENAI_API_KEY` (optional: local servers such as
    /// Ollama need none).
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let base_url = lookup("OPENAI_BASE_URL")
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
        if !base_url.starts_with("http://") && !base_url.starts_with("https://") {
            return Err(ConfigError::new(
                "OPENAI_BASE_URL",
                "must be an http(s) URL",
            ));
        }
        let api_key = lookup("OPENAI_API_KEY").filter(|v| !v.trim().is_empty());
        Ok(Self::new(&base_url, api_key))
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
            messages.push(json!({ "role": role, "content": turn.content }));
        }
        let mut body = Map::new();
        body.insert("model".into(), json!(agent.model));
        body.insert("messages".into(), Value::Array(messages));
        body.insert("stream".into(), json!(true));
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
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    message: Option<Delta>,
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
impl Provider for OpenAi {
    async fn reply(
        &self,
        request: &AgentRequest<'_>,
        deltas: &Deltas,
    ) -> Result<String, AgentError> {
        if request.agent.model.trim().is_empty() {
            return Err(AgentError::permanent("the agent has no model configured"));
        }
        let mut call = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .json(&Self::body(request));
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let response = call
            .send()
            .await
            .map_err(|e| AgentError::retryable(format!("agent endpoint unreachable: {e}")))?;
        let status = response.status();
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
        if !streamed {
            // A server that ignores `stream` answers with one completion.
            let whole: StreamChunk = response
                .json()
                .await
                .map_err(|e| AgentError::retryable(format!("unreadable completion: {e}")))?;
            return whole
                .choices
                .into_iter()
                .find_map(|c| c.message.and_then(|m| m.content))
                .filter(|text| !text.is_empty())
                .ok_or_else(|| AgentError::permanent("the agent returned an empty reply"));
        }

        let mut reply = String::new();
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
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
            for piece in chunk.choices.into_iter().filter_map(|c| c.delta?.content) {
                if !piece.is_empty() {
                    reply.push_str(&piece);
                    // The receiver only goes away when the job is abandoned.
                    let _ = deltas.send(piece);
                }
            }
        }
        if reply.is_empty() {
            return Err(AgentError::permanent("the agent returned an empty reply"));
        }
        Ok(reply)
    }
}
