//! `message` (and `ping`, and `$default` for unknown types): a user message from an
//! authenticated socket. `typing` goes out first, then the message is stored (once per
//! `client_message_id`), queued for the orchestrator, and acknowledged. An `ack` means the
//! message is stored and queued: it will not be lost.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{RouteEvent, WsState, reply};
use crate::Error;
use crate::db::{Scope, connections, conversations, messages};
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
    let unauthenticated = || Error::Unauthenticated("send an auth frame first".into());
    let mut tx = state.db.begin(Scope::Connection(id)).await?;
    let connection = connections::find(&mut tx, id)
        .await?
        .ok_or_else(unauthenticated)?;
    let binding = connection.binding().ok_or_else(unauthenticated)?;
    let sent = connections::count_message(&mut tx, id, state.rate_limit.window_seconds).await?;
    tx.commit().await?;
    if sent > state.rate_limit.messages {
        return Err(Error::RateLimited(format!(
            "at most {} messages per {} seconds",
            state.rate_limit.messages, state.rate_limit.window_seconds
        )));
    }

    let conversation_id = connection.conversation_id;
    // Typing is a courtesy: a failure to show it must not cost the message.
    if let Err(err) = state
        .post(
            &route.endpoint,
            id,
            &ServerFrame::Typing { conversation_id },
        )
        .await
    {
        tracing::warn!(error = &err as &dyn std::error::Error, "typing not sent");
    }

    let mut tx = state.db.begin(Scope::Tenant(binding.tenant_id)).await?;
    let conversation = conversations::find(&mut tx, conversation_id)
        .await?
        .ok_or_else(|| Error::NotFound("the conversation no longer exists".into()))?;
    let stored = messages::insert_user(&mut tx, &conversation, &text, client_message_id).await?;
    tx.commit().await?;
    let message_id = stored.row.id;

    // Queued again on a repeat: if an earlier attempt stored the message but failed to queue
    // it, this is its second chance; the queue's deduplication keeps it to one job.
    let job = Job {
        tenant_id: binding.tenant_id,
        conversation_id,
        portal_user_id: binding.user_id,
        message_id,
        message: normalize_web_event(WebEvent {
            tenant_id: binding.tenant_id,
            conversation_id,
            portal_user_id: binding.user_id,
            message_id,
            text: &text,
            display_name: None,
            timestamp: stored.row.created_at,
        }),
    };
    state.queue.enqueue(&job).await?;
    Ok(ServerFrame::Ack {
        conversation_id,
        message_id,
        client_message_id,
    })
}
