//! Writing records: first in line with the response (bounded by `record_timeout`), then, if
//! that did not succeed, from a bounded background queue retried with capped exponential
//! backoff until the store takes it.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};

use crate::store::InsertionStore;

/// The default capacity of the background retry queue.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;
/// The default first delay between background retries.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(100);
/// The default cap on the delay between background retries.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one background attempt may take before it counts as failed.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

// === Counters ===

/// Counters of the insertion-id records, for a metrics endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    recorded: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    pending: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Ids written to the store (in line or in the background).
    pub recorded: u64,
    /// Ids handed to the background retry queue (the in-line write failed or timed out).
    pub retried: u64,
    /// Failed or timed-out write attempts, in line or in the background.
    pub failed: u64,
    /// Ids lost because the retry queue was full or gone (each logged at error level).
    pub dropped: u64,
    /// Ids waiting in the background queue right now.
    pub pending: u64,
}

impl Counters {
    /// A copy of the counters.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            recorded: self.recorded.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Acquire),
        }
    }
}

// === Recorder ===

/// The background retry settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    pub(crate) attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { min: DEFAULT_RETRY_MIN, max: DEFAULT_RETRY_MAX, attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT }
    }
}

struct Pending {
    rollout_id: Arc<str>,
    insertion_id: Arc<str>,
}

/// What the layer, its services and its response bodies share.
pub(crate) struct Recorder {
    store: Arc<dyn InsertionStore>,
    counters: Arc<Counters>,
    idle: Arc<Notify>,
    queue: mpsc::Sender<Pending>,
    /// The receiver until the worker starts (on the first retry, inside a runtime).
    receiver: Mutex<Option<mpsc::Receiver<Pending>>>,
    started: AtomicBool,
}

impl Recorder {
    pub(crate) fn new(store: Arc<dyn InsertionStore>, capacity: usize) -> Self {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        Self {
            store,
            counters: Arc::new(Counters::default()),
            idle: Arc::new(Notify::new()),
            queue,
            receiver: Mutex::new(Some(receiver)),
            started: AtomicBool::new(false),
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn InsertionStore> {
        &self.store
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Records in line, waiting at most `timeout`; on failure or timeout hands the id to the
    /// background queue. Never fails.
    pub(crate) async fn record(
        self: Arc<Self>,
        rollout_id: Arc<str>,
        insertion_id: Arc<str>,
        timeout: Duration,
        policy: RetryPolicy,
    ) {
        match tokio::time::timeout(timeout, self.store.record(&rollout_id, &insertion_id)).await {
            Ok(Ok(())) => {
                self.counters.recorded.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Err(error)) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%rollout_id, %insertion_id, %error, "insertion id record failed; retrying in the background");
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%rollout_id, %insertion_id, ?timeout, "insertion id record timed out; retrying in the background");
            }
        }
        self.enqueue(Pending { rollout_id, insertion_id }, policy);
    }

    fn enqueue(&self, pending: Pending, policy: RetryPolicy) {
        self.start_worker(policy);
        self.counters.pending.fetch_add(1, Ordering::AcqRel);
        match self.queue.try_send(pending) {
            Ok(()) => {
                self.counters.retried.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                let full = matches!(error, mpsc::error::TrySendError::Full(_));
                let pending = error.into_inner();
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                self.finish_one();
                tracing::error!(
                    rollout_id = %pending.rollout_id,
                    insertion_id = %pending.insertion_id,
                    reason = if full { "retry queue full" } else { "retry worker gone" },
                    "insertion id record DROPPED"
                );
            }
        }
    }

    fn finish_one(&self) {
        if self.counters.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    fn start_worker(&self, policy: RetryPolicy) {
        if self.started.load(Ordering::Acquire) {
            return;
        }
        let Some(receiver) = self.receiver.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        self.started.store(true, Ordering::Release);
        let worker =
            Worker { store: self.store.clone(), counters: self.counters.clone(), idle: self.idle.clone(), policy };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(worker.run(receiver));
            }
            Err(error) => {
                // Without a runtime nothing can be retried: the send below fails and is counted.
                tracing::error!(%error, "insertion id retry worker could not start outside a Tokio runtime");
            }
        }
    }

    /// Waits until the background queue is empty or `deadline` passes; `true` when empty.
    pub(crate) async fn flush(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.counters.pending.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.counters.pending.load(Ordering::Acquire) == 0;
            }
        }
    }
}

struct Worker {
    store: Arc<dyn InsertionStore>,
    counters: Arc<Counters>,
    idle: Arc<Notify>,
    policy: RetryPolicy,
}

impl Worker {
    async fn run(self, mut receiver: mpsc::Receiver<Pending>) {
        while let Some(pending) = receiver.recv().await {
            self.retry(&pending).await;
            if self.counters.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.idle.notify_waiters();
            }
        }
    }

    /// Retries until the store takes the record.
    async fn retry(&self, pending: &Pending) {
        let mut delay = self.policy.min;
        let mut attempt: u32 = 0;
        loop {
            tokio::time::sleep(delay).await;
            attempt = attempt.saturating_add(1);
            let write = self.store.record(&pending.rollout_id, &pending.insertion_id);
            let error = match tokio::time::timeout(self.policy.attempt_timeout, write).await {
                Ok(Ok(())) => {
                    self.counters.recorded.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(rollout_id = %pending.rollout_id, insertion_id = %pending.insertion_id, attempt, "insertion id recorded after retry");
                    return;
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("timed out after {:?}", self.policy.attempt_timeout),
            };
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            delay = delay.saturating_mul(2).min(self.policy.max).max(self.policy.min);
            tracing::error!(
                rollout_id = %pending.rollout_id,
                insertion_id = %pending.insertion_id,
                attempt,
                %error,
                next_retry_in = ?delay,
                "insertion id record retry failed"
            );
        }
    }
}
