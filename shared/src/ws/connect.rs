//! `$connect`: record the connection and the conversation named in the URL. Nothing is checked
//! but the id's shape: the token comes later, in the `auth` frame, and nothing can be pushed to
//! the client before `$connect` returns.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{Edge, RouteEvent, reply, status};
use crate::Error;
use crate::db::{Scope, connections};
use crate::domain::ConversationId;
use crate::frame::ServerFrame;

#[tracing::instrument(skip_all, fields(connection_id))]
pub async fn handle(
    state: &Edge,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    match connect(state, &event).await {
        Ok(()) => status(200),
        Err(err) => {
            tracing::info!(error = %err, "connection refused");
            // A non-2xx answer makes API Gateway refuse the WebSocket handshake.
            let mut response = reply(&ServerFrame::error(&err));
            response.status_code = i64::from(err.code().http_status());
            response
        }
    }
}

async fn connect(state: &Edge, event: &ApiGatewayWebsocketProxyRequest) -> Result<(), Error> {
    let route = RouteEvent::parse(event, state.management_endpoint.as_deref())?;
    tracing::Span::current().record("connection_id", route.connection_id.as_str());
    let conversation_id: ConversationId = event
        .query_string_parameters
        .first("conversation_id")
        .ok_or_else(|| Error::BadRequest("conversation_id is required".into()))?
        .parse()?;
    let mut tx = state
        .db
        .begin(Scope::Connection(&route.connection_id))
        .await?;
    connections::insert(
        &mut tx,
        &route.connection_id,
        conversation_id,
        &route.endpoint,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
