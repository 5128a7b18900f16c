//! `auth`: the first frame. Verifies the token, checks the caller may use the conversation named
//! at `$connect` (its owner or a platform admin, and a member of its tenant), and binds the
//! caller to the connection. On any failure the caller gets the `error` frame and the socket is
//! closed, so an unauthenticated socket cannot linger.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};

use super::{AuthRoute, Handler, RouteEvent, reply, status};
use crate::Error;
use crate::db::message_path::Sent;
use crate::db::messages::{Message, MessageView};
use crate::db::{Scope, message_path};
use crate::delivery::{Posted, encode};
use crate::domain::ConversationId;
use crate::frame::{ChunkOf, ClientFrame, MAX_SERVER_FRAME_BYTES, ServerFrame};

/// The `auth` route.
pub struct Auth;

impl Handler for Auth {
    type State = AuthRoute;
    const NAME: &'static str = "auth";

    async fn answer(state: &AuthRoute, route: &RouteEvent) -> Result<Option<ServerFrame>, Error> {
        auth(state, route).await
    }

    /// The `error` frame is posted and the socket closed; an event refused before it named a
    /// connection gets the frame as the route response.
    async fn refuse(
        state: &AuthRoute,
        _: &ApiGatewayWebsocketProxyRequest,
        route: Option<&RouteEvent>,
        err: Error,
    ) -> ApiGatewayProxyResponse {
        let Some(route) = route else {
            return reply(&ServerFrame::error(&err));
        };
        tracing::info!(error = %err, "auth refused");
        refuse(state, route, &err).await;
        status(200)
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
        head_id: resume.head_id,
    };
    let mut head = resume.head_id;
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
        // The head moved while the socket caught up (writers leave it out until it is live).
        let moved = (resume.head_id != head).then_some(ServerFrame::Head {
            conversation_id,
            head_id: resume.head_id,
            reply_id: resume.head_reply_id,
        });
        head = resume.head_id;
        frames = owed_frames(conversation_id, false, resume, &mut sent, ended);
        frames.extend(moved);
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
    // Where the socket's copy of the reply streaming now ends; a reply restarted meanwhile by
    // another attempt (shorter than what was sent) is sent again from the start, with `reset`.
    let streaming = resume.streaming.map(|reply| {
        let held = if resume.missed.iter().any(|m| m.id == reply.id) {
            0
        } else {
            held(reply.id)
        };
        let restarted = held > reply.content.chars().count();
        (if restarted { 0 } else { held }, restarted, reply)
    });
    sent.through_seq = sent.through_seq.max(resume.last_seq);
    let missed: Vec<Message> = ended.into_iter().chain(resume.missed).collect();
    if replay || resume.too_many || !missed.is_empty() {
        frames.extend(replay_frames(resume.too_many, missed));
    }
    sent.streaming = None;
    if let Some((from, reset, reply)) = streaming
        && let Some(reply_to) = reply.reply_to
    {
        let of = ChunkOf {
            conversation_id,
            message_id: reply.id,
            reply_to,
        };
        let text: String = reply.content.chars().skip(from).collect();
        let chunks = of.chunks(from, &text, reset);
        if chunks.is_empty() && reset {
            // Restarted with no text yet: the socket still drops what it held.
            frames.push(ServerFrame::Chunk {
                conversation_id,
                message_id: reply.id,
                reply_to,
                offset: 0,
                delta: String::new(),
                reset: true,
            });
        }
        frames.extend(chunks);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn streaming_reply(id: &str, content: &str) -> Message {
        serde_json::from_value(serde_json::json!({
            "id": id, "conversation_id": "11111111-1111-4111-8111-111111111111",
            "tenant_id": "22222222-2222-4222-8222-222222222222", "role": "assistant",
            "content": content, "client_message_id": null,
            "reply_to": "33333333-3333-4333-8333-333333333333",
            "created_at": "2026-12-03T00:00:00Z", "seq": 2, "status": "streaming",
        }))
        .unwrap()
    }

    fn caught_up(sent: &mut Sent, reply: Message) -> Vec<serde_json::Value> {
        let resume = message_path::Resume {
            last_seq: 2,
            missed: Vec::new(),
            too_many: false,
            streaming: Some(reply.clone()),
            live: false,
            head_id: None,
            head_reply_id: None,
        };
        owed_frames(reply.conversation_id, false, resume, sent, None)
            .iter()
            .map(|f| serde_json::from_str(&encode(f).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn a_catch_up_sends_the_new_part_of_a_streaming_reply_or_all_of_a_restarted_one() {
        let id = "44444444-4444-4444-8444-444444444444";
        let mut sent = Sent {
            through_seq: 2,
            streaming: Some((id.parse().unwrap(), 5)),
        };
        let frames = caught_up(&mut sent, streaming_reply(id, "Hello, world"));
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["offset"], 5);
        assert_eq!(frames[0]["delta"], ", world");
        assert!(frames[0].get("reset").is_none());
        assert_eq!(sent.streaming, Some((id.parse().unwrap(), 12)));

        // Another attempt restarted it: shorter now, sent whole with `reset`.
        let frames = caught_up(&mut sent, streaming_reply(id, "Hi"));
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["offset"], 0);
        assert_eq!(frames[0]["delta"], "Hi");
        assert_eq!(frames[0]["reset"], true);

        let frames = caught_up(&mut sent, streaming_reply(id, ""));
        assert_eq!(frames.len(), 1, "restarted with nothing yet: reset alone");
        assert_eq!(frames[0]["reset"], true);
        assert_eq!(frames[0]["delta"], "");
    }
}
