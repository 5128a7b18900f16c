//! Redis connections as the job stream (`queue::RedisQueue`), the reply fan-out
//! (`delivery::RedisFanout`) and the local bridge use them.

use tokio::sync::OnceCell;

use crate::Error;

/// A Redis connection opened on first use, reconnecting by itself, shared by its clones. Its
/// response timeout leaves room for the worker's blocking reads (the client's default, 500 ms,
/// is shorter than they wait).
#[derive(Clone)]
pub struct RedisConnection {
    client: redis::Client,
    connection: std::sync::Arc<OnceCell<redis::aio::ConnectionManager>>,
}

impl RedisConnection {
    pub fn open(url: &str) -> Result<Self, Error> {
        Ok(Self {
            client: client(url)?,
            connection: Default::default(),
        })
    }

    pub async fn get(&self) -> Result<redis::aio::ConnectionManager, Error> {
        self.connection
            .get_or_try_init(|| self.dedicated())
            .await
            .cloned()
    }

    /// A connection of its own, not shared with the clones.
    pub async fn dedicated(&self) -> Result<redis::aio::ConnectionManager, Error> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(10)));
        Ok(self
            .client
            .get_connection_manager_with_config(config)
            .await?)
    }
}

/// A Redis client whose connections set `TCP_NODELAY`: commands are small and pipelined, and
/// Nagle's algorithm would hold one back until the previous is acknowledged.
pub fn client(url: &str) -> Result<redis::Client, Error> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Ok(redis::Client::open(info)?)
}
