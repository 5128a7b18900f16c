use shared::config::DatabaseConfig;
use shared::migrate::{self, MigrateState};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start("migrate");
    let (_, secrets) = shared::secrets::aws_config().await;
    // A configuration problem is reported to CloudFormation with the event, not by failing to
    // start (which would leave the stack waiting for an answer).
    let database =
        DatabaseConfig::load_migrator(|name: &str| std::env::var(name).ok(), &secrets).await;
    migrate::run(MigrateState::new(database)).await
}
