//! The layer's counters, read by `GET /stats` and the metrics endpoint.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::store::RateStore;

/// Counters of a [`RateLimitFallbackLayer`](crate::RateLimitFallbackLayer), with the original's
/// names. All relaxed atomics: bumping one costs no lock.
pub struct Stats {
    /// Chat requests seen.
    pub total_requests: AtomicU64,
    /// Requests answered by the model the client asked for.
    pub primary_requests: AtomicU64,
    /// Requests answered by another model (context or rate-limit fallback).
    pub fallback_requests: AtomicU64,
    /// Waits for budget (local limits or an upstream `Retry-After`) within `max_wait`.
    pub rate_limit_waits: AtomicU64,
    /// Models given up for rate-limit reasons (a request can count several).
    pub rate_limit_fallbacks: AtomicU64,
    /// Requests that arrived already rerouted by context routing.
    pub context_fallbacks: AtomicU64,
    /// Upstream 429 responses.
    pub upstream_429s: AtomicU64,
    /// Cooldowns started after an upstream 429.
    pub cooldowns_started: AtomicU64,
    /// Requests refused with a 429 because the chain was exhausted.
    pub chains_exhausted: AtomicU64,
    /// When each cooled-down model is free again (touched only on upstream 429s).
    cooldowns: Mutex<HashMap<Arc<str>, Instant>>,
    store: Arc<dyn RateStore>,
}

impl Stats {
    pub(crate) fn new(store: Arc<dyn RateStore>) -> Self {
        Self {
            total_requests: AtomicU64::new(0),
            primary_requests: AtomicU64::new(0),
            fallback_requests: AtomicU64::new(0),
            rate_limit_waits: AtomicU64::new(0),
            rate_limit_fallbacks: AtomicU64::new(0),
            context_fallbacks: AtomicU64::new(0),
            upstream_429s: AtomicU64::new(0),
            cooldowns_started: AtomicU64::new(0),
            chains_exhausted: AtomicU64::new(0),
            cooldowns: Mutex::new(HashMap::new()),
            store,
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cooled_down(&self, model: &Arc<str>, duration: Duration) {
        Self::bump(&self.cooldowns_started);
        let until = Instant::now() + duration;
        let mut cooldowns = self.cooldowns.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        cooldowns.retain(|_, end| *end > now);
        let end = cooldowns.entry(model.clone()).or_insert(until);
        *end = (*end).max(until);
    }

    /// Models this process saw cooled down that are still cooling down.
    pub fn cooldowns_active(&self) -> usize {
        let now = Instant::now();
        let cooldowns = self.cooldowns.lock().unwrap_or_else(|p| p.into_inner());
        cooldowns.values().filter(|end| **end > now).count()
    }

    /// All counters as one JSON object, with `fallback_rate_percent`
    /// (`fallback_requests / total_requests × 100`).
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let total = get(&self.total_requests);
        let fallback = get(&self.fallback_requests);
        let rate = if total == 0 { 0.0 } else { fallback as f64 / total as f64 * 100.0 };
        let health = self.store.health();
        json!({
            "total_requests": total,
            "primary_requests": get(&self.primary_requests),
            "fallback_requests": fallback,
            "rate_limit_waits": get(&self.rate_limit_waits),
            "rate_limit_fallbacks": get(&self.rate_limit_fallbacks),
            "context_fallbacks": get(&self.context_fallbacks),
            "fallback_rate_percent": rate,
            "upstream_429s": get(&self.upstream_429s),
            "cooldowns_started": get(&self.cooldowns_started),
            "cooldowns_active": self.cooldowns_active(),
            "chains_exhausted": get(&self.chains_exhausted),
            "store_errors": health.errors,
            "store_outages": health.outages,
            "store_in_outage": health.in_outage,
        })
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").field("snapshot", &self.snapshot()).finish()
    }
}
