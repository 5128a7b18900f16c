use shared::api::{self, ChatApi};
use shared::config;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    lambda_http::tracing::init_default_subscriber();
    shared::telemetry::lambda_start("chat-api");
    let (aws, secrets) = shared::secrets::aws_config().await;
    let app = ChatApi::load(config::env, &aws, &secrets).await?;
    lambda_http::run(api::flushing_metrics(app.router())).await
}
