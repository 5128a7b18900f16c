//! `message` (and `ping`, and `$default` for unknown types): a user message from an
//! authenticated socket. One statement checks the socket (token unexpired, user still allowed),
//! counts it for the rate limit and stores the message (once per `client_message_id`); `typing`
//! goes out as that commits, then the message is queued for the orchestrator and acknowledged.
//! An `ack` means the message is stored and queued: it will not be lost. The conversation's
//! other sockets get the stored message as a `message` frame (several tabs stay in step).
//!
//! `cancel` flags a user message of the socket's conversation: its reply stops at its next
//! flush, or is never started. It has no answer of its own; the reply's `response` says
//! `cancelled`.
//!
//! Branches (PROTOCOL §2): `edit` is a message beside another, taken as a `message` is;
//! `regenerate` queues a new request for a stored message's reply; `head` moves the current
//! branch. Each tells every socket of the conversation the new head (`head`).

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{Handler, MessageRoute, RouteEvent, reply};
use crate::Error;
use crate::db::messages::MessageRole;
use crate::db::{Scope, message_path};
use crate::delivery::{Audience, ConnectionsFanout, Fanout, encode};
use crate::domain::{ClientMessageId, MessageId, MessageText};
use crate::frame::{ClientFrame, ServerFrame};
use crate::job::Job;
use crate::konstruct_message::{WebEvent, normalize_web_event};
use crate::telemetry::{self, Event};

/// The `message` route (and `ping`, `$default`).
pub struct Message;

impl Handler for Message {
    type State = MessageRoute;
    const NAME: &'static str = "message";

    async fn answer(
        state: &MessageRoute,
        route: &RouteEvent,
    ) -> Result<Option<ServerFrame>, Error> {
        route_frame(state, route).await
    }

    /// The refusal names the frame's `client_message_id` when it had one.
    async fn refuse(
        _: &MessageRoute,
        event: &ApiGatewayWebsocketProxyRequest,
        _: Option<&RouteEvent>,
        err: Error,
    ) -> ApiGatewayProxyResponse {
        telemetry::record(Event::MessageRefused(err.code()));
        let refused = event
            .body
            .as_deref()
            .and_then(ClientFrame::client_message_id_of);
        reply(&ServerFrame::refusal(&err, refused))
    }
}

async fn route_frame(
    state: &MessageRoute,
    route: &RouteEvent,
) -> Result<Option<ServerFrame>, Error> {
    match ClientFrame::parse(route.body()?)? {
        ClientFrame::Ping => Ok(Some(ServerFrame::Pong)),
        ClientFrame::Message {
            text,
            client_message_id,
        } => Ok(Some(
            message(state, route, text, client_message_id, None).await?,
        )),
        ClientFrame::Edit {
            message_id,
            text,
            client_message_id,
        } => Ok(Some(
            message(state, route, text, client_message_id, Some(message_id)).await?,
        )),
        ClientFrame::Regenerate { reply_to } => {
            regenerate(state, route, reply_to).await?;
            Ok(None)
        }
        ClientFrame::Head { message_id } => {
            let head =
                message_path::move_head_from(&state.edge.db, &route.connection_id, message_id)
                    .await?;
            Ok(Some(tell_head(state, route, head).await))
        }
        ClientFrame::Cancel { reply_to } => {
            let id = &route.connection_id;
            let mut tx = state.edge.db.begin(Scope::BoundConnection(id)).await?;
            message_path::cancel(&mut tx, id, reply_to).await?;
            tx.commit().await?;
            Ok(None)
        }
        ClientFrame::Auth { .. } => Err(Error::BadRequest(
            "auth frames belong to the auth route".into(),
        )),
    }
}

async fn message(
    state: &MessageRoute,
    route: &RouteEvent,
    text: MessageText,
    client_message_id: Option<ClientMessageId>,
    edit_of: Option<MessageId>,
) -> Result<ServerFrame, Error> {
    let id = &route.connection_id;
    let stored = message_path::accept(
        &state.edge.db,
        id,
        &text,
        client_message_id,
        state.limits,
        edit_of,
    )
    .await?;
    // The message is stored: typing goes out (its conversation is known only from the
    // connection row) before the job is queued, so it cannot arrive after the reply. A
    // courtesy: failing to show it must not cost the message.
    let typing = ServerFrame::Typing {
        conversation_id: stored.conversation_id,
    };
    if let Err(err) = state.edge.post(&route.endpoint, id, &typing).await {
        tracing::warn!(error = &err as &dyn std::error::Error, "typing not sent");
    }

    // Queued again on a repeat: if an earlier attempt stored the message but failed to queue
    // it, this is its second chance; the queue's deduplication keeps it to one job.
    let job = Job {
        tenant_id: stored.tenant_id,
        conversation_id: stored.conversation_id,
        portal_user_id: stored.user_id,
        message_id: stored.message_id,
        reply_id: Some(stored.reply_id),
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
    // Bounded and timed like any fan-out: a stuck tab cannot hold the ack back for long. A
    // socket alone on its conversation (the usual case) costs nothing here.
    let show_others = async {
        if stored.others.is_empty() {
            return;
        }
        let mut shown = ServerFrame::Message {
            conversation_id: stored.conversation_id,
            message_id: stored.message_id,
            seq: stored.seq,
            role: MessageRole::User,
            content: Some(text.as_str().to_owned()),
            created_at: stored.created_at,
            client_message_id,
            parent_id: stored.parent_id,
            reply_id: stored.reply_id,
        };
        // A message the client could send can take more than a frame once escaped and
        // wrapped in the frame's fields: it is announced, and read by `seq`.
        if encode(&shown).is_err()
            && let ServerFrame::Message { content, .. } = &mut shown
        {
            *content = None;
        }
        let mut others = Audience::new(
            stored.tenant_id,
            stored.conversation_id,
            stored.others.clone(),
        );
        send_others(state, &mut others, &shown).await;
        // An edit moves the head off the branch the other tabs may show: they are told (the
        // sender learns it from the ack).
        if edit_of.is_some() && stored.created {
            let head = ServerFrame::Head {
                conversation_id: stored.conversation_id,
                head_id: Some(stored.message_id),
                reply_id: Some(stored.reply_id),
            };
            send_others(state, &mut others, &head).await;
        }
    };
    let (queued, _) = tokio::join!(state.queue.enqueue(&job), show_others);
    queued?;
    telemetry::record(Event::MessageAccepted);
    let span = tracing::Span::current();
    span.record(
        "conversation_id",
        tracing::field::display(stored.conversation_id),
    );
    span.record("message_id", tracing::field::display(stored.message_id));
    tracing::info!(
        seq = stored.seq,
        tenant_id = %stored.tenant_id,
        repeat = !stored.created,
        "message accepted"
    );
    Ok(ServerFrame::Ack {
        conversation_id: stored.conversation_id,
        message_id: stored.message_id,
        client_message_id,
        seq: stored.seq,
        parent_id: stored.parent_id,
        reply_id: stored.reply_id,
    })
}

/// `regenerate`: a new request for the message's reply, queued as a message's is. Every socket
/// of the conversation, the sender's too, is told the head (the message, its new reply to come)
/// before the job is queued: on the Lambda path a route's answer is posted after the function
/// returns, and the reply could come first.
async fn regenerate(
    state: &MessageRoute,
    route: &RouteEvent,
    message_id: MessageId,
) -> Result<(), Error> {
    let id = &route.connection_id;
    let asked = message_path::regenerate(&state.edge.db, id, message_id, state.limits).await?;
    let text = MessageText::parse(&asked.content)?;
    let job = Job {
        tenant_id: asked.tenant_id,
        conversation_id: asked.conversation_id,
        portal_user_id: asked.user_id,
        message_id,
        reply_id: Some(asked.reply_id),
        message: normalize_web_event(WebEvent {
            tenant_id: asked.tenant_id,
            conversation_id: asked.conversation_id,
            portal_user_id: asked.user_id,
            message_id,
            text: &text,
            display_name: None,
            timestamp: asked.created_at,
        }),
    };
    let typing = ServerFrame::Typing {
        conversation_id: asked.conversation_id,
    };
    let head = message_path::Head {
        tenant_id: asked.tenant_id,
        conversation_id: asked.conversation_id,
        head_id: Some(message_id),
        reply_id: Some(asked.reply_id),
        recipients: asked.recipients,
    };
    let head = tell_head(state, route, head).await;
    // Courtesies: failing to show them must not cost the request.
    for frame in [typing, head] {
        if let Err(err) = state.edge.post(&route.endpoint, id, &frame).await {
            tracing::warn!(error = &err as &dyn std::error::Error, "frame not sent");
        }
    }
    state.queue.enqueue(&job).await?;
    telemetry::record(Event::MessageAccepted);
    tracing::info!(%message_id, reply_id = %asked.reply_id, "regenerate accepted");
    Ok(())
}

/// The `head` frame for a move: posted to the conversation's other sockets, and returned for
/// the sender.
async fn tell_head(
    state: &MessageRoute,
    route: &RouteEvent,
    head: message_path::Head,
) -> ServerFrame {
    let frame = ServerFrame::Head {
        conversation_id: head.conversation_id,
        head_id: head.head_id,
        reply_id: head.reply_id,
    };
    let others = head
        .recipients
        .into_iter()
        .filter(|r| r.connection_id != route.connection_id)
        .collect();
    let mut others = Audience::new(head.tenant_id, head.conversation_id, others);
    send_others(state, &mut others, &frame).await;
    frame
}

/// Posts a frame to the conversation's other sockets, bounded and timed like any fan-out; a
/// courtesy that must not cost the frame's step.
async fn send_others(state: &MessageRoute, others: &mut Audience, frame: &ServerFrame) {
    if others.is_empty() {
        return;
    }
    let fanout = ConnectionsFanout::new(state.edge.db.clone(), state.edge.delivery.clone());
    if let Err(err) = fanout.send(others, frame).await {
        tracing::warn!(
            error = &err as &dyn std::error::Error,
            "frame not shown on other tabs"
        );
    }
}
