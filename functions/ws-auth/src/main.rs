use shared::auth::TokenVerifier;
use shared::config::AuthConfig;
use shared::ws::{self, AuthRoute, Edge, SocketCaps, auth};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    shared::telemetry::lambda_start(ws::Route::Auth.function());
    let (aws, secrets) = shared::secrets::aws_config().await;
    // Both secrets are read at once: a cold start waits for one round trip, not two.
    let (edge, auth) = tokio::join!(Edge::load(&aws, &secrets), AuthConfig::load(&secrets));
    let state = AuthRoute {
        edge: edge?,
        tokens: TokenVerifier::new(&auth?),
        caps: SocketCaps::from_env()?,
    };
    ws::run(|event| auth::handle(&state, event)).await
}
