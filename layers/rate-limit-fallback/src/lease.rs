//! [`LeasedRateStore`]: each replica takes a slice of a model's budget from Redis in one script
//! call and spends it locally, so most checks make no round trip.
//!
//! **Leases.** A check takes one request (rpm and rpd together) and its token estimate (tpm)
//! from the replica's lease of the model. A lease is topped up to one *slice* (`lease_slice` ×
//! each limit: requests from the smaller of rpm and rpd, tokens from tpm; at least 1) by one
//! script call that also hands back what an expired lease did not use; the call is made in the
//! background once less than half a slice is left (ahead of need), and on the request's path
//! only when the lease is empty. A lease lasts one window (and never past the next daily
//! boundary); its unused requests and tokens are handed back with the next call, and all of it
//! on [`release`](RateStore::release) (graceful shutdown).
//!
//! **TPM corrections** are settled in the lease the estimate came out of, without a call: what
//! a request did not use stays in the lease (and goes back with it), what it used beyond its
//! estimate is taken from the lease (owed from the next grant when the lease runs short). A
//! correction that finds no current lease goes to Redis (batched per model).
//!
//! **Cooldowns and refusals** are read from the local copy, which every lease call refreshes
//! (it returns the model's shared cooldown) and which is refreshed at least every
//! `cooldown_refresh` (default 1 s: in the background while traffic flows, on the path after
//! an idle spell). A refusal is remembered until then too. A cooldown this replica starts is
//! local at once. Checks that name a client scope (the client's own key or endpoint) are rare
//! and go through the per-request script, as in exact mode; so do all checks while Redis is
//! unreachable (the outage policy applies).
//!
//! **The bound.** Each replica holds at most one slice unspent. Redis never grants more than
//! the limit within one window, so over any window (rpm) or day (rpd), N replicas admit at
//! most **limit + N × slice** requests of a model: a request uses a unit granted within that
//! window (at most the limit) or one still held when it began (at most N × slice). Within the
//! window in which the leases were taken, never more than the limit. For tpm: the bucket's own
//! allowance plus N × slice tokens. A replica that dies hands nothing back: its requests lapse
//! with the window, its rpd share stays used until the day ends (fewer admitted, never more).

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use llmgate_core::catalog::Limits;
use redis::aio::ConnectionLike;
use tokio::{sync::Notify, time::Instant};

use crate::{
    redis::{LeaseAsk, LeaseReply, RedisRateStore},
    store::{BoxFuture, Cooldowns, Decision, LimitKind, RateStore, StoreHealth},
};

/// The default slice: 5 % of each limit per lease.
pub const DEFAULT_LEASE_SLICE: f64 = 0.05;
/// The default age after which the local copy of a model's cooldown is read again.
pub const DEFAULT_COOLDOWN_REFRESH: Duration = Duration::from_secs(1);

const SHARDS: usize = 32;
/// Checks of one request that found the lease empty go to Redis at most this often before the
/// per-request script decides (a lease emptied by others between two calls).
const MAX_TAKES: usize = 3;

/// One shard of the models' leases.
type Shard = Mutex<HashMap<Box<str>, Arc<ModelLease>>>;

/// A [`RateStore`] that spends leases of a shared [`RedisRateStore`]'s budgets; see the module
/// docs for the bound on over-admission.
pub struct LeasedRateStore<C> {
    redis: Arc<RedisRateStore<C>>,
    models: Box<[Shard]>,
    hasher: RandomState,
    slice: f64,
    refresh: Duration,
    lease_prefix: String,
    seq: AtomicU64,
}

/// One model's lease on this replica.
#[derive(Default)]
struct ModelLease {
    state: Mutex<LeaseState>,
    /// Wakes the checks waiting for a lease call under way.
    taken: Notify,
}

#[derive(Default)]
struct LeaseState {
    /// The limits the lease was taken under (a config change starts over).
    limits: Option<Limits>,
    requests: u64,
    tokens: i64,
    expires: Option<Instant>,
    /// Until when the cooldown and refusal below are current.
    fresh_until: Option<Instant>,
    cool_until: Option<Instant>,
    refused: Option<Refusal>,
    /// A lease call is under way.
    taking: bool,
    /// What expired leases did not use, handed back with the next call.
    back_requests: u64,
    /// Tokens to give back (negative: tokens spent beyond the lease, still owed).
    back_tokens: i64,
    /// The rpm log entries of the leases held (see [`rpm_entry`]): lease id, requests granted,
    /// when.
    grants: Vec<(String, u64, Instant)>,
}

#[derive(Clone, Copy)]
struct Refusal {
    limited_by: LimitKind,
    /// When the model has budget again (what the check reports).
    retry_at: Instant,
    /// When to ask Redis again.
    recheck_at: Instant,
}

/// How much a lease of `limits` holds.
#[derive(Clone, Copy)]
struct Slice {
    /// Requests per lease; `None` when neither rpm nor rpd is limited.
    requests: Option<u64>,
    /// Tokens per lease; `None` when tpm is unlimited.
    tokens: Option<u64>,
}

impl Slice {
    fn of(limits: &Limits, fraction: f64) -> Self {
        let part = |limit: u64| ((limit as f64 * fraction) as u64).max(1);
        let requests = match (limits.rpm, limits.rpd) {
            (None, None) => None,
            (a, b) => Some(part(a.unwrap_or(u64::MAX).min(b.unwrap_or(u64::MAX)))),
        };
        Self { requests, tokens: limits.tpm.map(part) }
    }
}

/// A lease call to make: what to ask for and what to hand back.
struct Take {
    id: String,
    want: u64,
    tokens_want: u64,
    tokens_need: u64,
    back_requests: u64,
    back_tokens: i64,
    back_entries: Vec<(String, u64)>,
}

/// A lease's entry in the rpm log: `<requests>:<lease id>` (the format the lease script writes).
fn rpm_entry(id: &str, requests: u64) -> String {
    format!("{requests}:{id}")
}

// === impl LeaseState ===

impl LeaseState {
    /// Starts over on new limits; hands an expired lease back.
    fn settle(&mut self, limits: &Limits, now: Instant, window: Duration) {
        if self.limits != Some(*limits) {
            self.hand_back_all();
            self.limits = Some(*limits);
            self.fresh_until = None;
            self.refused = None;
        }
        if self.expires.is_some_and(|at| at <= now) {
            // Its rpm entries have left the window in Redis too.
            self.back_requests += std::mem::take(&mut self.requests);
            self.back_tokens = self.back_tokens.saturating_add(std::mem::take(&mut self.tokens));
            self.expires = None;
        }
        self.grants.retain(|(_, _, at)| *at + window > now);
    }

    fn hand_back_all(&mut self) {
        self.back_requests += std::mem::take(&mut self.requests);
        self.back_tokens = self.back_tokens.saturating_add(std::mem::take(&mut self.tokens));
        self.expires = None;
    }

    /// The rpm log entries of the `n` requests held (the newest grants') and how many of each
    /// entry's requests they are, to hand back.
    fn entries_held(&self, n: u64) -> Vec<(String, u64)> {
        let mut entries = Vec::new();
        let mut left = n;
        for (id, granted, _) in self.grants.iter().rev() {
            if left == 0 {
                break;
            }
            let back = left.min(*granted);
            entries.push((rpm_entry(id, *granted), back));
            left -= back;
        }
        entries
    }

    /// Time to top the lease up (in the background, while it still has some).
    fn wants_more(&self, slice: Slice, now: Instant, refresh: Duration) -> bool {
        slice.requests.is_some_and(|s| self.requests.saturating_mul(2) < s)
            || slice.tokens.is_some_and(|s| u64::try_from(self.tokens).map_or(true, |t| t.saturating_mul(2) < s))
            || self.fresh_until.is_none_or(|fresh| fresh < now + refresh / 2)
    }

    /// The call that tops the lease up to a slice (at least `tokens_need` tokens), with what is
    /// to be handed back.
    fn take(&mut self, slice: Slice, tokens_need: u64, id: String) -> Take {
        let held_tokens = u64::try_from(self.tokens).unwrap_or(0);
        let tokens_want = slice.tokens.map_or(0, |s| s.saturating_sub(held_tokens)).max(tokens_need);
        Take {
            id,
            want: slice.requests.map_or(0, |s| s.saturating_sub(self.requests)),
            tokens_want,
            tokens_need,
            back_requests: std::mem::take(&mut self.back_requests),
            back_tokens: std::mem::take(&mut self.back_tokens),
            back_entries: Vec::new(),
        }
    }
}

// === impl LeasedRateStore ===

impl<C> LeasedRateStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Leases over `redis`, with slices of 5 % and cooldowns re-read every second.
    pub fn new(redis: RedisRateStore<C>) -> Self {
        Self {
            redis: Arc::new(redis),
            models: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            slice: DEFAULT_LEASE_SLICE,
            refresh: DEFAULT_COOLDOWN_REFRESH,
            lease_prefix: uuid::Uuid::new_v4().simple().to_string(),
            seq: AtomicU64::new(0),
        }
    }

    /// The share of each limit one lease takes (`lease_slice`, clamped to (0, 1]; each lease
    /// holds at least one request and one token).
    pub fn slice(mut self, fraction: f64) -> Self {
        self.slice = if fraction.is_finite() { fraction.clamp(f64::MIN_POSITIVE, 1.0) } else { DEFAULT_LEASE_SLICE };
        self
    }

    /// How old the local copy of a cooldown may get before it is read again (default 1 s).
    pub fn cooldown_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh.max(Duration::from_millis(1));
        self
    }

    fn lease(&self, model: &str) -> Arc<ModelLease> {
        let shard = (self.hasher.hash_one(model) as usize) % self.models.len();
        let mut models = self.models[shard].lock().unwrap_or_else(PoisonError::into_inner);
        match models.get(model) {
            Some(lease) => lease.clone(),
            None => models.entry(model.into()).or_default().clone(),
        }
    }

    fn lease_id(&self) -> String {
        format!("{}-{}", self.lease_prefix, self.seq.fetch_add(1, Ordering::Relaxed))
    }

    async fn check_leased(&self, model: &str, limits: &Limits, tokens: u64) -> Decision {
        let lease = self.lease(model);
        let slice = Slice::of(limits, self.slice);
        let need = limits.tpm.map_or(0, |tpm| tokens.min(tpm));
        for _ in 0..MAX_TAKES {
            let take = {
                let mut state = lease.state.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                state.settle(limits, now, self.redis.window_len());
                if let Some(until) = state.cool_until.filter(|until| *until > now) {
                    return Decision::Limited { limited_by: LimitKind::Cooldown, retry_after: until - now };
                }
                let fresh = state.fresh_until.is_some_and(|fresh| fresh > now);
                let has_requests = slice.requests.is_none() || state.requests >= 1;
                let has_tokens = limits.tpm.is_none() || state.tokens >= i64::try_from(need).unwrap_or(i64::MAX);
                if fresh && has_requests && has_tokens {
                    if slice.requests.is_some() {
                        state.requests -= 1;
                    }
                    if limits.tpm.is_some() {
                        state.tokens = state.tokens.saturating_sub(i64::try_from(tokens).unwrap_or(i64::MAX));
                    }
                    if !state.taking && state.wants_more(slice, now, self.refresh) {
                        state.taking = true;
                        let take = state.take(slice, 0, self.lease_id());
                        drop(state);
                        self.take_in_background(model, lease.clone(), *limits, take);
                    }
                    return Decision::Allowed;
                }
                if let Some(refusal) = state.refused.filter(|r| fresh && r.recheck_at > now) {
                    let retry_after = refusal.retry_at.saturating_duration_since(now).max(Duration::from_millis(1));
                    return Decision::Limited { limited_by: refusal.limited_by, retry_after };
                }
                if state.taking {
                    // Registered before the lock is released: the call's end cannot be missed.
                    let mut taken = Box::pin(lease.taken.notified());
                    taken.as_mut().enable();
                    Err(taken)
                } else {
                    state.taking = true;
                    let held = u64::try_from(state.tokens).unwrap_or(0);
                    let tokens_need = if has_tokens { 0 } else { need.saturating_sub(held) };
                    Ok(state.take(slice, tokens_need, self.lease_id()))
                }
            };
            let take = match take {
                Ok(take) => take,
                Err(taken) => {
                    taken.await;
                    continue;
                }
            };
            if take_lease(&self.redis, model, &lease, *limits, take, self.refresh).await.is_none() {
                return self.redis.outage_decision(model, Cooldowns::Shared, limits, tokens);
            }
        }
        self.redis.check_with(model, Cooldowns::Shared, limits, tokens).await
    }

    fn take_in_background(&self, model: &str, lease: Arc<ModelLease>, limits: Limits, take: Take) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            lease.state.lock().unwrap_or_else(PoisonError::into_inner).taking = false;
            return;
        };
        let (redis, model, refresh) = (self.redis.clone(), model.to_owned(), self.refresh);
        runtime.spawn(async move {
            let _ = take_lease(&redis, &model, &lease, limits, take, refresh).await;
        });
    }

    /// Hands back every lease: unused requests (their rpm entries and rpd counts) and tokens.
    pub async fn release_all(&self) {
        let leases: Vec<(Box<str>, Arc<ModelLease>)> = self
            .models
            .iter()
            .flat_map(|shard| {
                let models = shard.lock().unwrap_or_else(PoisonError::into_inner);
                models.iter().map(|(model, lease)| (model.clone(), lease.clone())).collect::<Vec<_>>()
            })
            .collect();
        for (model, lease) in leases {
            // A top-up under way would take again what is handed back: let it land first.
            loop {
                let taken = {
                    let state = lease.state.lock().unwrap_or_else(PoisonError::into_inner);
                    if !state.taking {
                        break;
                    }
                    let mut taken = Box::pin(lease.taken.notified());
                    taken.as_mut().enable();
                    taken
                };
                taken.await;
            }
            let (limits, take) = {
                let mut state = lease.state.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(limits) = state.limits else { continue };
                let entries = state.entries_held(state.requests);
                state.hand_back_all();
                state.grants.clear();
                state.fresh_until = None;
                let mut take = state.take(Slice { requests: None, tokens: None }, 0, self.lease_id());
                take.back_entries = entries;
                (limits, take)
            };
            if take.back_requests == 0 && take.back_tokens == 0 && take.back_entries.is_empty() {
                continue;
            }
            let ask = ask_of(&take);
            if self.redis.lease(&model, &limits, &ask).await.is_none() {
                tracing::warn!(%model, "rate-limit lease not handed back: Redis unreachable");
            }
        }
    }
}

fn ask_of(take: &Take) -> LeaseAsk<'_> {
    LeaseAsk {
        id: &take.id,
        want: take.want,
        tokens_want: take.tokens_want,
        tokens_need: take.tokens_need,
        back_requests: take.back_requests,
        back_tokens: take.back_tokens,
        back_entries: &take.back_entries,
    }
}

/// Makes one lease call and files its answer; `None` when Redis is unreachable (what was to be
/// handed back is kept for the next call).
async fn take_lease<C>(
    redis: &RedisRateStore<C>,
    model: &str,
    lease: &ModelLease,
    limits: Limits,
    take: Take,
    refresh: Duration,
) -> Option<()>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let reply = redis.lease(model, &limits, &ask_of(&take)).await;
    let mut state = lease.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.taking = false;
    let now = Instant::now();
    let filed = match reply {
        None => {
            state.back_requests += take.back_requests;
            state.back_tokens = state.back_tokens.saturating_add(take.back_tokens);
            None
        }
        Some(reply) => {
            state.fresh_until = Some(now + refresh);
            state.refused = None;
            // A cooldown is never shortened: one this replica started may not have reached Redis
            // when this call read it.
            match reply {
                LeaseReply::Granted { requests, tokens, valid } if state.limits == Some(limits) => {
                    state.requests += requests;
                    state.tokens = state.tokens.saturating_add(i64::try_from(tokens).unwrap_or(i64::MAX));
                    if requests > 0 || tokens > 0 {
                        state.expires = Some(now + redis.window_len().min(valid));
                        state.grants.push((take.id, requests, now));
                    }
                }
                LeaseReply::Granted { requests, tokens, .. } => {
                    // The limits changed meanwhile: this lease goes back with the next call.
                    state.back_requests += requests;
                    state.back_tokens = state.back_tokens.saturating_add(i64::try_from(tokens).unwrap_or(i64::MAX));
                }
                LeaseReply::Refused { limited_by: LimitKind::Cooldown, retry_after } => {
                    let until = now + retry_after;
                    state.cool_until = Some(state.cool_until.map_or(until, |at| at.max(until)));
                }
                LeaseReply::Refused { limited_by, retry_after } => {
                    state.refused = Some(Refusal {
                        limited_by,
                        retry_at: now + retry_after,
                        recheck_at: now + retry_after.min(refresh),
                    });
                }
            }
            Some(())
        }
    };
    drop(state);
    lease.taken.notify_waiters();
    filed
}

impl<C> fmt::Debug for LeasedRateStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeasedRateStore")
            .field("slice", &self.slice)
            .field("cooldown_refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl<C> RateStore for LeasedRateStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn check_with<'a>(
        &'a self,
        model: &'a str,
        cooldowns: Cooldowns<'a>,
        limits: &'a Limits,
        tokens: u64,
    ) -> BoxFuture<'a, Decision> {
        match cooldowns {
            Cooldowns::Shared => Box::pin(self.check_leased(model, limits, tokens)),
            scoped => self.redis.check_with(model, scoped, limits, tokens),
        }
    }

    fn correct_tokens<'a>(
        &'a self,
        model: &'a str,
        limits: &'a Limits,
        estimated: u64,
        actual: u64,
    ) -> BoxFuture<'a, ()> {
        if limits.tpm.is_none() || estimated == actual {
            return Box::pin(async {});
        }
        // The estimate came out of this replica's lease: the difference is settled there (what
        // is left goes back with the lease, what was overspent is owed from the next grant).
        let lease = self.lease(model);
        let mut state = lease.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.limits != Some(*limits) || state.expires.is_none_or(|at| at <= Instant::now()) {
            drop(state);
            return self.redis.correct_tokens(model, limits, estimated, actual);
        }
        let given_back =
            i64::try_from(estimated).unwrap_or(i64::MAX).saturating_sub(i64::try_from(actual).unwrap_or(i64::MAX));
        state.tokens = state.tokens.saturating_add(given_back);
        if given_back > 0 {
            // Tokens came back: a tpm refusal remembered here may no longer hold.
            state.refused = state.refused.filter(|refusal| refusal.limited_by != LimitKind::Tpm);
        }
        Box::pin(async {})
    }

    fn cool_down<'a>(&'a self, model: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        let until = Instant::now() + duration;
        {
            let lease = self.lease(model);
            let mut state = lease.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.cool_until = Some(state.cool_until.map_or(until, |at| at.max(until)));
        }
        self.redis.cool_down(model, duration)
    }

    fn cool_down_scope<'a>(&'a self, model: &'a str, scope: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        self.redis.cool_down_scope(model, scope, duration)
    }

    fn until_daily_reset(&self) -> Duration {
        self.redis.until_daily_reset()
    }

    fn health(&self) -> StoreHealth {
        self.redis.health()
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.release_all())
    }
}
