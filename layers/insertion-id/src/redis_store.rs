//! The Redis [`InsertionStore`]: one SET per rollout, as the original gateway wrote it.
//!
//! A write of many records (the layer's group commit) is one pipeline (one round trip), with
//! one `SADD` per rollout carrying all of its new ids and one `EXPIRE`:
//!
//! ```text
//! SADD   {prefix}{rollout_id} {insertion_id} [{insertion_id} …]
//! EXPIRE {prefix}{rollout_id} {ttl}
//! …one pair per rollout in the batch
//! ```
//!
//! The pipeline is not a transaction: `SADD` is idempotent and a write that fails is retried
//! whole (its `EXPIRE` too, so a set whose `SADD` got through before a failure gets its TTL
//! with the retry), so `MULTI`/`EXEC` would protect nothing and cost two commands per write.
//!
//! A read is `SMEMBERS {prefix}{rollout_id}`. The prefix defaults to empty, so sets written
//! by the original gateway stay readable, and the TTL to 86400 s. Each rollout is one key, so
//! no hash tag is needed on Redis Cluster: there the batch is split by hash slot, one pipeline
//! per slot, sent concurrently.
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

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::future::try_join_all;
use llmgate_core::BoxError;
use redis::{
    IntoConnectionInfo, RedisResult,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::Slot,
};

use crate::store::{DEFAULT_TTL, Insertion, InsertionStore, StoreFuture};

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
    /// A Redis Cluster connection: a batch is written as one pipeline per hash slot.
    per_slot: bool,
}

impl<C> RedisStore<C> {
    /// A store on `conn`, with an empty key prefix and a TTL of 86400 s. For a Redis Cluster
    /// connection of your own, add [`per_slot`](Self::per_slot).
    pub fn new(conn: C) -> Self {
        Self { conn, prefix: Arc::from(""), ttl_secs: DEFAULT_TTL.as_secs() as i64, per_slot: false }
    }

    /// Writes a batch as one pipeline per hash slot (needed on Redis Cluster, where a pipeline
    /// cannot cross slots; the cluster constructors set it).
    pub fn per_slot(mut self) -> Self {
        self.per_slot = true;
        self
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
        Ok(Self::new(client.get_pending_async_connection_with_config(config)).per_slot())
    }
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("ttl_secs", &self.ttl_secs)
            .field("per_slot", &self.per_slot)
            .finish()
    }
}

/// One rollout's set and the ids a batch adds to it.
struct SetAdd<'a> {
    key: String,
    members: Vec<&'a str>,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The batch grouped by rollout, in the order the rollouts first appear.
    fn set_adds<'a>(&self, insertions: &'a [Insertion]) -> Vec<SetAdd<'a>> {
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(insertions.len());
        let mut adds: Vec<SetAdd<'a>> = Vec::with_capacity(insertions.len());
        for insertion in insertions {
            let at = *index.entry(&insertion.rollout_id).or_insert_with(|| {
                adds.push(SetAdd { key: self.key(&insertion.rollout_id), members: Vec::new() });
                adds.len() - 1
            });
            adds[at].members.push(&insertion.insertion_id);
        }
        adds
    }

    /// One pipeline: `SADD` and `EXPIRE` for each set.
    async fn write(&self, adds: &[&SetAdd<'_>]) -> Result<(), BoxError> {
        let mut pipe = redis::pipe();
        for add in adds {
            pipe.sadd(&add.key, &add.members).ignore().expire(&add.key, self.ttl_secs).ignore();
        }
        pipe.exec_async(&mut self.conn.clone()).await?;
        Ok(())
    }
}

impl<C> InsertionStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn record_all<'a>(&'a self, insertions: &'a [Insertion]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let adds = self.set_adds(insertions);
            if !self.per_slot {
                return self.write(&adds.iter().collect::<Vec<_>>()).await;
            }
            let mut slots: HashMap<Slot, Vec<&SetAdd<'_>>> = HashMap::new();
            for add in &adds {
                slots.entry(Slot::for_key(&add.key)).or_default().push(add);
            }
            try_join_all(slots.values().map(|adds| self.write(adds))).await?;
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
