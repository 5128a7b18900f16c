use shared::api::{self, ApiState};
use shared::config::CorsConfig;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    lambda_http::tracing::init_default_subscriber();
    shared::telemetry::lambda_start("chat-api");
    let (_, secrets) = shared::secrets::aws_config().await;
    let state = ApiState::load(&secrets).await?;
    let cors = CorsConfig::from_env()?;
    let app = api::router(state).layer(api::cors(&cors));
    lambda_http::run(api::flushing_metrics(app)).await
}
