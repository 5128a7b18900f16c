use shared::config;
use shared::ws::sweep;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start("ws-sweep");
    let (aws, secrets) = shared::secrets::aws_config().await;
    let sweeper = sweep::Sweeper::load(config::env, &aws, &secrets).await?;
    sweep::run(sweeper).await
}
