//! The Redis pub-sub bridge: replies published on `webchat_response_key` by any worker reach
//! the sockets of this gateway that the publisher named (the authorized ones). One subscription per conversation with authenticated sockets
//! here; after Redis goes away, the bridge reconnects and subscribes again to what is current.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use shared::delivery::parse_published;

use crate::sockets::{Sockets, Subscription};

pub async fn run(
    redis_url: String,
    sockets: Arc<Sockets>,
    mut changes: mpsc::UnboundedReceiver<Subscription>,
) {
    let client = match shared::redis_connection::client(&redis_url) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "bridge: bad REDIS_URL");
            return;
        }
    };
    // Short waits (at most 100 ms: a refused local connect costs nothing): a publisher finding
    // no subscriber retries for about a second.
    let first = Duration::from_millis(20);
    let mut backoff = first;
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
                    sockets.mark_subscribed(None, true);
                    backoff = first;
                    loop {
                        tokio::select! {
                            change = changes.recv() => {
                                let ok = match change {
                                    Some(Subscription::Add(c)) => {
                                        let ok = sink.subscribe(&c).await.is_ok();
                                        sockets.mark_subscribed(Some(&c), ok);
                                        ok
                                    }
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
                                let payload = message.get_payload::<String>().ok();
                                match payload.as_deref().and_then(parse_published) {
                                    Some((to, frame)) => {
                                        sockets.publish(&channel, &to, frame);
                                    }
                                    None => tracing::warn!(%channel, "bridge: malformed payload"),
                                }
                            }
                        }
                    }
                }
                sockets.mark_subscribed(None, false);
                tracing::warn!("bridge: lost Redis; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "bridge: cannot reach Redis"),
        }
        // Subscription changes made while disconnected are covered by the resubscribe above.
        while changes.try_recv().is_ok() {}
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}
