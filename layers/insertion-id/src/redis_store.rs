//! The Redis [`InsertionStore`]: one SET per rollout, as the original gateway wrote it.
//!
//! A record is one atomic pipeline (MULTI/EXEC, one round trip):
//!
//! ```text
//! SADD   {prefix}{rollout_id} {insertion_id}
//! EXPIRE {prefix}{rollout_id} {ttl}
//! ```
//!
//! and a read is `SMEMBERS {prefix}{rollout_id}`. The prefix defaults to empty, so sets written
//! by the original gateway stay readable, and the TTL to 86400 s. Each rollout is one key, so
//! the transaction needs no hash tag on Redis Cluster.
//!
//! # Connections
//!
//! [`RedisStore`] is generic over any cloneable async connection. The constructors build the
//! two useful ones without touching the network, so a Redis that is down at start never fails
//! construction (they must be called inside a Tokio runtime, which the connections need):
//!
//! - [`RedisStore::single_node`]: a lazy [`ConnectionManager`] (multiplexed, reconnects on I/O
//!   errors; connection and response timeouts of 1 s, one quick reconnect attempt per call so a
//!   call during an outage fails fast and the layer's own retry takes over);
//! - [`RedisStore::cluster`]: a pending [`ClusterConnection`]. Its connections to the initial
//!   nodes are made in the background; when the whole cluster is down at start, that first
//!   attempt fails (logged by the `redis` crate), calls fail with an error until the nodes
//!   answer, and the connection reconnects to the initial nodes on the next call. Calls never
//!   hang past the response timeout.

use std::{sync::Arc, time::Duration};

use redis::{
    IntoConnectionInfo, RedisResult,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
};

use crate::store::{DEFAULT_TTL, InsertionStore, StoreFuture};

/// The connection timeout the constructors use.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// The response timeout the constructors use.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// An [`InsertionStore`] on Redis (single node or cluster).
#[derive(Clone)]
pub struct RedisStore<C> {
    conn: C,
    prefix: Arc<str>,
    ttl_secs: i64,
}

impl<C> RedisStore<C> {
    /// A store on `conn`, with an empty key prefix and a TTL of 86400 s.
    pub fn new(conn: C) -> Self {
        Self { conn, prefix: Arc::from(""), ttl_secs: DEFAULT_TTL.as_secs() as i64 }
    }

    /// Sets the key prefix (default empty: the key is the bare `rollout_id`, as the original).
    pub fn prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the TTL, in whole seconds (at least 1), reset on every record.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl_secs = ttl.as_secs().clamp(1, i64::MAX as u64) as i64;
        self
    }

    /// The key of `rollout_id`'s set.
    pub fn key(&self, rollout_id: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + rollout_id.len());
        key.push_str(&self.prefix);
        key.push_str(rollout_id);
        key
    }

    /// The connection.
    pub fn connection(&self) -> &C {
        &self.conn
    }
}

impl RedisStore<ConnectionManager> {
    /// A store on one Redis node at `url` (`redis://[:password@]host:port[/db]`), through a lazy
    /// [`ConnectionManager`]: no connection is made until the first record.
    pub fn single_node(url: impl IntoConnectionInfo) -> RedisResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        Self::single_node_with_config(redis::Client::open(url)?, config)
    }

    /// A store on one Redis node through a lazy [`ConnectionManager`] with your `config`.
    pub fn single_node_with_config(client: redis::Client, config: ConnectionManagerConfig) -> RedisResult<Self> {
        Ok(Self::new(client.get_connection_manager_lazy(config)?))
    }
}

impl RedisStore<ClusterConnection> {
    /// A store on the Redis Cluster reachable through `nodes` (any subset of its masters),
    /// connected in the background (see the module docs for a cluster that is down at start).
    pub fn cluster<T: IntoConnectionInfo>(nodes: impl IntoIterator<Item = T>) -> RedisResult<Self> {
        let builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(CONNECTION_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(200);
        Self::cluster_with(builder)
    }

    /// A store on a Redis Cluster client of your own making, connected in the background.
    pub fn cluster_with(builder: ClusterClientBuilder) -> RedisResult<Self> {
        let client = builder.build()?;
        let config =
            ClusterConfig::new().set_connection_timeout(CONNECTION_TIMEOUT).set_response_timeout(RESPONSE_TIMEOUT);
        Ok(Self::new(client.get_pending_async_connection_with_config(config)))
    }
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.prefix).field("ttl_secs", &self.ttl_secs).finish()
    }
}

impl<C> InsertionStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn record<'a>(&'a self, rollout_id: &'a str, insertion_id: &'a str) -> StoreFuture<'a, ()> {
        let mut conn = self.conn.clone();
        let key = self.key(rollout_id);
        let ttl = self.ttl_secs;
        Box::pin(async move {
            redis::pipe()
                .atomic()
                .sadd(&key, insertion_id)
                .ignore()
                .expire(&key, ttl)
                .ignore()
                .exec_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn members<'a>(&'a self, rollout_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        let mut conn = self.conn.clone();
        let key = self.key(rollout_id);
        Box::pin(async move {
            let members: Vec<String> = redis::cmd("SMEMBERS").arg(&key).query_async(&mut conn).await?;
            Ok(members)
        })
    }
}
