//! A TCP proxy that adds a round-trip time to one hop, as a network between two services would:
//! each direction delays what it carries by half the round trip, keeping order and throughput
//! (bytes in flight are not held back by earlier ones' delays). Every accepted and opened socket
//! sets `TCP_NODELAY`, so the proxy adds its delay and nothing else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A running proxy: connect to `address` to reach `upstream` with `rtt` added.
pub struct LatencyProxy {
    /// `127.0.0.1:{port}`.
    pub address: String,
    pub rtt: Duration,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LatencyProxy {
    pub async fn start(upstream: &str, rtt: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let upstream = upstream.to_owned();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, counted) = (upstream.clone(), counted.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        carry(client, server, rtt / 2, counted).await;
                    }
                });
            }
        });
        Ok(Self {
            address,
            rtt,
            requests,
            task,
        })
    }

    /// HTTP requests carried so far (for a hop that speaks HTTP/1.1): each request's first
    /// bytes start a read, since a client sends its next request only once the last one is
    /// answered.
    pub fn http_requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// `url` with its `host:port` replaced by the proxy's.
    pub fn in_url(&self, url: &str) -> String {
        with_address(url, &self.address)
    }
}

/// `url` with its `host:port` replaced by `address` (scheme, user and path kept).
pub fn with_address(url: &str, address: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{address}{path}", userinfo.unwrap_or_default())
}

async fn carry(client: TcpStream, server: TcpStream, one_way: Duration, requests: Arc<AtomicU64>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        direction(client_read, server_write, one_way, Some(requests)),
        direction(server_read, client_write, one_way, None),
    );
}

/// Reads as fast as bytes come and writes each piece `one_way` after it arrived.
async fn direction(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    one_way: Duration,
    requests: Option<Arc<AtomicU64>>,
) {
    let (pieces, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(requests) = &requests
                        && [&b"POST "[..], b"GET ", b"PUT ", b"DELETE "]
                            .iter()
                            .any(|method| buffer[..n].starts_with(method))
                    {
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                    if pieces
                        .send((Instant::now() + one_way, buffer[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, piece)) = due.recv().await {
            wait_until(at).await;
            if to.write_all(&piece).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Sleeps until `at`, to a fraction of a millisecond.
async fn wait_until(at: Instant) {
    const TIMER_RESOLUTION: Duration = Duration::from_millis(2);
    if at.saturating_duration_since(Instant::now()) > TIMER_RESOLUTION {
        tokio::time::sleep_until(at - TIMER_RESOLUTION).await;
    }
    let rest = at.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_keeps_its_scheme_user_and_path_and_takes_the_proxys_address() {
        assert_eq!(
            with_address("postgres://app@127.0.0.1:61439/konstruct", "127.0.0.1:9"),
            "postgres://app@127.0.0.1:9/konstruct"
        );
        assert_eq!(
            with_address("http://127.0.0.1:5000", "127.0.0.1:9"),
            "http://127.0.0.1:9"
        );
    }
}
