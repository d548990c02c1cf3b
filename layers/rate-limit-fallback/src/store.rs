//! The budget store: one check-and-consume per attempt, cooldowns, tpm corrections.
//!
//! Semantics shared by every implementation (and tested by one shared suite):
//!
//! - **rpm**: an exact sliding log of the last window (60 s): a request is allowed while fewer
//!   than `rpm` requests were allowed in the window; when refused, `retry_after` is the time
//!   until enough entries leave the window.
//! - **tpm**: a token bucket of capacity `tpm` that refills at `tpm` per window (a continuous
//!   version of the 60 s sliding window with O(1) state, corrections are a simple add). A check
//!   needs `min(estimate, tpm)` tokens in the bucket and takes `estimate` (the level may go
//!   negative for a request larger than the whole budget, which then waits for the refill);
//!   [`RateStore::correct_tokens`] adds the difference between the real usage and the estimate.
//! - **rpd**: a counter per UTC day, the day starting at the configured boundary (default
//!   00:00 UTC); when refused, `retry_after` is the time to the next boundary.
//! - **cooldown**: a model cooled down refuses every check that consults its shared cooldown
//!   until the cooldown ends. A cooldown of one client scope (a 429 earned with a client's own
//!   key or endpoint, named by a digest) refuses only the checks that name that scope
//!   ([`Cooldowns`]).
//! - `None` limits are unlimited and never refuse. A check consumes all three budgets or none.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use llmgate_core::catalog::Limits;
use tokio::time::Instant;

/// A boxed `Send` future, the return type of the object-safe [`RateStore`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The rpm and tpm window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// One day.
pub const DAY: Duration = Duration::from_secs(86_400);

/// Which budget refused a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Requests per minute.
    Rpm,
    /// Tokens per minute.
    Tpm,
    /// Requests per day.
    Rpd,
    /// The model is cooling down after an upstream 429.
    Cooldown,
    /// The shared store is unreachable and the policy is `fail_closed`.
    Unavailable,
}

impl LimitKind {
    /// The `reason` of a `rate_limit_fallback` event. A fail-closed store outage reports
    /// `cooldown`: the model is unusable for a while, and the event reasons are a closed set.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Rpm => "rpm",
            Self::Tpm => "tpm",
            Self::Rpd => "rpd",
            Self::Cooldown | Self::Unavailable => "cooldown",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unavailable => "unavailable",
            other => other.reason(),
        })
    }
}

/// Which cooldowns a check consults, besides the model's rpm, tpm and rpd (which every check
/// consults: they are the operator's limits for the model, whoever's key is used).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cooldowns<'a> {
    /// The model's shared cooldown: a 429 earned with the gateway's own credentials.
    #[default]
    Shared,
    /// The shared one and that of one client scope: the request carries client credentials
    /// that an attempt may or may not send (that depends on the upstream's server-side key).
    SharedAndScope(&'a str),
    /// Only that of one client scope: the request goes to an endpoint the client chose, where
    /// the gateway's own credentials never go.
    Scope(&'a str),
}

/// The answer of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The budgets had room and were consumed.
    Allowed,
    /// Refused; nothing was consumed.
    Limited {
        /// The budget that refused (the one with the longest wait when several did).
        limited_by: LimitKind,
        /// When the model has budget again (for this request's estimate).
        retry_after: Duration,
    },
}

impl Decision {
    /// Whether the check was allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed)
    }
}

/// Counters of a store's health, for the metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Failed store calls.
    pub errors: u64,
    /// Outages (a run of failures between two successes counts once).
    pub outages: u64,
    /// Whether the store is in an outage now.
    pub in_outage: bool,
}

/// Where per-model budgets live. Object safe: the layer holds an `Arc<dyn RateStore>`.
///
/// Methods never fail: a store that cannot reach its backend applies its outage policy.
pub trait RateStore: Send + Sync + 'static {
    /// Checks rpm, tpm (with `tokens`, the request's estimate) and rpd of `model` together,
    /// and the model's shared cooldown; consumes all three when allowed.
    fn check<'a>(&'a self, model: &'a str, limits: &'a Limits, tokens: u64) -> BoxFuture<'a, Decision> {
        self.check_with(model, Cooldowns::Shared, limits, tokens)
    }

    /// [`check`](Self::check), consulting `cooldowns` (the one check-and-consume of an attempt).
    fn check_with<'a>(
        &'a self,
        model: &'a str,
        cooldowns: Cooldowns<'a>,
        limits: &'a Limits,
        tokens: u64,
    ) -> BoxFuture<'a, Decision>;

    /// Corrects the tpm budget of an allowed check once the real usage is known:
    /// `actual - estimated` tokens are taken (or given back when negative). A shared store may
    /// batch corrections: when several are made at once, some return before theirs is written
    /// (by the call writing the batch, within one round trip).
    fn correct_tokens<'a>(
        &'a self,
        model: &'a str,
        limits: &'a Limits,
        estimated: u64,
        actual: u64,
    ) -> BoxFuture<'a, ()>;

    /// Cools `model` down for `duration` from now, for every request (an earlier end never
    /// shortens a longer cooldown). Relative rather than absolute because a shared store
    /// measures it on its own clock.
    fn cool_down<'a>(&'a self, model: &'a str, duration: Duration) -> BoxFuture<'a, ()>;

    /// Cools `model` down for `duration` from now for one client `scope` only (a digest, never
    /// a key): the checks that name that scope are refused, no other (an earlier end never
    /// shortens a longer cooldown).
    fn cool_down_scope<'a>(&'a self, model: &'a str, scope: &'a str, duration: Duration) -> BoxFuture<'a, ()>;

    /// The time until the next daily reset (the rpd boundary), on this store's clock.
    fn until_daily_reset(&self) -> Duration;

    /// The store's health counters (an in-process store never fails).
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Hands back what this replica holds of the shared budgets (leases), on graceful
    /// shutdown. Nothing to do for a store that holds nothing.
    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl<T: RateStore + ?Sized> RateStore for Arc<T> {
    fn check<'a>(&'a self, model: &'a str, limits: &'a Limits, tokens: u64) -> BoxFuture<'a, Decision> {
        (**self).check(model, limits, tokens)
    }

    fn check_with<'a>(
        &'a self,
        model: &'a str,
        cooldowns: Cooldowns<'a>,
        limits: &'a Limits,
        tokens: u64,
    ) -> BoxFuture<'a, Decision> {
        (**self).check_with(model, cooldowns, limits, tokens)
    }

    fn correct_tokens<'a>(
        &'a self,
        model: &'a str,
        limits: &'a Limits,
        estimated: u64,
        actual: u64,
    ) -> BoxFuture<'a, ()> {
        (**self).correct_tokens(model, limits, estimated, actual)
    }

    fn cool_down<'a>(&'a self, model: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        (**self).cool_down(model, duration)
    }

    fn cool_down_scope<'a>(&'a self, model: &'a str, scope: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        (**self).cool_down_scope(model, scope, duration)
    }

    fn until_daily_reset(&self) -> Duration {
        (**self).until_daily_reset()
    }

    fn health(&self) -> StoreHealth {
        (**self).health()
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        (**self).release()
    }
}

// === Clock ===

/// Where a store reads the time. Tests use [`TokioClock`] under `tokio::time::pause()`.
pub trait Clock: Send + Sync + 'static {
    /// A monotonic instant.
    fn now(&self) -> Instant;
    /// Wall-clock time since the Unix epoch (for the daily boundary).
    fn unix_now(&self) -> Duration;
}

/// The default clock: tokio's `Instant` (pausable), and a wall clock that is the system time
/// at creation advanced by tokio's clock, so a paused test moves both together.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    origin: Instant,
    origin_unix: Duration,
}

impl TokioClock {
    /// A clock whose wall time starts at the system time.
    pub fn new() -> Self {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self::starting_at(unix)
    }

    /// A clock whose wall time starts at `unix` (since the epoch), for tests.
    pub fn starting_at(unix: Duration) -> Self {
        Self { origin: Instant::now(), origin_unix: unix }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_now(&self) -> Duration {
        self.origin_unix + Instant::now().saturating_duration_since(self.origin)
    }
}

/// The day number of `unix` for days starting `boundary` after 00:00 UTC, and the time to the
/// next day.
pub(crate) fn day_and_rest(unix: Duration, boundary: Duration) -> (u64, Duration) {
    let day_ms = DAY.as_millis() as u64;
    let ms = (unix.as_millis() as u64).saturating_sub(boundary.as_millis() as u64 % day_ms);
    let day = ms / day_ms;
    let rest = day_ms - ms % day_ms;
    (day, Duration::from_millis(rest))
}

/// Divides limits by the number of replicas sharing them (at least 1 where a limit is set and
/// not 0), for a per-process fallback during a shared-store outage.
pub(crate) fn divide_limits(limits: &Limits, replicas: u32) -> Limits {
    let replicas = u64::from(replicas.max(1));
    let split = |l: Option<u64>| l.map(|n| if n == 0 { 0 } else { (n / replicas).max(1) });
    Limits { rpm: split(limits.rpm), tpm: split(limits.tpm), rpd: split(limits.rpd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_boundary_math() {
        let midnight = Duration::from_secs(20_000 * 86_400);
        let (day, rest) = day_and_rest(midnight - Duration::from_secs(10), Duration::ZERO);
        assert_eq!((day, rest), (19_999, Duration::from_secs(10)));
        let (day, rest) = day_and_rest(midnight, Duration::ZERO);
        assert_eq!((day, rest), (20_000, DAY));
        // A boundary at 07:00 UTC: at 06:59:50 the day has 10 s left.
        let seven = Duration::from_secs(7 * 3600);
        let (_, rest) = day_and_rest(midnight + seven - Duration::from_secs(10), seven);
        assert_eq!(rest, Duration::from_secs(10));
    }

    #[test]
    fn divided_limits_keep_unlimited() {
        let limits = Limits { rpm: Some(50), tpm: None, rpd: Some(1) };
        assert_eq!(divide_limits(&limits, 2), Limits { rpm: Some(25), tpm: None, rpd: Some(1) });
    }
}
