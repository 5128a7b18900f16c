//! The four WebSocket routes as API Gateway invokes them: an
//! `ApiGatewayWebsocketProxyRequest` in, an `ApiGatewayProxyResponse` out, through one edge
//! ([`answer`], with a [`Handler`] per route). The Lambdas ([`run`]) and the local gateway
//! ([`Route::handle`]) call that same edge.
//!
//! A route's response body is the route response (`auth_ok`, `ack`, `pong`, `error`) that API
//! Gateway sends back to the caller; frames that must arrive earlier (`typing`) or before the
//! socket is closed (a failed `auth`) go through [`Delivery`].

pub mod auth;
pub mod connect;
pub mod disconnect;
pub mod message;
pub mod routes;
pub mod sweep;

pub use routes::{ROUTES, Route, route_key};

use std::future::Future;
use std::sync::Arc;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use tracing::Instrument;

use crate::Error;
use crate::auth::TokenVerifier;
use crate::config::routes::{Limits, SocketCaps};
use crate::config::{
    AuthConfig, ConfigError, DatabaseConfig, Lookup, Mode, management_endpoint, redis_prefix,
};
use crate::db::Db;
use crate::delivery::{Delivery, ManagementApi, Posted, post_or_forget};
use crate::domain::ConnectionId;
use crate::frame::ServerFrame;
use crate::queue::{JobQueue, RedisQueue, SqsQueue};
use crate::secrets::Secrets;

/// What every route needs: the database and the way to the sockets. Each route's function
/// builds this and what its own route needs besides ([`AuthRoute`], [`MessageRoute`]) and
/// nothing else: `$connect` and `$disconnect` hold no token key and no queue client.
#[derive(Clone)]
pub struct Edge {
    pub db: Db,
    pub delivery: Arc<dyn Delivery>,
    /// Replaces the endpoint derived from each event (`WS_MANAGEMENT_ENDPOINT`).
    pub management_endpoint: Option<String>,
}

impl Edge {
    /// `ws-connect`'s and `ws-disconnect`'s state (PROTOCOL §4): the database URL (or its
    /// secret) and the management endpoint. Opens no connection: the pool connects on first use.
    pub async fn load(
        lookup: impl Lookup,
        aws: &aws_config::SdkConfig,
        secrets: &Secrets,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            db: Db::connect_lazy(&DatabaseConfig::load(&lookup, secrets).await?),
            delivery: Arc::new(ManagementApi::new(aws.clone())),
            management_endpoint: management_endpoint(&lookup)?,
        })
    }

    /// Sends a frame to a connection; a connection found gone is forgotten on the spot.
    pub async fn post(
        &self,
        endpoint: &str,
        connection: &ConnectionId,
        frame: &ServerFrame,
    ) -> Result<Posted, Error> {
        post_or_forget(
            &self.db,
            self.delivery.as_ref(),
            endpoint,
            connection,
            frame,
        )
        .await
    }
}

/// What `auth` needs: the edge, the token key, the caps on open sockets, and the rate limits
/// (`auth` frames count as messages do).
#[derive(Clone)]
pub struct AuthRoute {
    pub edge: Edge,
    pub tokens: TokenVerifier,
    pub caps: SocketCaps,
    pub limits: Limits,
}

impl AuthRoute {
    /// `ws-auth`'s state: the edge, the portal's token key (its secret read at the same time as
    /// the database's: a cold start waits for one round trip, not two) and the socket caps.
    pub async fn load(
        lookup: impl Lookup,
        aws: &aws_config::SdkConfig,
        secrets: &Secrets,
    ) -> Result<Self, ConfigError> {
        let (edge, auth) = tokio::try_join!(
            Edge::load(&lookup, aws, secrets),
            AuthConfig::load(&lookup, secrets)
        )?;
        Ok(Self {
            edge,
            tokens: TokenVerifier::new(&auth),
            caps: SocketCaps::from_lookup(&lookup)?,
            limits: Limits::from_lookup(&lookup)?,
        })
    }
}

/// What `message`, `ping` and `$default` need: the edge, the queue and the rate limits.
#[derive(Clone)]
pub struct MessageRoute {
    pub edge: Edge,
    pub queue: Arc<dyn JobQueue>,
    pub limits: Limits,
}

impl MessageRoute {
    /// `ws-message`'s state: the edge, the queue of the mode (SQS or Redis) and the rate limits.
    pub async fn load(
        lookup: impl Lookup,
        aws: &aws_config::SdkConfig,
        secrets: &Secrets,
    ) -> Result<Self, ConfigError> {
        let queue: Arc<dyn JobQueue> = match Mode::from_lookup(&lookup)? {
            Mode::Aws { queue_url } => Arc::new(SqsQueue {
                client: aws_sdk_sqs::Client::new(aws),
                queue_url,
            }),
            Mode::Local { redis_url } => Arc::new(
                RedisQueue::new(&redis_url, &redis_prefix(&lookup))
                    .map_err(|e| ConfigError::new("REDIS_URL", e.to_string()))?,
            ),
        };
        Ok(Self {
            edge: Edge::load(&lookup, aws, secrets).await?,
            queue,
            limits: Limits::from_lookup(&lookup)?,
        })
    }
}

/// Every route at once, for one process serving them all (`konstruct-local`, tests).
#[derive(Clone)]
pub struct WsState {
    pub auth: AuthRoute,
    pub message: MessageRoute,
}

impl WsState {
    pub fn new(
        edge: Edge,
        tokens: TokenVerifier,
        queue: Arc<dyn JobQueue>,
        limits: Limits,
        caps: SocketCaps,
    ) -> Self {
        Self {
            auth: AuthRoute {
                edge: edge.clone(),
                tokens,
                caps,
                limits,
            },
            message: MessageRoute {
                edge,
                queue,
                limits,
            },
        }
    }

    pub fn edge(&self) -> &Edge {
        &self.auth.edge
    }
}

impl Route {
    /// Serves one event with this handler, every route's state at hand (one process serving
    /// them all: `konstruct-local`, tests).
    pub async fn handle(
        self,
        state: &WsState,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> ApiGatewayProxyResponse {
        // Boxed: the nested futures of a route are deep enough to exhaust the compiler's layout
        // recursion in release builds; one allocation per event is nothing beside the I/O.
        match self {
            Self::Connect => Box::pin(answer::<connect::Connect>(state.edge(), event)).await,
            Self::Auth => Box::pin(answer::<auth::Auth>(&state.auth, event)).await,
            Self::Message => Box::pin(answer::<message::Message>(&state.message, event)).await,
            Self::Disconnect => {
                Box::pin(answer::<disconnect::Disconnect>(state.edge(), event)).await
            }
        }
    }
}

/// A route's own work behind the edge every route shares ([`answer`]): the edge checks the
/// event (its connection, its endpoint, a text body), opens the route's span, and answers with
/// the frame [`Handler::answer`] returns (nothing: a bare 200); a refusal is the handler's to
/// answer ([`Handler::refuse`]).
pub trait Handler {
    /// What the handler runs on: every route's state holds the [`Edge`].
    type State: AsRef<Edge> + Sync;
    /// The route's name in its span.
    const NAME: &'static str;

    /// The frame the route answers with (its route response), if any.
    fn answer(
        state: &Self::State,
        route: &RouteEvent,
    ) -> impl Future<Output = Result<Option<ServerFrame>, Error>> + Send;

    /// How a refusal is answered; `route` is `None` when the event itself was refused.
    fn refuse(
        state: &Self::State,
        event: &ApiGatewayWebsocketProxyRequest,
        route: Option<&RouteEvent>,
        err: Error,
    ) -> impl Future<Output = ApiGatewayProxyResponse> + Send;
}

impl AsRef<Edge> for Edge {
    fn as_ref(&self) -> &Edge {
        self
    }
}

impl AsRef<Edge> for AuthRoute {
    fn as_ref(&self) -> &Edge {
        &self.edge
    }
}

impl AsRef<Edge> for MessageRoute {
    fn as_ref(&self) -> &Edge {
        &self.edge
    }
}

/// Serves one event with `H`: the one edge of every route, in the Lambdas and the local
/// gateway alike.
pub async fn answer<H: Handler>(
    state: &H::State,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let span = tracing::info_span!(
        "route",
        route = H::NAME,
        connection_id = tracing::field::Empty,
        conversation_id = tracing::field::Empty,
        message_id = tracing::field::Empty,
    );
    async {
        let route = match RouteEvent::parse(&event, state.as_ref().management_endpoint.as_deref()) {
            Ok(route) => route,
            Err(err) => return H::refuse(state, &event, None, err).await,
        };
        tracing::Span::current().record("connection_id", route.connection_id.as_str());
        match H::answer(state, &route).await {
            Ok(Some(frame)) => reply(&frame),
            Ok(None) => status(200),
            Err(err) => H::refuse(state, &event, Some(&route), err).await,
        }
    }
    .instrument(span)
    .await
}

/// Runs one route's handler as a Lambda function until the runtime stops it.
pub async fn run<H: Handler>(state: H::State) -> Result<(), lambda_runtime::Error> {
    let state = &state;
    crate::lambda::serve(
        move |event: lambda_runtime::LambdaEvent<ApiGatewayWebsocketProxyRequest>| async move {
            Ok(answer::<H>(state, event.payload).await)
        },
    )
    .await
}

/// What every route event must carry, checked.
#[derive(Debug, Clone)]
pub struct RouteEvent {
    pub connection_id: ConnectionId,
    /// The connection-management endpoint that reaches this connection.
    pub endpoint: String,
    pub body: Option<String>,
    /// The URL's `conversation_id` (only `$connect`'s event has a URL).
    pub conversation_id: Option<String>,
}

impl RouteEvent {
    pub fn parse(
        event: &ApiGatewayWebsocketProxyRequest,
        endpoint_override: Option<&str>,
    ) -> Result<Self, Error> {
        let context = &event.request_context;
        let connection_id = ConnectionId::parse(
            context
                .connection_id
                .as_deref()
                .ok_or_else(|| Error::BadRequest("event has no connection id".into()))?,
        )?;
        let endpoint = match endpoint_override {
            Some(endpoint) => endpoint.to_owned(),
            None => {
                let domain = context
                    .domain_name
                    .as_deref()
                    .ok_or_else(|| Error::BadRequest("event has no domain name".into()))?;
                let stage = context
                    .stage
                    .as_deref()
                    .ok_or_else(|| Error::BadRequest("event has no stage".into()))?;
                format!("https://{domain}/{stage}")
            }
        };
        if event.is_base64_encoded {
            return Err(Error::BadRequest("frames must be JSON text".into()));
        }
        Ok(Self {
            connection_id,
            endpoint,
            body: event.body.clone(),
            conversation_id: event
                .query_string_parameters
                .first("conversation_id")
                .map(str::to_owned),
        })
    }

    /// The frame's text; an empty frame is malformed.
    pub fn body(&self) -> Result<&str, Error> {
        self.body
            .as_deref()
            .ok_or_else(|| Error::BadRequest("frames must be JSON objects".into()))
    }
}

/// A response whose body API Gateway returns to the caller as one frame.
pub fn reply(frame: &ServerFrame) -> ApiGatewayProxyResponse {
    let mut response = status(200);
    response.body = Some(Body::Text(frame.to_json()));
    response
}

/// A response without a frame.
pub fn status(code: u16) -> ApiGatewayProxyResponse {
    let mut response = ApiGatewayProxyResponse::default();
    response.status_code = i64::from(code);
    response
}
