//! One Redis connection for the whole gateway, shared by every store.
//!
//! A single node gets a lazy `ConnectionManager` (connects on first use, reconnects with
//! backoff, so a Redis that is down at start fails no request); a `redis+cluster://` URL or a
//! comma-separated node list gets a cluster connection. Every call has a response timeout.

use std::time::Duration;

use redis::{
    IntoConnectionInfo,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    io::tcp::TcpSettings,
};

const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A shared connection to a single Redis or a Redis Cluster.
#[derive(Clone)]
pub enum RedisConnection {
    /// One node.
    Single(ConnectionManager),
    /// A cluster.
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Connects (lazily) to `url`. Must be called inside a Tokio runtime.
    pub fn open(url: &str) -> redis::RedisResult<Self> {
        let nodes = node_urls(url);
        if nodes.len() > 1 || url.contains("+cluster://") {
            let client = ClusterClientBuilder::new(nodes)
                .tcp_settings(tcp_settings())
                .connection_timeout(CONNECTION_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(2)
                .build()?;
            let config =
                ClusterConfig::new().set_connection_timeout(CONNECTION_TIMEOUT).set_response_timeout(RESPONSE_TIMEOUT);
            return Ok(Self::Cluster(client.get_pending_async_connection_with_config(config)));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
        Ok(Self::Single(redis::Client::open(info)?.get_connection_manager_lazy(config)?))
    }
}

/// TCP_NODELAY (the redis crate leaves Nagle on): a command written while an earlier one is
/// unacknowledged must not wait for the ACK.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// The node URLs of a Redis URL: `redis+cluster://a:1,b:2` or `redis://a:1,redis://b:2`.
pub fn node_urls(url: &str) -> Vec<String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.replace("+cluster", ""), rest),
        None => ("redis".to_string(), url),
    };
    rest.split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(|node| if node.contains("://") { node.to_string() } else { format!("{scheme}://{node}") })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_node_lists() {
        assert_eq!(node_urls("redis://h:1"), ["redis://h:1"]);
        assert_eq!(node_urls("redis+cluster://a:1,b:2"), ["redis://a:1", "redis://b:2"]);
        assert_eq!(node_urls("redis://a:1,redis://b:2"), ["redis://a:1", "redis://b:2"]);
    }
}
