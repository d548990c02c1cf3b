//! Where rollout logs are kept: the [`LogStore`] trait and its in-memory implementation.
//!
//! A store keeps, per rollout (within a scope, the project), its entries newest first, at most
//! `max_entries` of them, the number of older entries it evicted to stay within that bound,
//! and the newest status-bearing entry, which is kept apart from the list so that eviction
//! never takes it. All of it expires `ttl` after the rollout's last write (the policy of
//! insertion ids). The Redis implementation is [`RedisLogStore`](crate::RedisLogStore).

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    future::Future,
    hash::{BuildHasher, RandomState},
    pin::Pin,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use llmgate_core::BoxError;
use tokio::time::Instant;

/// The default lifetime of a rollout's log after its last write: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(86_400);
/// The default bound on entries kept per rollout.
pub const DEFAULT_MAX_ENTRIES: usize = 1000;

/// The boxed future a store returns (keeps [`LogStore`] object-safe).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// One rollout's log within a scope (the project; empty when there is none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloutKey<'a> {
    /// The project the log belongs to, or `""`.
    pub scope: &'a str,
    /// The rollout.
    pub rollout_id: &'a str,
}

/// A rollout's log as read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutLog {
    /// The kept entries, newest first.
    pub entries: Vec<Bytes>,
    /// The newest status-bearing entry, which may be older than every kept entry.
    pub latest_status: Option<Bytes>,
    /// How many entries were evicted to keep within the bound.
    pub evicted: u64,
}

/// Keeps rollout logs.
///
/// An append is atomic per rollout: readers see the entry, the new latest status and the
/// eviction count together or not at all.
pub trait LogStore: Send + Sync + 'static {
    /// Adds `entry` (the stored JSON) in front of the rollout's log, makes it the latest status
    /// when `has_status`, evicts past the bound and resets the time to live. Returns how many
    /// entries this append evicted.
    fn append<'a>(&'a self, rollout: RolloutKey<'a>, entry: &'a Bytes, has_status: bool) -> StoreFuture<'a, u64>;

    /// The rollout's log (empty when none or expired).
    fn read<'a>(&'a self, rollout: RolloutKey<'a>) -> StoreFuture<'a, RolloutLog>;

    /// The rollout's newest status-bearing entry, if any.
    fn latest_status<'a>(&'a self, rollout: RolloutKey<'a>) -> StoreFuture<'a, Option<Bytes>>;
}

// === MemoryLogStore ===

/// An in-process [`LogStore`]: the default when no Redis is configured.
///
/// Rollouts are spread over shards by hash, each behind a `std::sync::Mutex` held only for a
/// map operation (never across an `.await`). Expired logs read as empty and are swept from a
/// shard at most once per `ttl / 4`, on a write to it.
pub struct MemoryLogStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    ttl: Duration,
    max_entries: usize,
}

#[derive(Default)]
struct Shard {
    logs: HashMap<(String, String), Log>,
    next_sweep: Option<Instant>,
}

#[derive(Default)]
struct Log {
    entries: VecDeque<Bytes>,
    latest_status: Option<Bytes>,
    evicted: u64,
    expires_at: Option<Instant>,
}

impl MemoryLogStore {
    /// A store with a TTL of 24 hours, 1,000 entries per rollout and 16 shards.
    pub fn new() -> Self {
        Self {
            shards: (0..16).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            ttl: DEFAULT_TTL,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }

    /// Sets the time to live of a rollout's log after its last write.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets how many entries a rollout keeps (at least 1).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    fn with_log<T>(&self, rollout: RolloutKey<'_>, f: impl FnOnce(&mut Shard, (String, String), Instant) -> T) -> T {
        let key = (rollout.scope.to_owned(), rollout.rollout_id.to_owned());
        let index = (self.hasher.hash_one(&key) % self.shards.len() as u64) as usize;
        // A poisoned shard only means another thread panicked mid-operation; the map is valid.
        let mut shard = self.shards[index].lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut shard, key, Instant::now())
    }

    fn push(&self, rollout: RolloutKey<'_>, entry: &Bytes, has_status: bool) -> u64 {
        let (ttl, max_entries) = (self.ttl, self.max_entries);
        self.with_log(rollout, |shard, key, now| {
            if shard.next_sweep.is_none_or(|at| now >= at) {
                shard.logs.retain(|_, log| log.expires_at.is_some_and(|at| at > now));
                shard.next_sweep = Some(now + ttl / 4);
            }
            let log = shard.logs.entry(key).or_default();
            if log.expires_at.is_some_and(|at| at <= now) {
                *log = Log::default();
            }
            log.entries.push_front(entry.clone());
            let evicted = log.entries.len().saturating_sub(max_entries);
            log.entries.truncate(max_entries);
            log.evicted += evicted as u64;
            if has_status {
                log.latest_status = Some(entry.clone());
            }
            log.expires_at = Some(now + ttl);
            evicted as u64
        })
    }

    fn snapshot(&self, rollout: RolloutKey<'_>) -> RolloutLog {
        self.with_log(rollout, |shard, key, now| match shard.logs.get(&key) {
            Some(log) if log.expires_at.is_some_and(|at| at > now) => RolloutLog {
                entries: log.entries.iter().cloned().collect(),
                latest_status: log.latest_status.clone(),
                evicted: log.evicted,
            },
            _ => RolloutLog::default(),
        })
    }
}

impl Default for MemoryLogStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryLogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLogStore").field("ttl", &self.ttl).field("max_entries", &self.max_entries).finish()
    }
}

impl LogStore for MemoryLogStore {
    fn append<'a>(&'a self, rollout: RolloutKey<'a>, entry: &'a Bytes, has_status: bool) -> StoreFuture<'a, u64> {
        Box::pin(async move { Ok(self.push(rollout, entry, has_status)) })
    }

    fn read<'a>(&'a self, rollout: RolloutKey<'a>) -> StoreFuture<'a, RolloutLog> {
        Box::pin(async move { Ok(self.snapshot(rollout)) })
    }

    fn latest_status<'a>(&'a self, rollout: RolloutKey<'a>) -> StoreFuture<'a, Option<Bytes>> {
        // Reads only the status: no copy of the list.
        Box::pin(async move {
            Ok(self.with_log(rollout, |shard, key, now| {
                shard.logs.get(&key).filter(|log| log.expires_at.is_some_and(|at| at > now))?.latest_status.clone()
            }))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const R1: RolloutKey<'static> = RolloutKey { scope: "", rollout_id: "r1" };

    #[tokio::test]
    async fn keeps_the_newest_entries_and_the_latest_status_past_the_bound() {
        let store = MemoryLogStore::new().max_entries(2);
        assert_eq!(store.append(R1, &Bytes::from("s1"), true).await.unwrap(), 0);
        assert_eq!(store.append(R1, &Bytes::from("a"), false).await.unwrap(), 0);
        assert_eq!(store.append(R1, &Bytes::from("b"), false).await.unwrap(), 1);
        assert_eq!(store.append(R1, &Bytes::from("c"), false).await.unwrap(), 1);
        let log = store.read(R1).await.unwrap();
        assert_eq!(log.entries, [Bytes::from("c"), Bytes::from("b")]);
        assert_eq!(log.latest_status, Some(Bytes::from("s1")));
        assert_eq!(log.evicted, 2);
        assert_eq!(store.latest_status(R1).await.unwrap(), Some(Bytes::from("s1")));
    }

    #[tokio::test]
    async fn scopes_and_rollouts_are_apart() {
        let store = MemoryLogStore::new();
        store.append(R1, &Bytes::from("x"), true).await.unwrap();
        let other_scope = RolloutKey { scope: "p", rollout_id: "r1" };
        assert_eq!(store.read(other_scope).await.unwrap(), RolloutLog::default());
        assert_eq!(store.latest_status(RolloutKey { scope: "", rollout_id: "r2" }).await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_log_expires_a_ttl_after_its_last_write() {
        let store = MemoryLogStore::new().ttl(Duration::from_secs(10));
        store.append(R1, &Bytes::from("a"), true).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        store.append(R1, &Bytes::from("b"), false).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(store.read(R1).await.unwrap().entries.len(), 2);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.read(R1).await.unwrap(), RolloutLog::default());
        assert_eq!(store.latest_status(R1).await.unwrap(), None);
        // A write after expiry starts a new log.
        store.append(R1, &Bytes::from("c"), false).await.unwrap();
        assert_eq!(store.read(R1).await.unwrap().entries, [Bytes::from("c")]);
    }
}
