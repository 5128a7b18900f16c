//! WebSocket frames (PROTOCOL §2): what the browser sends, parsed once, and what it receives.

use serde::{Deserialize, Serialize};

use chrono::{DateTime, Utc};

use crate::db::messages::{MessageRole, MessageView, StopReason, Usage};
use crate::domain::{ClientMessageId, ConversationId, MessageId, MessageText, UserId};
use crate::{Error, ErrorCode};

/// Anything larger is refused before it is parsed.
pub const MAX_CLIENT_FRAME_BYTES: usize = 128 * 1024;

/// API Gateway's frame limit: no server frame may be larger.
pub const MAX_SERVER_FRAME_BYTES: usize = 32 * 1024;

/// The most characters one `chunk` frame carries: even fully escaped (6 bytes a character) it
/// stays inside API Gateway's 32 KiB frame.
pub const CHUNK_MAX_CHARS: usize = 4096;

/// `text` in pieces of at most `max` characters.
pub fn split_chars(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .char_indices()
            .nth(max)
            .map_or(rest.len(), |(index, _)| index);
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// A frame from the browser, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Auth {
        token: String,
        /// The last `seq` the client holds, when it resumes.
        resume_after: Option<i64>,
    },
    Message {
        text: MessageText,
        client_message_id: Option<ClientMessageId>,
    },
    Ping,
    /// Stop the reply to this user message.
    Cancel {
        reply_to: MessageId,
    },
    /// A new reply to this user message (PROTOCOL §2 "Branches").
    Regenerate {
        reply_to: MessageId,
    },
    /// A new user message beside `message_id`.
    Edit {
        message_id: MessageId,
        text: MessageText,
        client_message_id: Option<ClientMessageId>,
    },
    /// Move the head to the newest message of the branches through `message_id`.
    Head {
        message_id: MessageId,
    },
}

/// The wire shape; unknown fields are ignored. Its schema is the client frames' in the AsyncAPI
/// document (`crate::asyncapi`).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[schema(as = ClientFrame)]
pub(crate) enum RawFrame {
    /// First on a socket, and again to renew the token.
    Auth {
        /// The portal's JWT.
        token: String,
        /// The largest `seq` the client holds, when it resumes.
        #[serde(default)]
        resume_after: Option<i64>,
    },
    /// A user message.
    Message {
        /// 1 to 8000 characters once trimmed.
        #[schema(min_length = 1)]
        text: String,
        /// The client's own id for the message: a repeat is stored and answered once.
        #[serde(default)]
        #[schema(format = Uuid)]
        client_message_id: Option<String>,
    },
    /// Answered with `pong`.
    Ping,
    /// Stop the reply to a user message.
    Cancel {
        /// The user message whose reply stops.
        #[schema(format = Uuid)]
        reply_to: String,
    },
    /// A new reply to a user message; one still streaming for it is cancelled first. The
    /// earlier replies stay, as siblings. No answer of its own: every socket, the sender's too,
    /// is sent `typing` and `head` before the job is queued.
    Regenerate {
        /// The user message answered again.
        #[schema(format = Uuid)]
        reply_to: String,
    },
    /// A new user message beside another (same parent), answered like a `message`.
    Edit {
        /// The user message edited: it and what follows it stay, on their branch.
        #[schema(format = Uuid)]
        message_id: String,
        /// 1 to 8000 characters once trimmed.
        #[schema(min_length = 1)]
        text: String,
        /// As a `message`'s.
        #[serde(default)]
        #[schema(format = Uuid)]
        client_message_id: Option<String>,
    },
    /// Show another branch: the head moves to the newest message of the branches through
    /// `message_id`.
    Head {
        #[schema(format = Uuid)]
        message_id: String,
    },
}

/// The client frame types, as API Gateway's route selection sees them.
pub const CLIENT_FRAME_TYPES: [&str; 7] = [
    "auth",
    "message",
    "ping",
    "cancel",
    "regenerate",
    "edit",
    "head",
];

#[derive(Deserialize)]
struct FrameType {
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
}

impl ClientFrame {
    pub fn parse(raw: &str) -> Result<Self, Error> {
        if raw.len() > MAX_CLIENT_FRAME_BYTES {
            return Err(Error::TooLarge(format!(
                "frames are limited to {} KiB",
                MAX_CLIENT_FRAME_BYTES / 1024
            )));
        }
        let frame: RawFrame = serde_json::from_str(raw).map_err(|e| describe(raw, e))?;
        Ok(match frame {
            RawFrame::Auth {
                token,
                resume_after,
            } => {
                if resume_after.is_some_and(|seq| seq < 0) {
                    return Err(Error::BadRequest("resume_after is a seq: 0 or more".into()));
                }
                Self::Auth {
                    token,
                    resume_after,
                }
            }
            RawFrame::Ping => Self::Ping,
            RawFrame::Cancel { reply_to } => Self::Cancel {
                reply_to: reply_to.parse()?,
            },
            RawFrame::Message {
                text,
                client_message_id,
            } => Self::Message {
                text: MessageText::parse(&text)?,
                client_message_id: client_message_id.as_deref().map(str::parse).transpose()?,
            },
            RawFrame::Regenerate { reply_to } => Self::Regenerate {
                reply_to: reply_to.parse()?,
            },
            RawFrame::Edit {
                message_id,
                text,
                client_message_id,
            } => Self::Edit {
                message_id: message_id.parse()?,
                text: MessageText::parse(&text)?,
                client_message_id: client_message_id.as_deref().map(str::parse).transpose()?,
            },
            RawFrame::Head { message_id } => Self::Head {
                message_id: message_id.parse()?,
            },
        })
    }

    /// The `client_message_id` of a `message` or `edit` frame, read leniently (the rest of the frame may
    /// be what is refused): what a refusal carries back.
    pub fn client_message_id_of(raw: &str) -> Option<ClientMessageId> {
        #[derive(Deserialize)]
        struct Ids {
            #[serde(rename = "type")]
            kind: Option<serde_json::Value>,
            client_message_id: Option<serde_json::Value>,
        }
        if raw.len() > MAX_CLIENT_FRAME_BYTES {
            return None;
        }
        let ids: Ids = serde_json::from_str(raw).ok()?;
        if !matches!(ids.kind?.as_str(), Some("message" | "edit")) {
            return None;
        }
        ids.client_message_id?.as_str()?.parse().ok()
    }

    /// The route API Gateway would pick (`$request.body.type`).
    pub fn route_of(raw: &str) -> Option<String> {
        match serde_json::from_str::<FrameType>(raw).ok()?.kind? {
            serde_json::Value::String(kind) => Some(kind),
            _ => None,
        }
    }
}

/// Says what is wrong with a frame that did not deserialize, in the protocol's words.
fn describe(raw: &str, err: serde_json::Error) -> Error {
    if err.is_syntax() || err.is_eof() {
        return Error::BadRequest("frames must be JSON objects".into());
    }
    match ClientFrame::route_of(raw) {
        None => Error::BadRequest("frames need a string `type`".into()),
        Some(kind) if !CLIENT_FRAME_TYPES.contains(&kind.as_str()) => {
            Error::BadRequest(format!("unknown frame type `{kind}`"))
        }
        Some(kind) => Error::BadRequest(format!("malformed `{kind}` frame: {err}")),
    }
}

/// A frame to the browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The socket is authenticated.
    AuthOk {
        conversation_id: ConversationId,
        user_id: UserId,
        /// The conversation's newest `seq`.
        last_seq: i64,
        /// The end of the conversation's current branch; `None` while it is empty.
        head_id: Option<MessageId>,
    },
    /// What a resuming client missed, oldest first, split over frames (`more` on all but the
    /// last); `recovered: false` (and no messages) when too much was missed.
    Replay {
        messages: Vec<MessageView>,
        recovered: bool,
        more: bool,
    },
    /// A user message stored from another socket of the conversation.
    Message {
        conversation_id: ConversationId,
        message_id: MessageId,
        seq: i64,
        role: MessageRole,
        /// The text, when the frame fits in [`MAX_SERVER_FRAME_BYTES`] with it; otherwise
        /// absent, and the client reads the message by `seq` through the history API.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        created_at: DateTime<Utc>,
        client_message_id: Option<ClientMessageId>,
        /// The message it follows.
        parent_id: Option<MessageId>,
        /// The id its reply will take.
        reply_id: MessageId,
    },
    /// A message was accepted: the agent is on it.
    Typing { conversation_id: ConversationId },
    /// The user message is stored, and will be answered.
    Ack {
        conversation_id: ConversationId,
        message_id: MessageId,
        client_message_id: Option<ClientMessageId>,
        seq: i64,
        /// The message it follows.
        parent_id: Option<MessageId>,
        /// The id its reply will take.
        reply_id: MessageId,
    },
    /// The conversation's current branch changed (a regenerate, an edit, a move of the head
    /// from any socket or the REST API): it ends at `head_id`.
    Head {
        conversation_id: ConversationId,
        head_id: Option<MessageId>,
        /// When the head is a user message whose reply has not started: the id that reply will
        /// take.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_id: Option<MessageId>,
    },
    /// A piece of a streaming reply.
    Chunk {
        conversation_id: ConversationId,
        message_id: MessageId,
        reply_to: MessageId,
        /// Characters of the reply before `delta`.
        offset: usize,
        delta: String,
        /// Discard the partial text: the reply restarted (offset 0).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
    },
    /// The reply, stored.
    Response {
        /// The whole reply, when it fits in one frame; otherwise absent, and the client
        /// rebuilds it from the chunks or the history API.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        conversation_id: ConversationId,
        message_id: MessageId,
        reply_to: MessageId,
        seq: i64,
        stop_reason: StopReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    /// A refusal or a failure; the socket stays open.
    Error {
        code: ErrorCode,
        message: String,
        /// The refused `message` frame's own id, when it had one (PROTOCOL §2): the client
        /// knows which pending message was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_message_id: Option<ClientMessageId>,
    },
    /// The answer to `ping`.
    Pong,
}

/// Where a reply's `chunk` frames belong: the reply, the user message it answers, its
/// conversation.
#[derive(Debug, Clone, Copy)]
pub struct ChunkOf {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub reply_to: MessageId,
}

impl ChunkOf {
    /// `text` as `chunk` frames of at most [`CHUNK_MAX_CHARS`] characters, the first starting
    /// at `offset` (and carrying `reset`, when given).
    pub fn chunks(self, offset: usize, text: &str, reset: bool) -> Vec<ServerFrame> {
        let mut offset = offset;
        split_chars(text, CHUNK_MAX_CHARS)
            .enumerate()
            .map(|(i, delta)| {
                let chunk = ServerFrame::Chunk {
                    conversation_id: self.conversation_id,
                    message_id: self.message_id,
                    reply_to: self.reply_to,
                    offset,
                    delta: delta.to_owned(),
                    reset: reset && i == 0,
                };
                offset += delta.chars().count();
                chunk
            })
            .collect()
    }
}

impl ServerFrame {
    /// The `error` frame for an error; internal causes are logged, not sent.
    pub fn error(err: &Error) -> Self {
        if err.code() == ErrorCode::Internal {
            tracing::error!(error = err as &dyn std::error::Error, "route failed");
        }
        Self::Error {
            code: err.code(),
            message: err.public_message(),
            client_message_id: None,
        }
    }

    /// The `error` frame refusing a `message` frame, carrying its `client_message_id`.
    pub fn refusal(err: &Error, client_message_id: Option<ClientMessageId>) -> Self {
        match Self::error(err) {
            Self::Error { code, message, .. } => Self::Error {
                code,
                message,
                client_message_id,
            },
            other => other,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn code(raw: &str) -> ErrorCode {
        ClientFrame::parse(raw).unwrap_err().code()
    }

    #[test]
    fn split_chars_keeps_characters_whole() {
        let pieces: Vec<&str> = split_chars("aébc€d", 2).collect();
        assert_eq!(pieces, vec!["aé", "bc", "€d"]);
        assert_eq!(split_chars("", 3).count(), 0);
        assert_eq!(split_chars("abc", 10).collect::<Vec<_>>(), vec!["abc"]);
    }

    #[test]
    fn client_frames_parse_and_ignore_unknown_fields() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"auth","token":"t","extra":1}"#).unwrap(),
            ClientFrame::Auth {
                token: "t".into(),
                resume_after: None
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
        let id = ClientMessageId::new();
        let frame = json!({"type": "message", "text": " hi ", "client_message_id": id});
        assert_eq!(
            ClientFrame::parse(&frame.to_string()).unwrap(),
            ClientFrame::Message {
                text: MessageText::parse("hi").unwrap(),
                client_message_id: Some(id)
            }
        );
    }

    #[test]
    fn bad_client_frames_get_the_contract_codes() {
        for raw in [
            "",
            "not json",
            "[1]",
            "{}",
            r#"{"type":5}"#,
            r#"{"type":"shout"}"#,
            r#"{"type":"auth"}"#,
            r#"{"type":"message"}"#,
            r#"{"type":"message","text":"  "}"#,
            r#"{"type":"message","text":"x","client_message_id":"nope"}"#,
        ] {
            assert_eq!(code(raw), ErrorCode::BadRequest, "{raw}");
        }
        let long = json!({"type": "message", "text": "a".repeat(8001)}).to_string();
        assert_eq!(code(&long), ErrorCode::TooLarge);
        let huge = format!(
            r#"{{"type":"message","text":"{}""#,
            "a".repeat(MAX_CLIENT_FRAME_BYTES)
        );
        assert_eq!(code(&huge), ErrorCode::TooLarge, "refused before parsing");
        assert!(
            ClientFrame::parse(r#"{"type":"shout"}"#)
                .unwrap_err()
                .to_string()
                .contains("shout")
        );
    }

    #[test]
    fn server_frames_use_the_protocol_words() {
        let conversation_id = ConversationId::new();
        let frame = ServerFrame::Typing { conversation_id };
        assert_eq!(
            serde_json::to_value(&frame).unwrap(),
            json!({"type": "typing", "conversation_id": conversation_id})
        );
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
        let err = ServerFrame::error(&Error::Forbidden("no".into()));
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"type": "error", "code": "forbidden", "message": "no"})
        );
        let internal = ServerFrame::error(&Error::Internal("secret detail".into()));
        assert!(!internal.to_json().contains("secret"));
    }
}
