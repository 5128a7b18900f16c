//! `bedrock`: Amazon Bedrock's Converse API, with the Lambda role's credentials.

use async_trait::async_trait;
use aws_sdk_bedrockruntime::error::{DisplayErrorContext, SdkError};
use aws_sdk_bedrockruntime::operation::converse::ConverseError;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ConversationRole, ConverseOutput, InferenceConfiguration, Message,
    SystemContentBlock,
};

use super::{AgentError, AgentReply, AgentRequest, Deltas, ModelClient};
use crate::db::messages::{MessageRole, StopReason, Usage};

pub struct Bedrock {
    client: aws_sdk_bedrockruntime::Client,
    /// The model ids agents may use; `None` allows any (local runs). The deployment's IAM
    /// policy allows the same list.
    allowed_models: Option<Vec<String>>,
}

impl Bedrock {
    pub fn new(client: aws_sdk_bedrockruntime::Client) -> Self {
        Self {
            client,
            allowed_models: None,
        }
    }

    /// Only these model ids may be invoked.
    pub fn allowing(mut self, models: Vec<String>) -> Self {
        self.allowed_models = Some(models);
        self
    }

    /// Converse wants the conversation to open with the user and alternate roles: leading
    /// assistant turns are dropped and consecutive turns of one role become one message, a
    /// content block each. A platform admin's words follow a block of their own saying so
    /// (Converse carries no author): the owner's text is always a single block.
    fn messages(request: &AgentRequest<'_>) -> Result<Vec<Message>, AgentError> {
        let mut merged: Vec<(MessageRole, Vec<ContentBlock>)> = Vec::new();
        for turn in request
            .history
            .iter()
            .skip_while(|t| t.role == MessageRole::Assistant)
        {
            let mut blocks = Vec::new();
            if turn.by_someone_else {
                blocks.push(ContentBlock::Text(super::ADMIN_MARK.to_owned()));
            }
            blocks.push(ContentBlock::Text(turn.content.clone()));
            match merged.last_mut() {
                Some((role, content)) if *role == turn.role => content.extend(blocks),
                _ => merged.push((turn.role, blocks)),
            }
        }
        merged
            .into_iter()
            .map(|(role, content)| {
                let role = match role {
                    MessageRole::User => ConversationRole::User,
                    MessageRole::Assistant => ConversationRole::Assistant,
                };
                Message::builder()
                    .role(role)
                    .set_content(Some(content))
                    .build()
                    .map_err(|e| AgentError::permanent(format!("bad Converse message: {e}")))
            })
            .collect()
    }
}

fn classify(err: SdkError<ConverseError>) -> AgentError {
    let message = format!("Bedrock Converse: {}", DisplayErrorContext(&err));
    match &err {
        SdkError::ServiceError(service) => match service.err() {
            ConverseError::ThrottlingException(_)
            | ConverseError::ServiceUnavailableException(_)
            | ConverseError::InternalServerException(_)
            | ConverseError::ModelTimeoutException(_)
            | ConverseError::ModelNotReadyException(_) => AgentError::retryable(message),
            _ if service.raw().status().is_server_error() => AgentError::retryable(message),
            _ => AgentError::permanent(message),
        },
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            AgentError::retryable(message)
        }
        _ => AgentError::permanent(message),
    }
}

#[async_trait]
impl ModelClient for Bedrock {
    async fn reply(
        &self,
        request: &AgentRequest<'_>,
        _deltas: &Deltas,
    ) -> Result<AgentReply, AgentError> {
        let agent = request.agent;
        if agent.model.trim().is_empty() {
            return Err(AgentError::permanent("the agent has no model configured"));
        }
        if let Some(allowed) = &self.allowed_models
            && !allowed.contains(&agent.model)
        {
            return Err(AgentError::permanent(format!(
                "Bedrock model {} is not allowed in this deployment (BEDROCK_MODEL_IDS)",
                agent.model
            )));
        }
        let mut call = self
            .client
            .converse()
            .model_id(&agent.model)
            .set_messages(Some(Self::messages(request)?));
        if !agent.system_prompt.trim().is_empty() {
            call = call.system(SystemContentBlock::Text(agent.system_prompt.clone()));
        }
        let settings = &agent.settings;
        let mut inference = InferenceConfiguration::builder()
            .max_tokens(i32::try_from(request.max_tokens).unwrap_or(i32::MAX));
        if let Some(t) = settings.get("temperature").and_then(|v| v.as_f64()) {
            inference = inference.temperature(t as f32);
        }
        let output = call
            .inference_config(inference.build())
            .send()
            .await
            .map_err(classify)?;
        let stop = match output.stop_reason {
            aws_sdk_bedrockruntime::types::StopReason::MaxTokens => StopReason::Length,
            _ => StopReason::End,
        };
        let usage = output.usage.map(|u| Usage {
            input_tokens: u32::try_from(u.input_tokens).unwrap_or(0),
            output_tokens: u32::try_from(u.output_tokens).unwrap_or(0),
        });
        let text = match output.output {
            Some(ConverseOutput::Message(message)) => message
                .content
                .into_iter()
                .filter_map(|block| match block {
                    ContentBlock::Text(text) => Some(text),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        };
        if text.is_empty() {
            return Err(AgentError::permanent("the agent returned an empty reply"));
        }
        let mut reply = AgentReply::capped(text, stop, request.max_reply_bytes);
        reply.usage = usage;
        Ok(reply)
    }
}
