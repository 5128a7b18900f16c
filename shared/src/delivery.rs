//! Delivery of a frame to one WebSocket connection: API Gateway's connection-management API on
//! AWS (also what the local gateway emulates), the local gateway's socket table in-process.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_apigatewaymanagement::error::DisplayErrorContext;
use aws_sdk_apigatewaymanagement::primitives::Blob;

use crate::Error;
use crate::domain::ConnectionId;
use crate::frame::{MAX_SERVER_FRAME_BYTES, ServerFrame};

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
                    .build();
                aws_sdk_apigatewaymanagement::Client::from_conf(config)
            })
            .clone()
    }
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
            Err(e) => Err(Error::Internal(format!(
                "PostToConnection: {}",
                DisplayErrorContext(e)
            ))),
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
            Err(e) => Err(Error::Internal(format!(
                "DeleteConnection: {}",
                DisplayErrorContext(e)
            ))),
        }
    }
}
