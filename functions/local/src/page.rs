//! The demo chat page, embedded in the binary: no build step.

use axum::Router;
use axum::response::Html;
use axum::routing::get;

const CHAT_PAGE: &str = include_str!("../static/chat.html");

pub fn router() -> Router {
    Router::new().route("/", get(|| async { Html(CHAT_PAGE) }))
}
