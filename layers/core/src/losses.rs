//! [`SpanLosses`]: the Langfuse spans the gateway lost, per rollout.
//!
//! The Langfuse exporter adds to it when it drops spans (its queue was full) or gives an export
//! up (retries exhausted, or refused); the `/traces` route reads it, so a rollout that can never
//! be complete is answered at once instead of after every retry. The proxy hands the same
//! value to both: neither depends on the other.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// How long a loss is remembered: as long as a rollout's insertion ids are kept.
pub const LOSS_TTL: Duration = Duration::from_secs(86_400);
/// Rollouts remembered at most; past that, losses of further rollouts are only counted in
/// [`SpanLosses::unattributed`] (memory stays bounded whatever the traffic).
pub const MAX_ROLLOUTS: usize = 100_000;

/// Langfuse spans lost per rollout. Cheap to clone (a shared handle).
///
/// Written only when spans are lost and read only by `/traces`, never on a chat request's
/// path, so one lock is enough.
///
/// ```
/// use llmgate_core::losses::SpanLosses;
///
/// let losses = SpanLosses::default();
/// losses.add("r1", 2);
/// losses.add("r1", 1);
/// assert_eq!(losses.lost("r1"), 3);
/// assert_eq!(losses.lost("r2"), 0);
/// ```
#[derive(Clone, Default)]
pub struct SpanLosses {
    inner: Arc<Mutex<Lost>>,
}

#[derive(Default)]
struct Lost {
    rollouts: HashMap<Arc<str>, Loss>,
    unattributed: u64,
}

struct Loss {
    spans: u64,
    last: Instant,
}

impl SpanLosses {
    /// Counts `spans` lost spans of `rollout_id`.
    pub fn add(&self, rollout_id: &str, spans: u64) {
        let now = Instant::now();
        let mut lost = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(loss) = lost.rollouts.get_mut(rollout_id) {
            loss.spans = loss.spans.saturating_add(spans);
            loss.last = now;
            return;
        }
        if lost.rollouts.len() >= MAX_ROLLOUTS {
            lost.rollouts.retain(|_, loss| now.duration_since(loss.last) < LOSS_TTL);
        }
        if lost.rollouts.len() >= MAX_ROLLOUTS {
            lost.unattributed = lost.unattributed.saturating_add(spans);
            return;
        }
        lost.rollouts.insert(Arc::from(rollout_id), Loss { spans, last: now });
    }

    /// The spans of `rollout_id` lost in the last [`LOSS_TTL`] (0 when none).
    pub fn lost(&self, rollout_id: &str) -> u64 {
        let lost = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        lost.rollouts.get(rollout_id).filter(|loss| loss.last.elapsed() < LOSS_TTL).map_or(0, |loss| loss.spans)
    }

    /// Lost spans that could not be kept per rollout (more than [`MAX_ROLLOUTS`] rollouts lost
    /// spans within [`LOSS_TTL`]).
    pub fn unattributed(&self) -> u64 {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).unattributed
    }
}

impl fmt::Debug for SpanLosses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lost = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("SpanLosses")
            .field("rollouts", &lost.rollouts.len())
            .field("unattributed", &lost.unattributed)
            .finish()
    }
}
