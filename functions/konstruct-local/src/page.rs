//! The demo chat page and the browser client module it uses (`/konstruct-chat.js`, for the
//! portal's developers too), embedded in the binary: no build step.

use axum::Router;
use axum::http::header;
use axum::response::Html;
use axum::routing::get;

const CHAT_PAGE: &str = include_str!("../static/chat.html");
const CLIENT_MODULE: &str = include_str!("../static/konstruct-chat.js");

pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { Html(CHAT_PAGE) }))
        .route(
            "/konstruct-chat.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    CLIENT_MODULE,
                )
            }),
        )
}
