//! The Redis [`LogStore`] (single node or Redis Cluster), shared by every replica.
//!
//! Each rollout has two keys, in one hash slot (the braces are a Redis Cluster hash tag):
//!
//! ```text
//! {prefix}{{scope}/{rollout_id}}:entries   a list, newest first (LPUSH, LTRIM to the bound)
//! {prefix}{{scope}/{rollout_id}}:meta      a hash: `status` (the newest status-bearing entry),
//!                                          `evicted` (how many entries LTRIM dropped)
//! ```
//!
//! An append is one Lua script (one round trip, atomic): push, trim, count, set the status,
//! reset both TTLs. A read is one pipeline (`LRANGE` + `HMGET`); a status poll one `HGET`.
//! Project ids cannot hold `/` (the path-metadata layer refuses it), so the scope and the
//! rollout id never run into each other.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use redis::{Script, aio::ConnectionLike};

use crate::store::{DEFAULT_MAX_ENTRIES, DEFAULT_TTL, LogStore, RolloutKey, RolloutLog, StoreFuture};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "llmgate:rollout_logs:";

/// KEYS: entries, meta. ARGV: entry, max entries, ttl seconds, "1" when the entry has a status.
const APPEND: &str = r"
local kept = tonumber(ARGV[2])
local evicted = redis.call('LPUSH', KEYS[1], ARGV[1]) - kept
if evicted > 0 then
  redis.call('LTRIM', KEYS[1], 0, kept - 1)
  redis.call('HINCRBY', KEYS[2], 'evicted', evicted)
else
  evicted = 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[2], 'status', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return evicted
";

/// The meta hash's `status` and `evicted`, as `HMGET` answers them.
type Meta = (Option<Vec<u8>>, Option<u64>);

/// A [`LogStore`] on Redis, over any cloneable async connection (a `ConnectionManager`, a
/// cluster connection).
#[derive(Clone)]
pub struct RedisLogStore<C> {
    conn: C,
    script: Arc<Script>,
    prefix: Arc<str>,
    ttl_secs: u64,
    max_entries: usize,
}

impl<C> RedisLogStore<C> {
    /// A store on `conn` with the prefix `llmgate:rollout_logs:`, a TTL of 24 hours and 1,000
    /// entries per rollout.
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            script: Arc::new(Script::new(APPEND)),
            prefix: Arc::from(DEFAULT_PREFIX),
            ttl_secs: DEFAULT_TTL.as_secs(),
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }

    /// Sets the key prefix.
    pub fn prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the TTL, in whole seconds (at least 1), reset on every append.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl_secs = ttl.as_secs().max(1);
        self
    }

    /// Sets how many entries a rollout keeps (at least 1).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// The two keys of `rollout`: its entries and its meta hash.
    pub fn keys(&self, rollout: RolloutKey<'_>) -> (String, String) {
        let RolloutKey { scope, rollout_id } = rollout;
        let base = format!("{}{{{scope}/{rollout_id}}}", self.prefix);
        (format!("{base}:entries"), format!("{base}:meta"))
    }
}

impl<C> std::fmt::Debug for RedisLogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLogStore")
            .field("prefix", &self.prefix)
            .field("ttl_secs", &self.ttl_secs)
            .field("max_entries", &self.max_entries)
            .finish()
    }
}

impl<C> LogStore for RedisLogStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn append<'a>(&'a self, rollout: RolloutKey<'a>, entry: &'a Bytes, has_status: bool) -> StoreFuture<'a, u64> {
        let mut conn = self.conn.clone();
        let (entries, meta) = self.keys(rollout);
        Box::pin(async move {
            let evicted: u64 = self
                .script
                .key(entries)
                .key(meta)
                .arg(entry.as_ref())
                .arg(self.max_entries)
                .arg(self.ttl_secs)
                .arg(if has_status { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await?;
            Ok(evicted)
        })
    }

    fn read<'a>(&'a self, rollout: RolloutKey<'a>) -> StoreFuture<'a, RolloutLog> {
        let mut conn = self.conn.clone();
        let (entries, meta) = self.keys(rollout);
        Box::pin(async move {
            let (entries, (latest_status, evicted)): (Vec<Vec<u8>>, Meta) = redis::pipe()
                .cmd("LRANGE")
                .arg(&entries)
                .arg(0)
                .arg(-1)
                .cmd("HMGET")
                .arg(&meta)
                .arg("status")
                .arg("evicted")
                .query_async(&mut conn)
                .await?;
            Ok(RolloutLog {
                entries: entries.into_iter().map(Bytes::from).collect(),
                latest_status: latest_status.map(Bytes::from),
                evicted: evicted.unwrap_or(0),
            })
        })
    }

    fn latest_status<'a>(&'a self, rollout: RolloutKey<'a>) -> StoreFuture<'a, Option<Bytes>> {
        let mut conn = self.conn.clone();
        let (_, meta) = self.keys(rollout);
        Box::pin(async move {
            let status: Option<Vec<u8>> = redis::cmd("HGET").arg(&meta).arg("status").query_async(&mut conn).await?;
            Ok(status.map(Bytes::from))
        })
    }
}
