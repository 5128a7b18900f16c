use shared::config;
use shared::orchestrator::{self, OrchestratorState};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start("orchestrator");
    let state = OrchestratorState::load(config::env).await?;
    orchestrator::run(state).await
}
