use shared::ws::{self, Route, WsState};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let state = WsState::from_env().await?;
    ws::run(state, Route::Disconnect).await
}
