//! The WebSocket routes' limits: messages per connection and per user, open sockets per user
//! and per conversation, and how long a socket may stay unauthenticated.

use std::time::Duration;

use super::{ConfigError, Lookup, number, positive};
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
    /// `WS_RATE_LIMIT_MESSAGES` per `WS_RATE_LIMIT_WINDOW_SECONDS` per connection (default 20
    /// per 10 s), and `WS_USER_RATE_LIMIT_MESSAGES` per `WS_USER_RATE_LIMIT_WINDOW_SECONDS` per
    /// user (default 60 per 60 s: more than a person types, far less than a script sends).
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let read = |default: RateLimit, messages, seconds| -> Result<RateLimit, ConfigError> {
            Ok(RateLimit {
                messages: number(&lookup, messages)?.unwrap_or(default.messages),
                window_seconds: number(&lookup, seconds)?.unwrap_or(default.window_seconds),
            })
        };
        let defaults = Self::default();
        Ok(Self {
            connection: read(
                defaults.connection,
                "WS_RATE_LIMIT_MESSAGES",
                "WS_RATE_LIMIT_WINDOW_SECONDS",
            )?,
            user: read(
                defaults.user,
                "WS_USER_RATE_LIMIT_MESSAGES",
                "WS_USER_RATE_LIMIT_WINDOW_SECONDS",
            )?,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connection: RateLimit {
                messages: 20,
                window_seconds: 10,
            },
            user: RateLimit {
                messages: 60,
                window_seconds: 60,
            },
        }
    }
}

impl SocketCaps {
    /// `WS_MAX_SOCKETS_PER_USER` (default 20) and `WS_MAX_SOCKETS_PER_CONVERSATION` (default
    /// 50): a person has a few tabs open, a conversation a few viewers.
    pub fn from_lookup(lookup: impl Lookup) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            per_user: number(&lookup, "WS_MAX_SOCKETS_PER_USER")?.unwrap_or(defaults.per_user),
            per_conversation: number(&lookup, "WS_MAX_SOCKETS_PER_CONVERSATION")?
                .unwrap_or(defaults.per_conversation),
        })
    }
}

impl Default for SocketCaps {
    fn default() -> Self {
        Self {
            per_user: 20,
            per_conversation: 50,
        }
    }
}

/// How long a socket may stay unauthenticated (`WS_AUTH_DEADLINE_SECONDS`, default 10, as the
/// local gateway's `--auth-timeout`).
pub fn auth_deadline(lookup: impl Lookup) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(
        positive(&lookup, "WS_AUTH_DEADLINE_SECONDS")?.unwrap_or(10),
    ))
}
