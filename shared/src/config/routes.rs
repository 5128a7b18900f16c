//! The WebSocket routes' limits: messages per connection and per user, open sockets per user
//! and per conversation, and how long a socket may stay unauthenticated.

use std::time::Duration;

use super::{ConfigError, Lookup, number, positive};
use crate::db::message_path::{Limits, RateLimit, SocketCaps};

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
