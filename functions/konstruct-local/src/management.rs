//! API Gateway's connection-management API (`@connections`) as the local gateway serves it: post
//! to a socket, read it, close it; 410 `GoneException` for a socket that is not open, 429
//! `LimitExceededException` past the account's quota when one is set, and only to callers on
//! this machine.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use shared::domain::ConnectionId;
use shared::{Error, ErrorCode};

use crate::gateway::Gateway;

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route(
            "/@connections/{id}",
            post(management_post)
                .get(management_get)
                .delete(management_delete)
                .route_layer(axum::middleware::from_fn(this_machine_only)),
        )
        .route(
            "/@quota",
            get(management_quota).route_layer(axum::middleware::from_fn(this_machine_only)),
        )
}

/// API Gateway's account-wide quota on connection-management calls: a token bucket (a rate a
/// second and a burst); a post past it is answered 429 `LimitExceededException`, and counted.
pub struct ManagementQuota {
    limiter: governor::DefaultDirectRateLimiter,
    throttled: std::sync::atomic::AtomicU64,
}

impl ManagementQuota {
    pub fn new(per_second: std::num::NonZeroU32, burst: std::num::NonZeroU32) -> Self {
        Self {
            limiter: governor::RateLimiter::direct(
                governor::Quota::per_second(per_second).allow_burst(burst),
            ),
            throttled: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether a call may pass now; one that may not is counted.
    fn admit(&self) -> bool {
        let admitted = self.limiter.check().is_ok();
        if !admitted {
            self.throttled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admitted
    }
}

fn gone() -> Response {
    (
        StatusCode::GONE,
        [("x-amzn-ErrorType", "GoneException")],
        axum::Json(serde_json::json!({ "message": null })),
    )
        .into_response()
}

/// A connection id from the path; one that cannot be an id is as gone as an unknown one.
fn connection(raw: &str) -> Option<ConnectionId> {
    ConnectionId::parse(raw).ok()
}

/// The connection-management API posts to any socket: only this machine may call it (functions
/// under `cargo lambda watch`, the in-process handlers), never a client on the network.
async fn this_machine_only(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            [("x-amzn-ErrorType", "ForbiddenException")],
            axum::Json(serde_json::json!({ "message": "Forbidden" })),
        )
            .into_response();
    }
    next.run(request).await
}

async fn management_post(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if gateway
        .management_quota
        .as_ref()
        .is_some_and(|quota| !quota.admit())
    {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("x-amzn-ErrorType", "LimitExceededException")],
            axum::Json(serde_json::json!({ "message": "Too Many Requests" })),
        )
            .into_response();
    }
    let Some(id) = connection(&id) else {
        return gone();
    };
    if body.len() > shared::frame::MAX_SERVER_FRAME_BYTES {
        let err = Error::TooLarge("frames are limited to 32 KiB".into());
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            axum::Json(serde_json::json!({
                "message": err.public_message(), "code": ErrorCode::TooLarge
            })),
        )
            .into_response();
    }
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if gateway.sockets.send_text(&id, text) {
        StatusCode::OK.into_response()
    } else {
        gone()
    }
}

/// The quota's count of throttled calls (`{"throttled": n}`; `null` without a quota): what the
/// AWS path's benchmark reports as 429s seen.
async fn management_quota(State(gateway): State<Arc<Gateway>>) -> Response {
    let throttled = gateway
        .management_quota
        .as_ref()
        .map(|quota| quota.throttled.load(std::sync::atomic::Ordering::Relaxed));
    axum::Json(serde_json::json!({ "throttled": throttled })).into_response()
}

async fn management_get(State(gateway): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    match connection(&id) {
        Some(id) if gateway.sockets.is_open(&id) => axum::Json(serde_json::json!({
            "ConnectedAt": null,
            "Identity": { "SourceIp": "127.0.0.1" },
        }))
        .into_response(),
        _ => gone(),
    }
}

async fn management_delete(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
) -> Response {
    match connection(&id) {
        Some(id) if gateway.sockets.close(&id, 1000, "closed by the server") => {
            StatusCode::NO_CONTENT.into_response()
        }
        _ => gone(),
    }
}
