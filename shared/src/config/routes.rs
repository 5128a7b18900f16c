//! The WebSocket routes' limits: messages per connection and per user, open sockets per user
//! and per conversation, and how long a socket may stay unauthenticated.

use std::time::Duration;

use super::{ConfigError, Lookup, defaulted, defaulted_number};
/// How many `message` frames may be sent per window: at most `messages` per `window_seconds`.
/// One limit counts a connection's frames in a fixed window; another counts a user's stored
/// messages across all their sockets in a sliding one (see [`Limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub messages: u32,
    pub window_seconds: u32,
}

/// What the message route enforces besides authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `message` frames per connection: a flood from one socket.
    pub connection: RateLimit,
    /// Messages per user, whichever sockets they come from: reconnecting or opening more
    /// sockets does not reset it.
    pub user: RateLimit,
}

/// How many authenticated sockets may be open at once, per user (in a tenant) and per
/// conversation: a reply fans out to every socket of its conversation, every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketCaps {
    pub per_user: u32,
    pub per_conversation: u32,
}

impl Limits {
    /// `WS_RATE_LIMIT_MESSAGES` per `WS_RATE_LIMIT_WINDOW_SECONDS` per connection, and
    /// `WS_USER_RATE_LIMIT_MESSAGES` per `WS_USER_RATE_LIMIT_WINDOW_SECONDS` per user (by
    /// default more than a person types, far less than a script sends).
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let read = |messages, seconds| -> Result<RateLimit, ConfigError> {
            Ok(RateLimit {
                messages: defaulted_number(&lookup, messages)?,
                window_seconds: defaulted_number(&lookup, seconds)?,
            })
        };
        Ok(Self {
            connection: read("WS_RATE_LIMIT_MESSAGES", "WS_RATE_LIMIT_WINDOW_SECONDS")?,
            user: read(
                "WS_USER_RATE_LIMIT_MESSAGES",
                "WS_USER_RATE_LIMIT_WINDOW_SECONDS",
            )?,
        })
    }
}

/// The table's defaults.
impl Default for Limits {
    fn default() -> Self {
        Self::from_lookup(|_: &str| None).expect("the variables table's defaults read")
    }
}

impl SocketCaps {
    /// `WS_MAX_SOCKETS_PER_USER` and `WS_MAX_SOCKETS_PER_CONVERSATION`: by default, a person
    /// has a few tabs open, a conversation a few viewers.
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            per_user: defaulted_number(&lookup, "WS_MAX_SOCKETS_PER_USER")?,
            per_conversation: defaulted_number(&lookup, "WS_MAX_SOCKETS_PER_CONVERSATION")?,
        })
    }
}

/// The table's defaults.
impl Default for SocketCaps {
    fn default() -> Self {
        Self::from_lookup(|_: &str| None).expect("the variables table's defaults read")
    }
}

/// How long a socket may stay unauthenticated (`WS_AUTH_DEADLINE_SECONDS`, as the local
/// gateway's `--auth-timeout`).
pub fn auth_deadline(lookup: impl Lookup) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(defaulted(
        &lookup,
        "WS_AUTH_DEADLINE_SECONDS",
    )?))
}
