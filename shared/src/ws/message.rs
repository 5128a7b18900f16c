//! `message` (and `ping`, and `$default` for unknown types): a user message from an
//! authenticated socket. One statement checks the socket (token unexpired, user still allowed),
//! counts it for the rate limit and stores the message (once per `client_message_id`); `typing`
//! goes out as that commits, then the message is queued for the orchestrator and acknowledged.
//! An `ack` means the message is stored and queued: it will not be lost.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{RouteEvent, WsState, reply};
use crate::Error;
use crate::db::{Scope, message_path};
use crate::domain::{ClientMessageId, MessageText};
use crate::frame::{ClientFrame, ServerFrame};
use crate::job::Job;
use crate::message::{WebEvent, normalize_web_event};

#[tracing::instrument(skip_all, fields(connection_id))]
pub async fn handle(
    state: &WsState,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let frame = match RouteEvent::parse(&event, state.management_endpoint.as_deref()) {
        Ok(route) => {
            tracing::Span::current().record("connection_id", route.connection_id.as_str());
            route_frame(state, &route).await
        }
        Err(err) => Err(err),
    };
    reply(&frame.unwrap_or_else(|err| ServerFrame::error(&err)))
}

async fn route_frame(state: &WsState, route: &RouteEvent) -> Result<ServerFrame, Error> {
    match ClientFrame::parse(route.body()?)? {
        ClientFrame::Ping => Ok(ServerFrame::Pong),
        ClientFrame::Message {
            text,
            client_message_id,
        } => message(state, route, text, client_message_id).await,
        ClientFrame::Auth { .. } => Err(Error::BadRequest(
            "auth frames belong to the auth route".into(),
        )),
    }
}

async fn message(
    state: &WsState,
    route: &RouteEvent,
    text: MessageText,
    client_message_id: Option<ClientMessageId>,
) -> Result<ServerFrame, Error> {
    let id = &route.connection_id;
    let mut tx = state.db.begin(Scope::BoundConnection(id)).await?;
    let stored =
        message_path::accept(&mut tx, id, &text, client_message_id, state.rate_limit).await?;
    // The message is accepted: typing goes out while the transaction commits (its
    // conversation is known only from the connection row), and before the job is queued, so
    // it cannot arrive after the reply. A courtesy: failing to show it must not cost the
    // message.
    let typing = async {
        let frame = ServerFrame::Typing {
            conversation_id: stored.conversation_id,
        };
        if let Err(err) = state.post(&route.endpoint, id, &frame).await {
            tracing::warn!(error = &err as &dyn std::error::Error, "typing not sent");
        }
    };
    let (committed, ()) = tokio::join!(tx.commit(), typing);
    committed?;

    // Queued again on a repeat: if an earlier attempt stored the message but failed to queue
    // it, this is its second chance; the queue's deduplication keeps it to one job.
    let job = Job {
        tenant_id: stored.tenant_id,
        conversation_id: stored.conversation_id,
        portal_user_id: stored.user_id,
        message_id: stored.message_id,
        message: normalize_web_event(WebEvent {
            tenant_id: stored.tenant_id,
            conversation_id: stored.conversation_id,
            portal_user_id: stored.user_id,
            message_id: stored.message_id,
            text: &text,
            display_name: None,
            timestamp: stored.created_at,
        }),
    };
    state.queue.enqueue(&job).await?;
    Ok(ServerFrame::Ack {
        conversation_id: stored.conversation_id,
        message_id: stored.message_id,
        client_message_id,
    })
}
