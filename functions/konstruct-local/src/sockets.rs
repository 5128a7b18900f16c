//! The gateway's socket table: the local implementation of delivery to one connection, and
//! which conversations have authenticated sockets here (what the Redis bridge subscribes to).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use shared::Error;
use shared::delivery::{Delivery, Posted, encode};
use shared::domain::{ConnectionId, ConversationId, TenantId};
use shared::frame::ServerFrame;
use shared::redis_keys::webchat_response_key;
use tokio::sync::{mpsc, watch};

/// What the gateway writes to one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Text(String),
    /// Close with this WebSocket close code and reason.
    Close(u16, &'static str),
}

struct Socket {
    outbound: mpsc::UnboundedSender<Outbound>,
    /// The conversation's response channel, once the socket has authenticated.
    channel: Option<String>,
}

/// A change the Redis bridge must make to its subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    Add(String),
    Remove(String),
}

pub struct Sockets {
    table: Mutex<HashMap<ConnectionId, Socket>>,
    subscriptions: mpsc::UnboundedSender<Subscription>,
    /// Per channel with sockets here: whether the bridge's subscription to it is in place.
    subscribed: Mutex<HashMap<String, watch::Sender<bool>>>,
}

impl Sockets {
    pub fn new(subscriptions: mpsc::UnboundedSender<Subscription>) -> Self {
        Self {
            table: Mutex::default(),
            subscriptions,
            subscribed: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Socket>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, id: ConnectionId, outbound: mpsc::UnboundedSender<Outbound>) {
        self.lock().insert(
            id,
            Socket {
                outbound,
                channel: None,
            },
        );
    }

    /// Marks the socket as authenticated on a conversation, so its replies reach it. The
    /// receiver turns `true` once the bridge is subscribed to the conversation's channel (at
    /// once when it already was).
    pub fn bind(
        &self,
        id: &ConnectionId,
        tenant_id: TenantId,
        conversation_id: ConversationId,
    ) -> watch::Receiver<bool> {
        let channel = webchat_response_key(tenant_id, conversation_id);
        let ready = self
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(channel.clone())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        let mut table = self.lock();
        let first = !table
            .values()
            .any(|s| s.channel.as_deref() == Some(channel.as_str()));
        if let Some(socket) = table.get_mut(id) {
            let previous = socket.channel.replace(channel.clone());
            if previous.as_deref() != Some(channel.as_str()) && first {
                let _ = self.subscriptions.send(Subscription::Add(channel));
            }
        }
        ready
    }

    /// The bridge's word on a channel's subscription (`false` for all when it lost Redis).
    pub fn mark_subscribed(&self, channel: Option<&str>, subscribed: bool) {
        let channels = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        for (name, ready) in channels.iter() {
            if channel.is_none_or(|c| c == name) {
                ready.send_replace(subscribed);
            }
        }
    }

    pub fn remove(&self, id: &ConnectionId) {
        let mut table = self.lock();
        let Some(socket) = table.remove(id) else {
            return;
        };
        if let Some(channel) = socket.channel
            && !table
                .values()
                .any(|s| s.channel.as_deref() == Some(channel.as_str()))
        {
            self.subscribed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&channel);
            let _ = self.subscriptions.send(Subscription::Remove(channel));
        }
    }

    /// The channels with at least one authenticated socket here.
    pub fn channels(&self) -> Vec<String> {
        let mut channels: Vec<String> = self
            .lock()
            .values()
            .filter_map(|s| s.channel.clone())
            .collect();
        channels.sort();
        channels.dedup();
        channels
    }

    /// Sends a published frame to the recipients it names that are open here on the channel's
    /// conversation; the publisher listed only the sockets still authorized.
    pub fn publish(&self, channel: &str, to: &[ConnectionId], frame: &str) -> usize {
        let table = self.lock();
        to.iter()
            .filter_map(|id| table.get(id))
            .filter(|s| s.channel.as_deref() == Some(channel))
            .filter(|s| s.outbound.send(Outbound::Text(frame.to_owned())).is_ok())
            .count()
    }

    /// Writes raw frame text to one socket; `false` when it is not open here.
    pub fn send_text(&self, id: &ConnectionId, text: String) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|s| s.outbound.send(Outbound::Text(text)).is_ok())
    }

    pub fn is_open(&self, id: &ConnectionId) -> bool {
        self.lock().contains_key(id)
    }

    pub fn close(&self, id: &ConnectionId, code: u16, reason: &'static str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|s| s.outbound.send(Outbound::Close(code, reason)).is_ok())
    }

    /// Closes every socket (shutdown: 1001, going away).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for socket in self.lock().values() {
            let _ = socket.outbound.send(Outbound::Close(code, reason));
        }
    }
}

/// In-process delivery: the endpoint is this gateway, whatever the row says.
#[async_trait]
impl Delivery for Sockets {
    async fn post(
        &self,
        _endpoint: &str,
        connection: &ConnectionId,
        frame: &ServerFrame,
    ) -> Result<Posted, Error> {
        Ok(if self.send_text(connection, encode(frame)?) {
            Posted::Delivered
        } else {
            Posted::Gone
        })
    }

    async fn close(&self, _endpoint: &str, connection: &ConnectionId) -> Result<(), Error> {
        self.close(connection, 1008, "authentication failed");
        Ok(())
    }
}
