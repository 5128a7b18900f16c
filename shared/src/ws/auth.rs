//! `auth`: the first frame. Verifies the token, checks the caller may use the conversation named
//! at `$connect` (its owner or a platform admin, and a member of its tenant), and binds the
//! caller to the connection. On any failure the caller gets the `error` frame and the socket is
//! closed, so an unauthenticated socket cannot linger.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{AuthRoute, RouteEvent, reply, status};
use crate::Error;
use crate::db::messages::{Message, MessageView};
use crate::db::{Scope, message_path};
use crate::delivery::encode;
use crate::domain::ConversationId;
use crate::frame::{ChunkOf, ClientFrame, MAX_SERVER_FRAME_BYTES, ServerFrame};

#[tracing::instrument(skip_all, fields(connection_id, conversation_id))]
pub async fn handle(
    state: &AuthRoute,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let route = match RouteEvent::parse(&event, state.edge.management_endpoint.as_deref()) {
        Ok(route) => route,
        Err(err) => return reply(&ServerFrame::error(&err)),
    };
    tracing::Span::current().record("connection_id", route.connection_id.as_str());
    match auth(state, &route).await {
        Ok(Some(frame)) => reply(&frame),
        Ok(None) => status(200),
        Err(err) => {
            tracing::info!(error = %err, "auth refused");
            refuse(state, &route, &err).await;
            status(200)
        }
    }
}

/// Binds the caller; `auth_ok` is the route response, unless the socket is owed more (a
/// `replay`, a reply streaming now): then `auth_ok` and those frames are posted, in order,
/// while the conversation is locked, so no live frame can overtake them.
async fn auth(state: &AuthRoute, route: &RouteEvent) -> Result<Option<ServerFrame>, Error> {
    let ClientFrame::Auth {
        token,
        resume_after,
    } = ClientFrame::parse(route.body()?)?
    else {
        return Err(Error::BadRequest("expected an auth frame".into()));
    };
    let caller = state.tokens.verify_fresh(&token).await?;

    let id = &route.connection_id;
    let mut tx = state.edge.db.begin(Scope::ConnectingConnection(id)).await?;
    let conversation_id = message_path::bind(
        &mut tx,
        id,
        caller.user_id(),
        caller.role(),
        caller.expires_at(),
        state.caps,
    )
    .await?;
    tracing::Span::current().record("conversation_id", tracing::field::display(conversation_id));
    let resume = message_path::resume(&mut tx, conversation_id, resume_after).await?;
    let auth_ok = ServerFrame::AuthOk {
        conversation_id,
        user_id: caller.user_id(),
        last_seq: resume.last_seq,
    };
    let owed = owed_frames(conversation_id, resume_after.is_some(), resume);
    if owed.is_empty() {
        tx.commit().await?;
        return Ok(Some(auth_ok));
    }
    for frame in std::iter::once(&auth_ok).chain(&owed) {
        state.edge.post(&route.endpoint, id, frame).await?;
    }
    tx.commit().await?;
    Ok(None)
}

/// The frames a socket is owed right after `auth_ok`: the messages it missed, then the text so
/// far of a reply streaming now.
fn owed_frames(
    conversation_id: ConversationId,
    resumed: bool,
    resume: message_path::Resume,
) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    if resumed {
        frames.extend(replay_frames(resume.too_many, resume.missed));
    }
    if let Some(reply) = resume.streaming
        && let Some(reply_to) = reply.reply_to
    {
        let of = ChunkOf {
            conversation_id,
            message_id: reply.id,
            reply_to,
        };
        frames.extend(of.chunks(0, &reply.content, false));
    }
    frames
}

/// `replay` frames of at most [`MAX_SERVER_FRAME_BYTES`], in `seq` order, `more` on all but the
/// last. A message too large for a frame of its own (a reply near the 64 KiB cap) cannot be
/// replayed: the client is told to reload (`recovered: false`), as when too many were missed.
pub fn replay_frames(too_many: bool, missed: Vec<Message>) -> Vec<ServerFrame> {
    let unrecoverable = || {
        vec![ServerFrame::Replay {
            messages: Vec::new(),
            recovered: false,
            more: false,
        }]
    };
    if too_many {
        return unrecoverable();
    }
    // The envelope's size, and each message's in it (a comma apart).
    let envelope = encode(&ServerFrame::Replay {
        messages: Vec::new(),
        recovered: true,
        more: false,
    })
    .map_or(0, |json| json.len());
    let mut frames: Vec<Vec<MessageView>> = vec![Vec::new()];
    let mut size = envelope;
    for message in missed {
        let view = MessageView::from(message);
        let len = serde_json::to_string(&view).map_or(usize::MAX, |json| json.len()) + 1;
        if envelope + len > MAX_SERVER_FRAME_BYTES {
            return unrecoverable();
        }
        if size + len > MAX_SERVER_FRAME_BYTES {
            frames.push(Vec::new());
            size = envelope;
        }
        size += len;
        frames.last_mut().expect("one frame at least").push(view);
    }
    let last = frames.len() - 1;
    frames
        .into_iter()
        .enumerate()
        .map(|(i, messages)| ServerFrame::Replay {
            messages,
            recovered: true,
            more: i < last,
        })
        .collect()
}

/// Sends the error, then closes the socket. The frame goes through the management API because
/// a route response would arrive after the close, that is never.
async fn refuse(state: &AuthRoute, route: &RouteEvent, err: &Error) {
    let id = &route.connection_id;
    if let Err(e) = state
        .edge
        .post(&route.endpoint, id, &ServerFrame::error(err))
        .await
    {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "could not send the auth error"
        );
    }
    if let Err(e) = state.edge.delivery.close(&route.endpoint, id).await {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "could not close the connection"
        );
    }
}
