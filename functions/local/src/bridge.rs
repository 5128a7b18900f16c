//! The Redis pub-sub bridge: replies published on `webchat_response_key` by any worker reach
//! the sockets of this gateway. One subscription per conversation with authenticated sockets
//! here; after Redis goes away, the bridge reconnects and subscribes again to what is current.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::sockets::{Sockets, Subscription};

pub async fn run(
    redis_url: String,
    sockets: Arc<Sockets>,
    mut changes: mpsc::UnboundedReceiver<Subscription>,
) {
    let client = match redis::Client::open(redis_url) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "bridge: bad REDIS_URL");
            return;
        }
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(pubsub) => {
                let (mut sink, mut stream) = pubsub.split();
                let mut subscribed = true;
                for channel in sockets.channels() {
                    subscribed &= sink.subscribe(&channel).await.is_ok();
                }
                if subscribed {
                    tracing::info!("bridge: subscribed");
                    backoff = Duration::from_millis(100);
                    loop {
                        tokio::select! {
                            change = changes.recv() => {
                                let ok = match change {
                                    Some(Subscription::Add(c)) => sink.subscribe(&c).await.is_ok(),
                                    Some(Subscription::Remove(c)) => sink.unsubscribe(&c).await.is_ok(),
                                    None => return,
                                };
                                if !ok {
                                    break;
                                }
                            }
                            message = stream.next() => {
                                let Some(message) = message else { break };
                                let channel = message.get_channel_name().to_owned();
                                if let Ok(frame) = message.get_payload::<String>() {
                                    sockets.publish(&channel, &frame);
                                }
                            }
                        }
                    }
                }
                tracing::warn!("bridge: lost Redis; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "bridge: cannot reach Redis"),
        }
        // Subscription changes made while disconnected are covered by the resubscribe above.
        while changes.try_recv().is_ok() {}
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
