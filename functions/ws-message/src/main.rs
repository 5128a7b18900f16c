use shared::config;
use shared::ws::{self, MessageRoute, message};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start(ws::Route::Message.function());
    let (aws, secrets) = shared::secrets::aws_config().await;
    let state = MessageRoute::load(config::env, &aws, &secrets).await?;
    ws::run::<message::Message>(state).await
}
