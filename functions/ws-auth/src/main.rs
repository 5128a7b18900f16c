use shared::auth::TokenVerifier;
use shared::config::AuthConfig;
use shared::ws::{self, AuthRoute, Edge, SocketCaps, auth};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let (aws, secrets) = shared::secrets::aws_config().await;
    let state = AuthRoute {
        edge: Edge::load(&aws, &secrets).await?,
        tokens: TokenVerifier::new(&AuthConfig::load(&secrets).await?),
        caps: SocketCaps::from_env()?,
    };
    ws::run(|event| auth::handle(&state, event)).await
}
