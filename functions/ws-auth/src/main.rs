use shared::config;
use shared::ws::{self, AuthRoute, auth};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start(ws::Route::Auth.function());
    let (aws, secrets) = shared::secrets::aws_config().await;
    let state = AuthRoute::load(config::env, &aws, &secrets).await?;
    ws::run::<auth::Auth>(state).await
}
