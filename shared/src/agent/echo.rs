//! `echo`: answers `Echo: <the user's text>`. Deterministic and offline: the provider for local
//! runs, demos and benchmarks, and a real provider of the pipeline (its replies are stored and
//! delivered like any other).

use async_trait::async_trait;

use super::{AgentError, AgentReply, AgentRequest, Deltas, ModelClient};
use crate::db::messages::StopReason;

#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Echo {
    pub fn answer(question: &str) -> String {
        format!("Echo: {question}")
    }
}

#[async_trait]
impl ModelClient for Echo {
    async fn reply(
        &self,
        request: &AgentRequest<'_>,
        _deltas: &Deltas,
    ) -> Result<AgentReply, AgentError> {
        Ok(AgentReply::capped(
            Self::answer(request.question()),
            StopReason::End,
            request.max_reply_bytes,
        ))
    }
}
