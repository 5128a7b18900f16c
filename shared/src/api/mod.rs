//! The REST API of PROTOCOL §3 as one axum [`Router`]: `chat-api` serves it through
//! `lambda_http`, the local runtime and the tests mount it as is.

mod conversations;
mod error;

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

pub use error::{ErrorBody, Json, Path, Query};

use crate::Error;
use crate::auth::{PortalCaller, TokenVerifier};
use crate::config::{AuthConfig, ConfigError, CorsConfig, DatabaseConfig, Lookup};
use crate::db::Db;
use crate::delivery::{Delivery, ManagementApi};
use crate::secrets::Secrets;

/// Request bodies here are a few UUIDs; anything larger is refused unread.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the REST handlers need.
#[derive(Clone)]
pub struct ApiState {
    pub db: Db,
    pub tokens: TokenVerifier,
    /// Reaches the conversation's sockets (a moved head is told to each).
    pub delivery: Arc<dyn Delivery>,
}

impl ApiState {
    /// From `DATABASE_URL` and the `PORTAL_JWT_*` variables, or the secrets their `…_ARN`
    /// variables name; connects to nothing yet.
    pub async fn load(
        lookup: impl Lookup,
        aws: &aws_config::SdkConfig,
        secrets: &Secrets,
    ) -> Result<Self, ConfigError> {
        // Both secrets are read at once: a cold start waits for one round trip, not two.
        let (database, auth) = tokio::try_join!(
            DatabaseConfig::load(&lookup, secrets),
            AuthConfig::load(&lookup, secrets)
        )?;
        Ok(Self {
            db: Db::connect_lazy(&database),
            tokens: TokenVerifier::new(&auth),
            delivery: Arc::new(ManagementApi::new(aws.clone())),
        })
    }
}

/// `chat-api`'s state: the router's, and the browser origins that may call it.
pub struct ChatApi {
    pub state: ApiState,
    pub cors: CorsConfig,
}

impl ChatApi {
    pub async fn load(
        lookup: impl Lookup,
        aws: &aws_config::SdkConfig,
        secrets: &Secrets,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            state: ApiState::load(&lookup, aws, secrets).await?,
            cors: CorsConfig::from_lookup(&lookup)?,
        })
    }

    /// The REST API with its CORS layer.
    pub fn router(self) -> Router {
        router(self.state).layer(cors(&self.cors))
    }
}

/// `Authorization: Bearer <jwt>` → the verified caller; `401` otherwise.
impl FromRequestParts<ApiState> for PortalCaller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Error> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|value| {
                value
                    .to_str()
                    .map_err(|_| Error::Unauthenticated("malformed Authorization header".into()))
            })
            .transpose()?;
        state.tokens.verify_bearer(header).await
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route(
            "/api/portal/chat/conversations",
            get(conversations::list).post(conversations::create),
        )
        .route(
            "/api/portal/chat/conversations/{id}/messages",
            get(conversations::history),
        )
        .route(
            "/api/portal/chat/conversations/{id}",
            axum::routing::delete(conversations::reset),
        )
        .route(
            "/api/portal/chat/conversations/{id}/head",
            axum::routing::put(conversations::move_head),
        )
        .route("/api/portal/chat/openapi.json", get(openapi))
        .route("/healthz", get(health))
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            Error::MethodNotAllowed("this route does not answer that method".into())
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The router with the metrics recorded while serving each request written out after it (see
/// [`crate::telemetry::flush`]): what `chat-api` serves on Lambda.
pub fn flushing_metrics(router: Router) -> Router {
    router.layer(axum::middleware::map_response(
        |response: axum::response::Response| async move {
            crate::telemetry::flush();
            response
        },
    ))
}

/// CORS for the portal's origins (`CORS_ALLOWED_ORIGINS`); none configured means same-origin
/// only.
pub fn cors(config: &CorsConfig) -> CorsLayer {
    let origins = match config {
        CorsConfig::Any => AllowOrigin::any(),
        CorsConfig::Origins(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
}

#[derive(Serialize, utoipa::ToSchema)]
struct Health {
    status: &'static str,
}

/// Whether the database answers: checked at most every few seconds, whoever asks.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "The database answers", body = Health),
        (status = 503, description = "The database does not answer", body = ErrorBody),
    )
)]
async fn health(State(state): State<ApiState>) -> axum::response::Response {
    match state.db.health().await {
        true => Json(Health { status: "ok" }).into_response(),
        false => {
            let body = ErrorBody {
                detail: "database unavailable".into(),
                code: crate::ErrorCode::Internal,
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/portal/chat/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The OpenAPI document of this API"))
)]
async fn openapi() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(&OPENAPI)
}

static OPENAPI: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(ApiDoc::openapi);

/// The OpenAPI document, generated from the handlers and types above.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    OPENAPI.clone()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Konstruct web chat",
        description = "Conversations between portal users and a tenant's AI agents: list, open, \
                       page through and reset them. Every call but the health check and this \
                       document needs a portal token (`Authorization: Bearer <jwt>`)."
    ),
    paths(
        conversations::list,
        conversations::create,
        conversations::history,
        conversations::reset,
        conversations::move_head,
        openapi,
        health,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A portal session token (HS256)"))
                    .build(),
            ),
        );
    }
}
