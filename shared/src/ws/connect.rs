//! `$connect`: record the connection and the conversation named in the URL. Nothing is checked
//! but the id's shape: the token comes later, in the `auth` frame, and nothing can be pushed to
//! the client before `$connect` returns.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{Edge, Handler, RouteEvent, reply};
use crate::Error;
use crate::db::{Scope, connections};
use crate::domain::ConversationId;
use crate::frame::ServerFrame;

/// The `$connect` route.
pub struct Connect;

impl Handler for Connect {
    type State = Edge;
    const NAME: &'static str = "connect";

    async fn answer(state: &Edge, route: &RouteEvent) -> Result<Option<ServerFrame>, Error> {
        let conversation_id: ConversationId = route
            .conversation_id
            .as_deref()
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
        Ok(None)
    }

    async fn refuse(
        _: &Edge,
        _: &ApiGatewayWebsocketProxyRequest,
        _: Option<&RouteEvent>,
        err: Error,
    ) -> ApiGatewayProxyResponse {
        tracing::info!(error = %err, "connection refused");
        // A non-2xx answer makes API Gateway refuse the WebSocket handshake.
        let mut response = reply(&ServerFrame::error(&err));
        response.status_code = i64::from(err.code().http_status());
        response
    }
}
