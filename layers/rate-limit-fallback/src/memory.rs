//! The in-process store: per-model state in hash-sharded maps, one short critical section per
//! check on the model's shard only (no global lock). Client-scope cooldowns live in maps of
//! their own, sharded the same way and skipped while there is none.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry, hash_map::RandomState},
    hash::BuildHasher,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use llmgate_core::catalog::Limits;
use tokio::time::Instant;

use crate::store::{
    BoxFuture, Clock, Cooldowns, DAY, Decision, LimitKind, RateStore, TokioClock, WINDOW, day_and_rest,
};

const SHARDS: usize = 32;

/// A client-scope shard is pruned of ended cooldowns when it holds this many.
const PRUNE_SCOPES_AT: usize = 256;

type Shard = Mutex<HashMap<Box<str>, ModelState>>;
/// Client-scope cooldowns: `model \x1f scope` → end.
type ScopeShard = Mutex<HashMap<Box<str>, Instant>>;

/// An in-process [`RateStore`]. Cheap to share behind an `Arc`.
///
/// ```
/// use llmgate_core::catalog::Limits;
/// use llmgate_rate_limit_fallback::{Decision, LimitKind, MemoryRateStore, RateStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryRateStore::new();
/// let limits = Limits { rpm: Some(1), tpm: None, rpd: None };
/// assert_eq!(store.check("m", &limits, 10).await, Decision::Allowed);
/// assert!(matches!(
///     store.check("m", &limits, 10).await,
///     Decision::Limited { limited_by: LimitKind::Rpm, .. }
/// ));
/// # }
/// ```
pub struct MemoryRateStore {
    shards: Box<[Shard]>,
    scopes: Box<[ScopeShard]>,
    /// Client-scope cooldowns held (ended ones included until pruned): 0 skips every lookup.
    scoped: AtomicUsize,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
    day_boundary: Duration,
    window: Duration,
}

#[derive(Default)]
struct ModelState {
    /// Allowed requests in the window, oldest first.
    rpm_log: VecDeque<Instant>,
    /// Token bucket: level at `tpm_at` (`None` = full).
    tpm_level: f64,
    tpm_at: Option<Instant>,
    /// rpd counter of day `day`.
    day: u64,
    day_count: u64,
    cooldown_until: Option<Instant>,
}

// === impl MemoryRateStore ===

impl MemoryRateStore {
    /// A store on tokio's clock, days starting at 00:00 UTC.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(TokioClock::new()))
    }

    /// A store reading time from `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            scopes: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            scoped: AtomicUsize::new(0),
            hasher: RandomState::new(),
            clock,
            day_boundary: Duration::ZERO,
            window: WINDOW,
        }
    }

    /// Days (for rpd) start `offset` after 00:00 UTC.
    pub fn day_boundary(mut self, offset: Duration) -> Self {
        self.day_boundary = offset;
        self
    }

    /// The rpm/tpm window (default 60 s; shorter only for tests).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_millis(1));
        self
    }

    fn with_model<T>(&self, model: &str, f: impl FnOnce(&mut ModelState) -> T) -> T {
        let shard = (self.hasher.hash_one(model) as usize) % self.shards.len();
        let mut map = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(model) {
            Some(state) => f(state),
            None => f(map.entry(model.into()).or_default()),
        }
    }

    fn scope_shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Instant>> {
        let shard = (self.hasher.hash_one(key) as usize) % self.scopes.len();
        self.scopes[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the cooldown of `model` for client `scope` ends, if it has not yet.
    fn scope_cooldown(&self, model: &str, scope: &str, now: Instant) -> Option<Instant> {
        if self.scoped.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let key = scope_key(model, scope);
        let mut map = self.scope_shard(&key);
        match map.get(key.as_str()) {
            Some(until) if *until > now => Some(*until),
            Some(_) => {
                map.remove(key.as_str());
                self.scoped.fetch_sub(1, Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    /// The synchronous check behind [`RateStore::check`].
    pub fn check_now(&self, model: &str, limits: &Limits, tokens: u64) -> Decision {
        self.check_now_with(model, Cooldowns::Shared, limits, tokens)
    }

    /// The synchronous check behind [`RateStore::check_with`].
    pub fn check_now_with(&self, model: &str, cooldowns: Cooldowns<'_>, limits: &Limits, tokens: u64) -> Decision {
        let now = self.clock.now();
        let (day, to_next_day) = day_and_rest(self.clock.unix_now(), self.day_boundary);
        let (shared, scope) = match cooldowns {
            Cooldowns::Shared => (true, None),
            Cooldowns::SharedAndScope(scope) => (true, Some(scope)),
            Cooldowns::Scope(scope) => (false, Some(scope)),
        };
        let scope_until = scope.and_then(|scope| self.scope_cooldown(model, scope, now));
        let at = At { now, day, to_next_day, window: self.window };
        self.with_model(model, |s| s.check(limits, tokens, &at, shared, scope_until))
    }

    /// The synchronous correction behind [`RateStore::correct_tokens`].
    pub fn correct_now(&self, model: &str, limits: &Limits, estimated: u64, actual: u64) {
        let Some(tpm) = limits.tpm else { return };
        let now = self.clock.now();
        let window = self.window;
        self.with_model(model, |s| {
            let level = s.tpm_refill(tpm, now, window);
            let delta = actual as f64 - estimated as f64;
            s.tpm_level = (level - delta).clamp(-(tpm as f64), tpm as f64);
            s.tpm_at = Some(now);
        });
    }

    /// The synchronous cooldown behind [`RateStore::cool_down`].
    pub fn cool_down_now(&self, model: &str, duration: Duration) {
        let until = self.clock.now() + duration;
        self.with_model(model, |s| {
            if s.cooldown_until.is_none_or(|current| current < until) {
                s.cooldown_until = Some(until);
            }
        });
    }

    /// The synchronous cooldown behind [`RateStore::cool_down_scope`].
    pub fn cool_down_scope_now(&self, model: &str, scope: &str, duration: Duration) {
        let now = self.clock.now();
        let until = now + duration;
        let key = scope_key(model, scope);
        let mut map = self.scope_shard(&key);
        if map.len() >= PRUNE_SCOPES_AT {
            let before = map.len();
            map.retain(|_, end| *end > now);
            self.scoped.fetch_sub(before - map.len(), Ordering::Relaxed);
        }
        match map.entry(key.into_boxed_str()) {
            Entry::Occupied(mut entry) => {
                if *entry.get() < until {
                    entry.insert(until);
                }
            }
            Entry::Vacant(entry) => {
                entry.insert(until);
                self.scoped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Cooldowns running now: models cooling down for everyone, plus (model, client scope) pairs.
    pub fn cooldowns_active(&self) -> usize {
        let now = self.clock.now();
        let shared: usize = self
            .shards
            .iter()
            .map(|shard| {
                let map = shard.lock().unwrap_or_else(|p| p.into_inner());
                map.values().filter(|s| s.cooldown_until.is_some_and(|u| u > now)).count()
            })
            .sum();
        let scoped: usize = self
            .scopes
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|u| **u > now).count())
            .sum();
        shared + scoped
    }
}

impl Default for MemoryRateStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryRateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRateStore")
            .field("day_boundary", &self.day_boundary)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl RateStore for MemoryRateStore {
    fn check_with<'a>(
        &'a self,
        model: &'a str,
        cooldowns: Cooldowns<'a>,
        limits: &'a Limits,
        tokens: u64,
    ) -> BoxFuture<'a, Decision> {
        let decision = self.check_now_with(model, cooldowns, limits, tokens);
        Box::pin(std::future::ready(decision))
    }

    fn correct_tokens<'a>(
        &'a self,
        model: &'a str,
        limits: &'a Limits,
        estimated: u64,
        actual: u64,
    ) -> BoxFuture<'a, ()> {
        self.correct_now(model, limits, estimated, actual);
        Box::pin(std::future::ready(()))
    }

    fn cool_down<'a>(&'a self, model: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        self.cool_down_now(model, duration);
        Box::pin(std::future::ready(()))
    }

    fn cool_down_scope<'a>(&'a self, model: &'a str, scope: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        self.cool_down_scope_now(model, scope, duration);
        Box::pin(std::future::ready(()))
    }

    fn until_daily_reset(&self) -> Duration {
        day_and_rest(self.clock.unix_now(), self.day_boundary).1
    }
}

fn scope_key(model: &str, scope: &str) -> String {
    format!("{model}\u{1f}{scope}")
}

/// The moment of one check.
#[derive(Clone, Copy)]
struct At {
    now: Instant,
    day: u64,
    to_next_day: Duration,
    window: Duration,
}

// === impl ModelState ===

impl ModelState {
    fn tpm_refill(&self, tpm: u64, now: Instant, window: Duration) -> f64 {
        let capacity = tpm as f64;
        match self.tpm_at {
            None => capacity,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                (self.tpm_level + elapsed * capacity / window.as_secs_f64()).min(capacity)
            }
        }
    }

    /// Checks and consumes; `shared`: whether the model's shared cooldown applies;
    /// `scope_until`: the end of a client-scope cooldown that applies.
    fn check(&mut self, limits: &Limits, tokens: u64, at: &At, shared: bool, scope_until: Option<Instant>) -> Decision {
        let At { now, day, to_next_day, window } = *at;
        let mut cooling = scope_until.filter(|until| *until > now);
        if let Some(until) = self.cooldown_until {
            if until <= now {
                self.cooldown_until = None;
            } else if shared {
                cooling = Some(cooling.map_or(until, |other| other.max(until)));
            }
        }
        if let Some(until) = cooling {
            return Decision::Limited { limited_by: LimitKind::Cooldown, retry_after: until - now };
        }
        let mut refused: Option<(LimitKind, Duration)> = None;
        let mut refuse = |kind, wait: Duration| {
            if refused.is_none_or(|(_, longest)| wait > longest) {
                refused = Some((kind, wait));
            }
        };

        // rpm: drop entries that left the window; the entry whose expiry makes room decides.
        while self.rpm_log.front().is_some_and(|t| now.saturating_duration_since(*t) >= window) {
            self.rpm_log.pop_front();
        }
        if let Some(rpm) = limits.rpm {
            let n = self.rpm_log.len() as u64;
            if n >= rpm {
                let wait = match usize::try_from(n - rpm).ok().and_then(|i| self.rpm_log.get(i)) {
                    Some(t) if rpm > 0 => (*t + window).saturating_duration_since(now),
                    _ => window,
                };
                refuse(LimitKind::Rpm, wait.max(Duration::from_millis(1)));
            }
        } else {
            self.rpm_log.clear();
        }

        let level = limits.tpm.map(|tpm| (tpm, self.tpm_refill(tpm, now, window)));
        if let Some((tpm, level)) = level {
            let need = tokens.min(tpm) as f64;
            if level < need {
                let wait = if tpm == 0 {
                    window
                } else {
                    Duration::from_secs_f64((need - level) * window.as_secs_f64() / tpm as f64)
                };
                refuse(LimitKind::Tpm, wait.max(Duration::from_millis(1)));
            }
        }

        if self.day != day {
            self.day = day;
            self.day_count = 0;
        }
        if let Some(rpd) = limits.rpd
            && self.day_count >= rpd
        {
            refuse(LimitKind::Rpd, to_next_day.min(DAY));
        }

        if let Some((limited_by, retry_after)) = refused {
            return Decision::Limited { limited_by, retry_after };
        }
        if limits.rpm.is_some() {
            self.rpm_log.push_back(now);
        }
        if let Some((_, level)) = level {
            self.tpm_level = level - tokens as f64;
            self.tpm_at = Some(now);
        }
        if limits.rpd.is_some() {
            self.day_count += 1;
        }
        Decision::Allowed
    }
}
