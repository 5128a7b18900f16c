use shared::ws::{Edge, sweep};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start("ws-sweep");
    let (aws, secrets) = shared::secrets::aws_config().await;
    let edge = Edge::load(&aws, &secrets).await?;
    let deadline = sweep::auth_deadline(|name: &str| std::env::var(name).ok())?;
    sweep::run(edge, deadline).await
}
