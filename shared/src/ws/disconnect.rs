//! `$disconnect`: forget the connection. API Gateway ignores the answer.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{Edge, RouteEvent, status};
use crate::Error;
use crate::db::{Scope, connections};

#[tracing::instrument(skip_all, fields(connection_id))]
pub async fn handle(
    state: &Edge,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    match disconnect(state, &event).await {
        Ok(()) => status(200),
        Err(err) => {
            tracing::warn!(error = &err as &dyn std::error::Error, "disconnect failed");
            status(err.code().http_status())
        }
    }
}

async fn disconnect(state: &Edge, event: &ApiGatewayWebsocketProxyRequest) -> Result<(), Error> {
    let route = RouteEvent::parse(event, state.management_endpoint.as_deref())?;
    tracing::Span::current().record("connection_id", route.connection_id.as_str());
    let mut tx = state
        .db
        .begin(Scope::Connection(&route.connection_id))
        .await?;
    connections::delete(&mut tx, &route.connection_id).await?;
    tx.commit().await?;
    Ok(())
}
