//! The local WebSocket gateway: what API Gateway does for the deployed system. Each socket gets
//! a connection id; `$connect`, each frame (routed on its `type`) and `$disconnect` become the
//! same `ApiGatewayWebsocketProxyRequest` events the Lambdas receive, handled in-process or by
//! functions running under `cargo lambda watch`; route responses are written back to the
//! socket. It also serves the connection-management API (`/@connections/{id}`) so functions
//! outside the process can reach the sockets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use aws_lambda_events::query_map::QueryMap;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use shared::Error;
use shared::db::{Db, Scope, connections, conversations};
use shared::domain::{ConnectionId, ConversationId, TenantId};
use shared::frame::ServerFrame;
use shared::ws::{Route, WsState, reply, route_key};
use tokio::sync::mpsc;

use crate::sockets::{Outbound, Sockets};

/// How route events reach their handlers.
pub enum Dispatch {
    /// The `shared::ws` handlers, in this process.
    InProcess(Box<WsState>),
    /// Functions under `cargo lambda watch`, through the Lambda invoke API at this URL.
    Lambda { http: reqwest::Client, url: String },
}

impl Dispatch {
    async fn call(
        &self,
        route: Route,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> ApiGatewayProxyResponse {
        match self {
            Self::InProcess(state) => route.handle(state, event).await,
            Self::Lambda { http, url } => {
                let function = route.function();
                let invoked = http
                    .post(format!("{url}/2015-03-31/functions/{function}/invocations"))
                    .json(&event)
                    .send()
                    .await;
                let answer = match invoked {
                    // A function's own error (a panic, a timeout) comes back 200 with this
                    // header, as Lambda's Invoke API answers.
                    Ok(r) if r.headers().contains_key("x-amz-function-error") => {
                        tracing::warn!(function, "function failed");
                        None
                    }
                    Ok(r) if r.status().is_success() => {
                        r.json::<ApiGatewayProxyResponse>().await.ok()
                    }
                    Ok(r) => {
                        tracing::warn!(function, status = %r.status(), "invocation failed");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(function, error = %e, "function unreachable");
                        None
                    }
                };
                answer.unwrap_or_else(|| {
                    let mut response = reply(&ServerFrame::error(&Error::Internal(format!(
                        "{function} did not answer"
                    ))));
                    response.status_code = 502;
                    response
                })
            }
        }
    }
}

pub struct Gateway {
    pub sockets: Arc<Sockets>,
    pub dispatch: Dispatch,
    pub db: Db,
    /// The host events name as their domain (`host:port`).
    pub host: String,
    /// A socket that has not authenticated in this time is closed (PROTOCOL §2: 10 s).
    pub auth_timeout: Duration,
    /// API Gateway's limits, which clients can tell: a socket lives at most `max_connection`
    /// (2 hours) and is closed after `idle_timeout` (10 minutes) without a client frame; both
    /// close with 1001 (going away).
    pub max_connection: Duration,
    pub idle_timeout: Duration,
    /// The account's `@connections` quota, when one is set (`serve --management-quota`).
    pub management_quota: Option<crate::management::ManagementQuota>,
}

/// API Gateway's limits on what a client sends: a frame of at most 32 KiB, a message (frames
/// joined) of at most 128 KiB; past either the connection is closed with 1009.
const MAX_CLIENT_FRAME: usize = 32 * 1024;
const MAX_CLIENT_MESSAGE: usize = shared::frame::MAX_CLIENT_FRAME_BYTES;
/// How long `auth` waits for the bridge to subscribe to the socket's conversation.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(1);

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/chat/ws/{conversation_id}", get(ws_by_path))
        .route("/ws", get(ws_by_query))
        .merge(crate::management::routes())
        .with_state(gateway)
}

/// An API Gateway-style connection id: 16 URL-safe characters.
fn new_connection_id() -> ConnectionId {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..12]);
    ConnectionId::parse(&id).expect("base64url is a valid connection id")
}

impl Gateway {
    fn event(
        &self,
        id: &ConnectionId,
        route_key: &str,
        body: Option<String>,
        conversation: Option<&str>,
    ) -> ApiGatewayWebsocketProxyRequest {
        let mut event = ApiGatewayWebsocketProxyRequest::default();
        let context = &mut event.request_context;
        context.connection_id = Some(id.to_string());
        context.route_key = Some(route_key.to_owned());
        context.event_type = Some(Route::for_key(route_key).event_type().to_owned());
        context.domain_name = Some(self.host.clone());
        context.stage = Some("local".to_owned());
        context.apiid = Some("local".to_owned());
        context.request_id = Some(uuid::Uuid::new_v4().to_string());
        context.request_time_epoch = now_millis();
        event.body = body;
        if let Some(conversation) = conversation {
            event.query_string_parameters = QueryMap::from(HashMap::from([(
                "conversation_id".to_owned(),
                conversation.to_owned(),
            )]));
        }
        event
    }

    async fn upgrade(
        self: Arc<Self>,
        ws: WebSocketUpgrade,
        conversation: Option<String>,
    ) -> Response {
        let id = new_connection_id();
        let event = self.event(&id, "$connect", None, conversation.as_deref());
        let answer = self.dispatch.call(Route::Connect, event).await;
        if answer.status_code != 200 {
            let status =
                StatusCode::from_u16(answer.status_code as u16).unwrap_or(StatusCode::BAD_REQUEST);
            let body = match answer.body {
                Some(Body::Text(text)) => text,
                _ => String::new(),
            };
            return (status, [("content-type", "application/json")], body).into_response();
        }
        let channel = match conversation.as_deref().map(str::parse) {
            Some(Ok(conversation)) => self
                .tenant_of(conversation)
                .await
                .map(|t| (t, conversation)),
            _ => None,
        };
        ws.max_frame_size(MAX_CLIENT_FRAME)
            .max_message_size(MAX_CLIENT_MESSAGE)
            .on_upgrade(move |socket| self.session(id, socket, channel))
    }

    /// The tenant of the conversation a socket named, to subscribe to its replies.
    async fn tenant_of(&self, conversation: ConversationId) -> Option<TenantId> {
        let read = async {
            let mut tx = self.db.begin(Scope::Conversation(conversation)).await?;
            let found = conversations::find(&mut tx, conversation).await?;
            tx.rollback().await?;
            Ok::<_, Error>(found.map(|c| c.tenant_id))
        };
        read.await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the conversation's tenant");
            None
        })
    }

    /// One socket's life, from the upgrade to `$disconnect`.
    /// `channel` is the tenant and conversation the socket named, when they exist.
    async fn session(
        self: Arc<Self>,
        id: ConnectionId,
        socket: WebSocket,
        channel: Option<(TenantId, ConversationId)>,
    ) {
        let (mut sink, mut stream) = socket.split();
        let (outbound, mut queue) = mpsc::unbounded_channel();
        self.sockets.add(id.clone(), outbound);
        let mut writer = tokio::spawn(async move {
            while let Some(out) = queue.recv().await {
                let message = match out {
                    Outbound::Text(text) => Message::Text(text.into()),
                    Outbound::Close(code, reason) => {
                        let frame = CloseFrame {
                            code,
                            reason: reason.into(),
                        };
                        let _ = sink.send(Message::Close(Some(frame))).await;
                        return;
                    }
                };
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        });
        let deadline = tokio::time::sleep(self.auth_timeout);
        tokio::pin!(deadline);
        let lifetime = tokio::time::sleep(self.max_connection);
        tokio::pin!(lifetime);
        let idle = tokio::time::sleep(self.idle_timeout);
        tokio::pin!(idle);
        let mut authenticated = false;
        // Once a close is under way, no timer fires again (a finished sleep stays ready).
        let mut closing = false;
        loop {
            tokio::select! {
                () = &mut deadline, if !authenticated && !closing => {
                    closing = true;
                    self.sockets.close(&id, 1008, "not authenticated in time");
                }
                () = &mut lifetime, if !closing => {
                    closing = true;
                    self.sockets.close(&id, 1001, "connection lifetime reached");
                }
                () = &mut idle, if !closing => {
                    closing = true;
                    self.sockets.close(&id, 1001, "idle timeout");
                }
                _ = &mut writer => break,
                incoming = stream.next() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
                    match incoming {
                        Some(Ok(Message::Text(text))) => {
                            authenticated |= self.frame(&id, text.as_str(), channel).await;
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let err = Error::BadRequest("frames must be JSON text".into());
                            self.sockets.send_text(&id, ServerFrame::error(&err).to_json());
                        }
                        Some(Err(e)) => {
                            // Over the frame or message limit (or a broken connection): closed
                            // as API Gateway does, with 1009, once the writer has said so.
                            tracing::info!(%id, error = %e, "socket read failed");
                            self.sockets.close(&id, 1009, "message too big");
                            let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
                            break;
                        }
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Ok(_)) => {}
                    }
                }
            }
        }
        self.sockets.remove(&id);
        writer.abort();
        let event = self.event(&id, "$disconnect", None, None);
        self.dispatch.call(Route::Disconnect, event).await;
    }

    /// Routes one frame like API Gateway (`$request.body.type`) and writes the route response
    /// back. Returns whether the socket is now authenticated.
    ///
    /// Before an `auth` is routed, the socket joins its conversation's channel: a reply whose
    /// writer lists it (only once the binding is committed) is published after that, so it
    /// reaches the socket; until then publishers do not name it, so it gets nothing.
    async fn frame(
        &self,
        id: &ConnectionId,
        text: &str,
        channel: Option<(TenantId, ConversationId)>,
    ) -> bool {
        let key = route_key(text);
        let route = Route::for_key(key);
        if route == Route::Auth
            && let Some((tenant, conversation)) = channel
        {
            // Subscribed before the binding commits, so a writer that lists the socket next
            // publishes to a gateway that hears it (not waiting past a second if Redis is away).
            let mut ready = self.sockets.bind(id, tenant, conversation);
            let _ = tokio::time::timeout(SUBSCRIBE_WAIT, ready.wait_for(|s| *s)).await;
        }
        let answer = self
            .dispatch
            .call(route, self.event(id, key, Some(text.to_owned()), None))
            .await;
        let authenticated = route == Route::Auth
            && match self.binding(id).await {
                Ok(Some((tenant, conversation))) => {
                    // Already joined above, unless the conversation could not be read then.
                    drop(self.sockets.bind(id, tenant, conversation));
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "cannot read the binding");
                    false
                }
            };
        if let Some(Body::Text(body)) = answer.body {
            self.sockets.send_text(id, body);
        }
        authenticated
    }

    async fn binding(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<(shared::domain::TenantId, shared::domain::ConversationId)>, Error> {
        let mut tx = self.db.begin(Scope::Connection(id)).await?;
        let row = connections::find(&mut tx, id).await?;
        tx.rollback().await?;
        Ok(row.and_then(|r| Some((r.binding()?.tenant_id, r.conversation_id))))
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn ws_by_path(
    State(gateway): State<Arc<Gateway>>,
    Path(conversation): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    gateway.upgrade(ws, Some(conversation)).await
}

#[derive(Deserialize)]
struct ConnectQuery {
    conversation_id: Option<String>,
}

async fn ws_by_query(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<ConnectQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    gateway.upgrade(ws, query.conversation_id).await
}
