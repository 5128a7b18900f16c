//! `$disconnect`: forget the connection. API Gateway ignores the answer.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{Edge, Handler, RouteEvent, status};
use crate::Error;
use crate::db::{Scope, connections};
use crate::frame::ServerFrame;

/// The `$disconnect` route.
pub struct Disconnect;

impl Handler for Disconnect {
    type State = Edge;
    const NAME: &'static str = "disconnect";

    async fn answer(state: &Edge, route: &RouteEvent) -> Result<Option<ServerFrame>, Error> {
        let mut tx = state
            .db
            .begin(Scope::Connection(&route.connection_id))
            .await?;
        connections::delete(&mut tx, &route.connection_id).await?;
        tx.commit().await?;
        Ok(None)
    }

    async fn refuse(
        _: &Edge,
        _: &ApiGatewayWebsocketProxyRequest,
        _: Option<&RouteEvent>,
        err: Error,
    ) -> ApiGatewayProxyResponse {
        tracing::warn!(error = &err as &dyn std::error::Error, "disconnect failed");
        status(err.code().http_status())
    }
}
