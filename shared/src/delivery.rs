//! Delivery of a frame to one WebSocket connection: API Gateway's connection-management API on
//! AWS (also what the local gateway emulates), the local gateway's socket table in-process.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_apigatewaymanagement::primitives::Blob;

use crate::Error;
use crate::config::orchestrator::FanoutSettings;
use crate::db::message_path::{self, Recipient};
use crate::db::{Db, Scope, connections};
use crate::domain::{ConnectionId, ConversationId, TenantId};
use crate::frame::{MAX_SERVER_FRAME_BYTES, ServerFrame};
use crate::redis_connection::RedisConnection;
use crate::redis_keys::webchat_response_key;
use crate::telemetry::{self, Event, PostOutcome};

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    Delivered,
    /// The socket is closed (`GoneException`, HTTP 410): forget the connection.
    Gone,
}

#[async_trait]
pub trait Delivery: Send + Sync {
    /// Sends one frame to the connection, reachable through `endpoint`.
    async fn post(
        &self,
        endpoint: &str,
        connection: &ConnectionId,
        frame: &ServerFrame,
    ) -> Result<Posted, Error>;

    /// Closes the connection; one already gone is fine.
    async fn close(&self, endpoint: &str, connection: &ConnectionId) -> Result<(), Error>;
}

/// Posts a frame; a connection found gone is forgotten on the spot (PROTOCOL §5.5).
pub async fn post_or_forget(
    db: &Db,
    delivery: &dyn Delivery,
    endpoint: &str,
    connection: &ConnectionId,
    frame: &ServerFrame,
) -> Result<Posted, Error> {
    let started = std::time::Instant::now();
    let posted = delivery.post(endpoint, connection, frame).await;
    let outcome = match &posted {
        Ok(Posted::Delivered) => PostOutcome::Delivered,
        Ok(Posted::Gone) => PostOutcome::Gone,
        Err(_) => PostOutcome::Failed,
    };
    telemetry::record(Event::Post {
        outcome,
        latency: started.elapsed(),
    });
    let posted = posted?;
    if posted == Posted::Gone {
        tracing::info!(%connection, "connection gone; forgetting it");
        let mut tx = db.begin(Scope::Connection(connection)).await?;
        connections::delete(&mut tx, connection).await?;
        tx.commit().await?;
    }
    Ok(posted)
}

/// Who one job's frames go to: the conversation's authorized sockets (token unexpired, user
/// still allowed), listed once per job by the statements the job already runs, and listed
/// again only after a socket is found gone (a reloaded tab comes back with a new id).
#[derive(Debug, Clone)]
pub struct Audience {
    pub tenant_id: TenantId,
    pub conversation_id: ConversationId,
    recipients: Vec<Recipient>,
    stale: bool,
    /// The lowest offset of a `chunk` some socket did not get (its post failed after its
    /// retries): the next chunk starts there, for all (a client takes the part it lacks).
    pub missed_from: Option<usize>,
    /// The sockets the last frame did not reach because their posts were throttled past their
    /// retries (the account's quota: worth trying again soon; a stuck or gone socket is not
    /// among them).
    pub missed: Vec<Recipient>,
}

impl Audience {
    pub fn new(
        tenant_id: TenantId,
        conversation_id: ConversationId,
        recipients: Vec<Recipient>,
    ) -> Self {
        Self {
            tenant_id,
            conversation_id,
            recipients,
            stale: false,
            missed_from: None,
            missed: Vec::new(),
        }
    }

    /// The same conversation's audience, of these sockets only.
    pub fn of(&self, recipients: Vec<Recipient>) -> Self {
        Self::new(self.tenant_id, self.conversation_id, recipients)
    }

    /// No socket to send to.
    pub fn is_empty(&self) -> bool {
        self.recipients.is_empty()
    }

    /// A fresher list, read by a later statement of the job.
    pub fn renew(&mut self, recipients: Vec<Recipient>) {
        self.recipients = recipients;
        self.stale = false;
    }
}

/// Delivery of a frame to every authorized socket of a conversation (several tabs).
#[async_trait]
pub trait Fanout: Send + Sync {
    async fn send(&self, audience: &mut Audience, frame: &ServerFrame) -> Result<(), Error>;

    /// Whether posts have lately waited for the posting budget: streams then flush less often.
    fn under_pressure(&self) -> bool {
        false
    }
}

/// The posts per second one process may make to the connection-management API: its share of
/// the deployment's budget (the account's quota, 10 000 a second, is shared with all its other
/// traffic). A post waits for the budget; the time of the last wait tells streams to coalesce.
#[derive(Debug)]
pub struct PostBudget {
    limiter: governor::DefaultDirectRateLimiter,
    /// When a post last had to wait, as milliseconds since `started`.
    waited_at: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

/// How long after a post waited for the budget streams keep coalescing.
const PRESSURE_LASTS: std::time::Duration = std::time::Duration::from_secs(1);

impl PostBudget {
    /// `per_second` posts a second, a second's worth at once at most.
    pub fn new(per_second: std::num::NonZeroU32) -> Self {
        Self {
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(per_second)),
            waited_at: std::sync::atomic::AtomicU64::new(u64::MAX),
            started: std::time::Instant::now(),
        }
    }

    /// Waits until the budget allows one more post.
    pub async fn take(&self) {
        if self.limiter.check().is_ok() {
            return;
        }
        let now = self.started.elapsed().as_millis() as u64;
        self.waited_at
            .store(now, std::sync::atomic::Ordering::Relaxed);
        telemetry::record(Event::PostBudgetWait);
        self.limiter.until_ready().await;
    }

    /// A post waited for the budget within the last [`PRESSURE_LASTS`].
    pub fn under_pressure(&self) -> bool {
        let at = self.waited_at.load(std::sync::atomic::Ordering::Relaxed);
        at != u64::MAX
            && self.started.elapsed().as_millis() as u64 - at < PRESSURE_LASTS.as_millis() as u64
    }
}

/// AWS: each recipient through the management API, at most `concurrency` posts at once, each
/// given up after `post_timeout`. A gone, failing or slow socket never stops delivery to the
/// others; a gone one is forgotten, and the list is read again before the next frame.
pub struct ConnectionsFanout {
    pub db: Db,
    pub delivery: std::sync::Arc<dyn Delivery>,
    pub concurrency: usize,
    pub post_timeout: std::time::Duration,
    /// This process's share of the posting budget; `None`: unmetered.
    pub budget: Option<std::sync::Arc<PostBudget>>,
}

impl ConnectionsFanout {
    /// With the default bounds.
    pub fn new(db: Db, delivery: std::sync::Arc<dyn Delivery>) -> Self {
        Self::with_settings(db, delivery, &FanoutSettings::default())
    }

    /// With the deployment's bounds.
    pub fn with_settings(
        db: Db,
        delivery: std::sync::Arc<dyn Delivery>,
        settings: &FanoutSettings,
    ) -> Self {
        Self {
            db,
            delivery,
            concurrency: settings.concurrency,
            post_timeout: settings.post_timeout,
            budget: settings
                .post_budget
                .map(|per_second| std::sync::Arc::new(PostBudget::new(per_second))),
        }
    }
}

impl ConnectionsFanout {
    async fn post_within_timeout(
        &self,
        socket: &Recipient,
        frame: &ServerFrame,
    ) -> Result<Posted, Error> {
        if let Some(budget) = &self.budget {
            budget.take().await;
        }
        let post = post_or_forget(
            &self.db,
            self.delivery.as_ref(),
            &socket.endpoint,
            &socket.connection_id,
            frame,
        );
        tokio::time::timeout(self.post_timeout, post)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Internal(format!(
                    "no answer within {} ms",
                    self.post_timeout.as_millis()
                )))
            })
    }
}

#[async_trait]
impl Fanout for ConnectionsFanout {
    async fn send(&self, audience: &mut Audience, frame: &ServerFrame) -> Result<(), Error> {
        if audience.stale {
            let mut tx = self.db.begin(Scope::Tenant(audience.tenant_id)).await?;
            let recipients =
                message_path::recipients(&mut tx, audience.tenant_id, audience.conversation_id)
                    .await?;
            tx.commit().await?;
            audience.renew(recipients);
        }
        use futures::StreamExt;
        let sends: Vec<_> = audience
            .recipients
            .iter()
            .map(|socket| self.post_within_timeout(socket, frame))
            .collect();
        let results: Vec<_> = futures::stream::iter(sends)
            .buffered(self.concurrency.max(1))
            .collect()
            .await;
        let mut failed = 0;
        audience.missed.clear();
        let mut kept = Vec::with_capacity(results.len());
        for (socket, result) in audience.recipients.drain(..).zip(results) {
            match result {
                Ok(Posted::Delivered) => kept.push(socket),
                Ok(Posted::Gone) => audience.stale = true,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(
                        connection = %socket.connection_id,
                        error = &e as &dyn std::error::Error,
                        "delivery failed"
                    );
                    if is_throttled(&e) {
                        audience.missed.push(socket.clone());
                    }
                    kept.push(socket);
                }
            }
        }
        if failed > 0
            && let ServerFrame::Chunk { offset, .. } = frame
        {
            audience.missed_from = Some(audience.missed_from.map_or(*offset, |m| m.min(*offset)));
        }
        let total = kept.len();
        audience.recipients = kept;
        if failed > 0 && failed == total {
            return Err(Error::Internal(format!(
                "no socket of {} reachable",
                audience.conversation_id
            )));
        }
        Ok(())
    }

    fn under_pressure(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.under_pressure())
    }
}

/// Local: `PUBLISH` on the conversation's `webchat_response_key`; the gateways holding its
/// sockets are subscribed and write the frame to the recipients it names that they hold.
/// The payload is the recipients' connection ids separated by spaces, a newline, then the
/// frame (connection ids contain neither).
pub struct RedisFanout {
    redis: RedisConnection,
}

impl RedisFanout {
    pub fn new(url: &str) -> Result<Self, Error> {
        Ok(Self {
            redis: RedisConnection::open(url)?,
        })
    }
}

/// The recipients and the frame of a published payload, as [`RedisFanout`] writes them.
pub fn parse_published(payload: &str) -> Option<(Vec<ConnectionId>, &str)> {
    let (to, frame) = payload.split_once('\n')?;
    let to = to
        .split(' ')
        .filter(|id| !id.is_empty())
        .map(ConnectionId::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((to, frame))
}

/// Waits before publishing again when no gateway heard a frame whose recipients are listed as
/// open: a gateway's bridge resubscribes within these after Redis comes back.
const RESUBSCRIBE_WAITS_MS: [u64; 5] = [20, 50, 100, 250, 500];

#[async_trait]
impl Fanout for RedisFanout {
    async fn send(&self, audience: &mut Audience, frame: &ServerFrame) -> Result<(), Error> {
        if audience.recipients.is_empty() {
            return Ok(());
        }
        let mut payload = audience
            .recipients
            .iter()
            .map(|r| r.connection_id.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        payload.push('\n');
        payload.push_str(&encode(frame)?);
        let channel = webchat_response_key(audience.tenant_id, audience.conversation_id);
        let mut conn = self.redis.get().await?;
        let mut waits = RESUBSCRIBE_WAITS_MS.iter();
        loop {
            let heard: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&payload)
                .query_async(&mut conn)
                .await?;
            if heard > 0 {
                return Ok(());
            }
            let Some(wait) = waits.next() else { break };
            tokio::time::sleep(std::time::Duration::from_millis(*wait)).await;
        }
        // Listed but held by no gateway (one that died without closing them): the reply is
        // stored, and the rest of this job's frames go nowhere without waiting again.
        tracing::warn!(
            conversation = %audience.conversation_id,
            "no gateway holds the conversation's sockets; frames dropped for this job"
        );
        audience.recipients.clear();
        Ok(())
    }
}

/// The frame's JSON, refused when over API Gateway's frame limit.
pub fn encode(frame: &ServerFrame) -> Result<String, Error> {
    let json = frame.to_json();
    if json.len() > MAX_SERVER_FRAME_BYTES {
        return Err(Error::Internal(format!(
            "a {} byte frame exceeds the {MAX_SERVER_FRAME_BYTES} byte limit",
            json.len()
        )));
    }
    Ok(json)
}

/// `PostToConnection` / `DeleteConnection`, with one SDK client per endpoint (a Lambda talks to
/// one API stage; the clients share the SDK's HTTP connection pool).
pub struct ManagementApi {
    config: aws_config::SdkConfig,
    clients: Mutex<HashMap<String, aws_sdk_apigatewaymanagement::Client>>,
}

impl ManagementApi {
    pub fn new(config: aws_config::SdkConfig) -> Self {
        Self {
            config,
            clients: Mutex::default(),
        }
    }

    fn client(&self, endpoint: &str) -> aws_sdk_apigatewaymanagement::Client {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(endpoint.to_owned())
            .or_insert_with(|| {
                let config = aws_sdk_apigatewaymanagement::config::Builder::from(&self.config)
                    .endpoint_url(endpoint)
                    .retry_config(post_retries())
                    .build();
                aws_sdk_apigatewaymanagement::Client::from_conf(config)
            })
            .clone()
    }
}

/// Whether a post failed because the management API throttled it (429
/// `LimitExceededException`), after its retries.
pub fn is_throttled(error: &Error) -> bool {
    type PostError = aws_sdk_apigatewaymanagement::error::SdkError<
        aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError,
    >;
    matches!(error, Error::Upstream { source, .. }
    if source.downcast_ref::<PostError>().is_some_and(|e| {
        e.as_service_error().is_some_and(|e| e.is_limit_exceeded_exception())
    }))
}

/// How a post is retried: the SDK's standard mode (exponential backoff with full jitter) for
/// what may pass, a throttled post above all (429 `LimitExceededException`: the account's
/// `@connections` quota is shared with all its other traffic). Backoffs start short, since a
/// chunk is worth little once the next one is due, and the fan-out's post timeout bounds them
/// all.
fn post_retries() -> aws_config::retry::RetryConfig {
    aws_config::retry::RetryConfig::standard()
        .with_max_attempts(5)
        .with_initial_backoff(std::time::Duration::from_millis(50))
        .with_max_backoff(std::time::Duration::from_secs(1))
}

#[async_trait]
impl Delivery for ManagementApi {
    async fn post(
        &self,
        endpoint: &str,
        connection: &ConnectionId,
        frame: &ServerFrame,
    ) -> Result<Posted, Error> {
        let data = encode(frame)?;
        match self
            .client(endpoint)
            .post_to_connection()
            .connection_id(connection.as_str())
            .data(Blob::new(data))
            .send()
            .await
        {
            Ok(_) => Ok(Posted::Delivered),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_gone_exception()) => {
                Ok(Posted::Gone)
            }
            Err(e) => Err(Error::upstream("PostToConnection", e)),
        }
    }

    async fn close(&self, endpoint: &str, connection: &ConnectionId) -> Result<(), Error> {
        match self
            .client(endpoint)
            .delete_connection()
            .connection_id(connection.as_str())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_gone_exception()) => Ok(()),
            Err(e) => Err(Error::upstream("DeleteConnection", e)),
        }
    }
}
