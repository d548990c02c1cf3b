//! Where insertion ids are kept: the [`InsertionStore`] trait and its in-memory implementation.
//!
//! A store keeps, per rollout, the set of insertion ids of the completions that succeeded. The
//! set expires `ttl` after its last write (the original gateway's `EXPIRE … 86400`, reset on
//! every write). The Redis implementation is [`RedisStore`](crate::RedisStore).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    future::Future,
    hash::{BuildHasher, RandomState},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use llmgate_core::BoxError;
use tokio::time::Instant;

/// The default lifetime of a rollout's set after its last write: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(86_400);

/// The boxed future a store returns (keeps [`InsertionStore`] object-safe).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// One insertion id of one rollout: what a record adds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Insertion {
    /// The rollout whose set takes the id.
    pub rollout_id: Arc<str>,
    /// The insertion id.
    pub insertion_id: Arc<str>,
}

/// Keeps the insertion ids of each rollout.
///
/// Implementations must be cheap to call concurrently (no global lock on the hot path) and
/// recording must be idempotent: a retried record of the same ids leaves the same sets.
pub trait InsertionStore: Send + Sync + 'static {
    /// Adds each insertion id to its rollout's set and resets the time to live of those sets,
    /// in as few round trips as the store allows (the layer hands over every record that came
    /// due while the previous write was under way). On an error some may have been written;
    /// recording them all again is safe.
    fn record_all<'a>(&'a self, insertions: &'a [Insertion]) -> StoreFuture<'a, ()>;

    /// Adds `insertion_id` to the set of `rollout_id` and resets the set's time to live (a
    /// batch of one).
    fn record<'a>(&'a self, rollout_id: &'a str, insertion_id: &'a str) -> StoreFuture<'a, ()> {
        let one = [Insertion { rollout_id: Arc::from(rollout_id), insertion_id: Arc::from(insertion_id) }];
        Box::pin(async move { self.record_all(&one).await })
    }

    /// The insertion ids recorded for `rollout_id` (empty when none or expired), in no order.
    fn members<'a>(&'a self, rollout_id: &'a str) -> StoreFuture<'a, Vec<String>>;
}

// === MemoryStore ===

/// An in-process [`InsertionStore`]: the default when no Redis is configured.
///
/// Rollouts are spread over shards by hash, each shard behind its own `std::sync::Mutex` held
/// only for a map operation (never across an `.await`), so concurrent requests on different
/// rollouts rarely meet. Expired sets read as empty and are swept from a shard at most once per
/// `ttl / 4` on a write to that shard, so memory stays bounded by the traffic of one TTL.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    ttl: Duration,
}

#[derive(Default)]
struct Shard {
    sets: HashMap<String, Entry>,
    next_sweep: Option<Instant>,
}

struct Entry {
    ids: HashSet<String>,
    expires_at: Instant,
}

impl MemoryStore {
    /// A store with the default TTL of 24 hours and one shard per 4 × available cores (≥ 16).
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards((cores * 4).max(16))
    }

    /// A store with `shards` shards (at least one).
    pub fn with_shards(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            ttl: DEFAULT_TTL,
        }
    }

    /// Sets the time to live of a rollout's set after its last write.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    fn shard(&self, rollout_id: &str) -> &Mutex<Shard> {
        let index = (self.hasher.hash_one(rollout_id) % self.shards.len() as u64) as usize;
        &self.shards[index]
    }

    fn insert(&self, rollout_id: &str, insertion_id: &str) {
        let now = Instant::now();
        let expires_at = now + self.ttl;
        // A poisoned shard only means another thread panicked mid-insert; the map is still valid.
        let mut shard = self.shard(rollout_id).lock().unwrap_or_else(PoisonError::into_inner);
        if shard.next_sweep.is_none_or(|at| now >= at) {
            shard.sets.retain(|_, entry| entry.expires_at > now);
            shard.next_sweep = Some(now + self.ttl / 4);
        }
        match shard.sets.get_mut(rollout_id) {
            Some(entry) => {
                if entry.expires_at <= now {
                    entry.ids.clear();
                }
                entry.ids.insert(insertion_id.to_owned());
                entry.expires_at = expires_at;
            }
            None => {
                let ids = HashSet::from([insertion_id.to_owned()]);
                shard.sets.insert(rollout_id.to_owned(), Entry { ids, expires_at });
            }
        }
    }

    fn read(&self, rollout_id: &str) -> Vec<String> {
        let now = Instant::now();
        let shard = self.shard(rollout_id).lock().unwrap_or_else(PoisonError::into_inner);
        match shard.sets.get(rollout_id) {
            Some(entry) if entry.expires_at > now => entry.ids.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").field("shards", &self.shards.len()).field("ttl", &self.ttl).finish()
    }
}

impl InsertionStore for MemoryStore {
    fn record_all<'a>(&'a self, insertions: &'a [Insertion]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            for insertion in insertions {
                self.insert(&insertion.rollout_id, &insertion.insertion_id);
            }
            Ok(())
        })
    }

    fn members<'a>(&'a self, rollout_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move { Ok(self.read(rollout_id)) })
    }
}
