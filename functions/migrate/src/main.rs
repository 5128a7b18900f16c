use shared::config;
use shared::migrate::{self, MigrateState};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start("migrate");
    let (_, secrets) = shared::secrets::aws_config().await;
    migrate::run(MigrateState::load(config::env, &secrets).await).await
}
