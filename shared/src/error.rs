//! The one error type of the shared layer, and the contract's error codes it maps to.
//!
//! Each boundary (REST response, `error` frame, SQS batch failure) turns an [`Error`] into its
//! own shape through [`Error::code`] and [`Error::public_message`]; internal causes stay in the
//! logs and never reach a client.

use serde::{Deserialize, Serialize};

/// The error codes of PROTOCOL §2/§3, shared by `error` frames and REST error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    RateLimited,
    AgentFailed,
    Internal,
}

impl ErrorCode {
    /// The HTTP status a REST response carries for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthenticated => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::TooLarge => 413,
            Self::RateLimited => 429,
            Self::AgentFailed => 502,
            Self::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::AgentFailed => "agent_failed",
            Self::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input or a bad field; the message says which.
    #[error("{0}")]
    BadRequest(String),
    /// No token, or one that does not verify.
    #[error("{0}")]
    Unauthenticated(String),
    /// A verified caller without access to the tenant or conversation.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A route that exists, asked with a method it does not answer (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Over one of the contract's size limits.
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    RateLimited(String),
    /// The agent gave up after its retries.
    #[error("{0}")]
    AgentFailed(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("redis error")]
    Redis(#[from] redis::RedisError),
    /// A call to another service (SQS, the connection-management API) failed; the source is
    /// the SDK's error, with its whole chain.
    #[error("{operation} failed")]
    Upstream {
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Anything else that is our fault; the cause is logged, not shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A failed call to another service, keeping the SDK's error as the source.
    pub fn upstream(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Upstream {
            operation,
            source: Box::new(source),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) | Self::MethodNotAllowed(_) => ErrorCode::BadRequest,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::RateLimited(_) => ErrorCode::RateLimited,
            Self::AgentFailed(_) => ErrorCode::AgentFailed,
            Self::Database(_)
            | Self::Migration(_)
            | Self::Redis(_)
            | Self::Upstream { .. }
            | Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The HTTP status of a REST response carrying this error.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::MethodNotAllowed(_) => 405,
            other => other.code().http_status(),
        }
    }

    /// What a client may be told: the message for its own mistakes, nothing of our internals.
    pub fn public_message(&self) -> String {
        match self {
            Self::Database(_)
            | Self::Migration(_)
            | Self::Redis(_)
            | Self::Upstream { .. }
            | Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }
}

/// Turns a named constraint violation into a precise error instead of an opaque 500.
pub trait ResultExt<T> {
    fn on_constraint(self, name: &str, map: impl FnOnce() -> Error) -> Result<T, Error>;
}

impl<T, E: Into<Error>> ResultExt<T> for Result<T, E> {
    fn on_constraint(self, name: &str, map: impl FnOnce() -> Error) -> Result<T, Error> {
        self.map_err(|e| match e.into() {
            Error::Database(sqlx::Error::Database(db)) if db.constraint() == Some(name) => map(),
            other => other,
        })
    }
}
