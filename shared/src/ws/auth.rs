//! `auth`: the first frame. Verifies the token, checks the caller may use the conversation named
//! at `$connect` (its owner or a platform admin, and a member of its tenant), and binds the
//! caller to the connection. On any failure the caller gets the `error` frame and the socket is
//! closed, so an unauthenticated socket cannot linger.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{RouteEvent, WsState, reply, status};
use crate::Error;
use crate::db::{Scope, message_path};
use crate::frame::{ClientFrame, ServerFrame};

#[tracing::instrument(skip_all, fields(connection_id))]
pub async fn handle(
    state: &WsState,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let route = match RouteEvent::parse(&event, state.management_endpoint.as_deref()) {
        Ok(route) => route,
        Err(err) => return reply(&ServerFrame::error(&err)),
    };
    tracing::Span::current().record("connection_id", route.connection_id.as_str());
    match auth(state, &route).await {
        Ok(frame) => reply(&frame),
        Err(err) => {
            tracing::info!(error = %err, "auth refused");
            refuse(state, &route, &err).await;
            status(200)
        }
    }
}

async fn auth(state: &WsState, route: &RouteEvent) -> Result<ServerFrame, Error> {
    let ClientFrame::Auth { token } = ClientFrame::parse(route.body()?)? else {
        return Err(Error::BadRequest("expected an auth frame".into()));
    };
    let caller = state.tokens.verify(&token)?;

    let id = &route.connection_id;
    let mut tx = state.db.begin(Scope::ConnectingConnection(id)).await?;
    let conversation_id = message_path::bind(
        &mut tx,
        id,
        caller.user_id(),
        caller.role(),
        caller.expires_at(),
    )
    .await?;
    tx.commit().await?;
    Ok(ServerFrame::AuthOk {
        conversation_id,
        user_id: caller.user_id(),
    })
}

/// Sends the error, then closes the socket. The frame goes through the management API because
/// a route response would arrive after the close, that is never.
async fn refuse(state: &WsState, route: &RouteEvent, err: &Error) {
    let id = &route.connection_id;
    if let Err(e) = state
        .post(&route.endpoint, id, &ServerFrame::error(err))
        .await
    {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "could not send the auth error"
        );
    }
    if let Err(e) = state.delivery.close(&route.endpoint, id).await {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "could not close the connection"
        );
    }
}
