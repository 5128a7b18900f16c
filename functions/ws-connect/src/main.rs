use shared::config;
use shared::ws::{self, Edge, connect};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start(ws::Route::Connect.function());
    let (aws, secrets) = shared::secrets::aws_config().await;
    let edge = Edge::load(config::env, &aws, &secrets).await?;
    ws::run::<connect::Connect>(edge).await
}
