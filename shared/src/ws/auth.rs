//! `auth`: the first frame. Verifies the token, checks the caller may use the conversation named
//! at `$connect` (its owner or a platform admin, and a member of its tenant), and binds the
//! caller to the connection. On any failure the caller gets the `error` frame and the socket is
//! closed, so an unauthenticated socket cannot linger.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{AuthRoute, RouteEvent, reply, status};
use crate::Error;
use crate::db::message_path::Sent;
use crate::db::messages::{Message, MessageView};
use crate::db::{Scope, message_path};
use crate::delivery::{Posted, encode};
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

/// The rounds `auth` spends catching a socket up before it makes it live regardless (a
/// conversation that stores faster than one round posts): past them, a live frame may reach
/// the socket before the catch-up's last frames, and the client's rules (stored messages kept
/// once by id, chunks placed by offset) still give it every message once.
const CATCH_UP_ROUNDS: usize = 5;

/// Binds the caller; `auth_ok` is the route response, unless the socket is owed more (a
/// `replay`, a reply streaming now): then, after the binding commits, `auth_ok` and those
/// frames are posted in order, and what was stored meanwhile after them, until a transaction
/// finds nothing more and makes the socket live (writers leave a socket out until then, so no
/// live frame overtakes what it is owed). No transaction is open while a frame is posted.
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
    let mut tx = state
        .edge
        .db
        .begin(Scope::Binding {
            connection: id,
            user: caller.user_id(),
        })
        .await?;
    let conversation_id = message_path::bind(
        &mut tx,
        id,
        caller.user_id(),
        caller.role(),
        caller.expires_at(),
        state.caps,
        state.limits,
    )
    .await?;
    tracing::Span::current().record("conversation_id", tracing::field::display(conversation_id));
    let resume = message_path::resume(&mut tx, id, conversation_id, resume_after).await?;
    tx.commit().await?;
    let auth_ok = ServerFrame::AuthOk {
        conversation_id,
        user_id: caller.user_id(),
        last_seq: resume.last_seq,
    };
    if resume.live {
        return Ok(Some(auth_ok));
    }
    let mut sent = Sent {
        through_seq: resume.last_seq,
        streaming: None,
    };
    let mut frames = vec![auth_ok];
    frames.extend(owed_frames(
        conversation_id,
        resume_after.is_some(),
        resume,
        &mut sent,
        None,
    ));
    for round in 1..=CATCH_UP_ROUNDS {
        for frame in &frames {
            if state.edge.post(&route.endpoint, id, frame).await? == Posted::Gone {
                return Ok(None);
            }
        }
        let mut tx = state.edge.db.begin(Scope::CatchingUp(id)).await?;
        let (resume, ended) =
            message_path::catch_up(&mut tx, id, conversation_id, sent, round == CATCH_UP_ROUNDS)
                .await?;
        tx.commit().await?;
        let live = resume.live;
        frames = owed_frames(conversation_id, false, resume, &mut sent, ended);
        if live {
            break;
        }
    }
    for frame in &frames {
        if state.edge.post(&route.endpoint, id, frame).await? == Posted::Gone {
            break;
        }
    }
    Ok(None)
}

/// The frames a socket is owed after what `sent` says it holds: the messages it missed (with
/// a reply that has `ended` since it was sent in part; a `replay` even when none, if
/// `replay`), then the text of a reply streaming now that it lacks. `sent` moves past them.
fn owed_frames(
    conversation_id: ConversationId,
    replay: bool,
    resume: message_path::Resume,
    sent: &mut Sent,
    ended: Option<Message>,
) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    let held = |id| match sent.streaming {
        Some((streamed, held)) if streamed == id => held,
        _ => 0,
    };
    let streaming = resume.streaming.map(|reply| {
        let from = if resume.missed.iter().any(|m| m.id == reply.id) {
            0
        } else {
            held(reply.id)
        };
        (from, reply)
    });
    sent.through_seq = sent.through_seq.max(resume.last_seq);
    let missed: Vec<Message> = ended.into_iter().chain(resume.missed).collect();
    if replay || resume.too_many || !missed.is_empty() {
        frames.extend(replay_frames(resume.too_many, missed));
    }
    sent.streaming = None;
    if let Some((from, reply)) = streaming
        && let Some(reply_to) = reply.reply_to
    {
        let of = ChunkOf {
            conversation_id,
            message_id: reply.id,
            reply_to,
        };
        let text: String = reply.content.chars().skip(from).collect();
        frames.extend(of.chunks(from, &text, false));
        sent.streaming = Some((reply.id, reply.content.chars().count()));
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
