//! The background OTLP/HTTP exporter: a bounded span queue, per-project batches, gzip, retries.
//!
//! Spans are handed over with [`LangfuseExporter::enqueue`] (the layers hand over a request's
//! record, whose spans the exporter task writes: the exporter knows it only as `WriteSpans`, so
//! it imports nothing of the layers'), which never waits: a short lock around a
//! push onto a queue bounded in spans (default 8192). **When the queue is full the oldest
//! records are dropped** to make room for the new one (OpenTelemetry's `BatchSpanProcessor`
//! drops the new span instead; the newest spans are the ones a client is about to ask for),
//! counted in `dropped` and, per rollout, in the [`SpanLosses`] shared with `/traces` (see
//! [`LangfuseExporter::losses`]). A record with more spans than the whole queue is dropped.
//!
//! One background task drains the queue when it holds 64 spans (fewer if the batches or the
//! queue are smaller) and every `schedule_delay`, so a request seldom wakes it. It only sorts
//! the records into one batch per project (credentials are per project, so spans of different
//! projects never share an export) and hands a project's batch to an export task when it
//! reaches `max_batch_spans` (512) or every `schedule_delay` (5 s): the export task writes the
//! spans, compresses and sends them, so up to `max_concurrent_exports` (8) batches, of one
//! project or several, are built and sent in parallel on the runtime's threads. An export is an
//! `ExportTraceServiceRequest` (the spans written as protobuf by the `span` module), gzipped, POSTed to
//! `{host}/api/public/otel/v1/traces` with the project's Basic auth and
//! `x-langfuse-ingestion-version: 4`. 429/500/502/503/504, timeouts and connection errors are
//! retried with exponential backoff that honours `Retry-After` (Langfuse answers 500 for a
//! storage or queue failure, which passes, so it is retried like the OTLP-retryable codes);
//! 400/401/403 and other statuses drop the batch (`failed`, and per rollout in the
//! [`SpanLosses`]), 401/403 logged at error level. At most `max_concurrent_exports` exports run
//! at once; past that the drain task waits, the queue fills and the oldest spans are dropped,
//! so memory stays bounded during an outage.

use std::{
    collections::{HashMap, VecDeque},
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::Full;
use llmgate_core::{
    ext::{LangfuseKeys, RolloutTags},
    losses::SpanLosses,
};
use opentelemetry_proto::tonic::{common::v1::InstrumentationScope, resource::v1::Resource, trace::v1::Span};
use prost::Message as _;
use tokio::{
    sync::{Notify, Semaphore, mpsc, oneshot},
    time::Instant,
};

use crate::{
    LangfuseClient, client,
    span::{field_len, kv_str, len_field, len_field_head},
};

/// The OTLP path under the Langfuse host.
pub const OTEL_TRACES_PATH: &str = "/api/public/otel/v1/traces";
const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The default queue capacity in spans: a burst of several thousand requests while every
/// export slot is busy (the SDKs' 2048 dropped spans at 75k requests/s).
pub const DEFAULT_MAX_QUEUE_SPANS: usize = 8192;
/// The default number of exports built and sent at once.
pub const DEFAULT_MAX_CONCURRENT_EXPORTS: usize = 8;

// === ExporterConfig ===

/// Exporter settings. Defaults follow the official SDKs.
#[derive(Clone, Debug)]
pub struct ExporterConfig {
    host: String,
    max_queue_spans: usize,
    max_batch_spans: usize,
    max_batch_bytes: usize,
    schedule_delay: Duration,
    export_timeout: Duration,
    max_retries: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_concurrent_exports: usize,
}

impl ExporterConfig {
    /// Exports to `host` (e.g. `https://cloud.langfuse.com`, no trailing path).
    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into().trim_end_matches('/').to_owned(),
            max_queue_spans: DEFAULT_MAX_QUEUE_SPANS,
            max_batch_spans: 512,
            max_batch_bytes: 3 * 1024 * 1024,
            schedule_delay: Duration::from_secs(5),
            export_timeout: Duration::from_secs(30),
            max_retries: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_concurrent_exports: DEFAULT_MAX_CONCURRENT_EXPORTS,
        }
    }

    /// Queue capacity in spans (default 8192); a full queue drops its oldest spans.
    pub fn max_queue_spans(mut self, n: usize) -> Self {
        self.max_queue_spans = n.max(1);
        self
    }

    /// Spans per export (default 512).
    pub fn max_batch_spans(mut self, n: usize) -> Self {
        self.max_batch_spans = n.max(1);
        self
    }

    /// Uncompressed bytes per export before a batch is split (default 3 MiB; Cloud takes 5 MB).
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = n.max(1);
        self
    }

    /// How long a span waits for its batch to fill (default 5 s).
    pub fn schedule_delay(mut self, d: Duration) -> Self {
        self.schedule_delay = d.max(Duration::from_millis(1));
        self
    }

    /// Timeout of one export attempt (default 30 s).
    pub fn export_timeout(mut self, d: Duration) -> Self {
        self.export_timeout = d;
        self
    }

    /// Retries after the first attempt (default 5).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// First backoff (default 500 ms), doubled per retry up to `max_backoff` (default 30 s);
    /// a `Retry-After` replaces it, capped at `max_backoff`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Exports built and in flight at once (default 8), of one project or several.
    pub fn max_concurrent_exports(mut self, n: usize) -> Self {
        self.max_concurrent_exports = n.max(1);
        self
    }
}

// === Counters ===

/// Exporter counters, read by the metrics endpoint. All counts are spans.
#[derive(Debug, Default)]
pub struct Counters {
    exported: AtomicU64,
    retried: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
}

/// A copy of the [`Counters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Spans Langfuse accepted (2xx).
    pub exported: u64,
    /// Span sends retried (a batch of n spans retried twice counts 2n).
    pub retried: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans given up: non-retryable status, or retries exhausted.
    pub failed: u64,
    /// Requests not recorded because they had no `Project`.
    pub skipped: u64,
    /// Spans waiting in the queue now.
    pub queue_depth: u64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

// === Queue ===

/// Spans the exporter task writes into a project's [`Batch`]: a request's record, or one
/// prost-built span.
pub(crate) trait WriteSpans: Send + 'static {
    /// How many spans it writes (the queue is bounded in spans).
    fn span_count(&self) -> usize;

    /// Writes them, each with [`Batch::span`].
    fn write_spans(self: Box<Self>, batch: &mut Batch);

    /// The rollout they belong to, to count them per rollout if they are lost.
    fn rollout(&self) -> Option<RolloutTags> {
        None
    }
}

impl WriteSpans for Span {
    fn span_count(&self) -> usize {
        1
    }

    fn write_spans(self: Box<Self>, batch: &mut Batch) {
        batch.span(|out| len_field(out, 2, &self.encode_to_vec()));
    }
}

/// Spans bound for one project.
struct Queued {
    keys: LangfuseKeys,
    spans: Box<dyn WriteSpans>,
}

impl Queued {
    fn spans(&self) -> usize {
        self.spans.span_count()
    }
}

/// The queue between the request path and the exporter task, bounded in spans. Pushing takes a
/// short lock and wakes the task only every [`WAKE_SPANS`]: a wake-up per request would cost
/// the request path a cross-thread notification.
struct Queue {
    items: Mutex<VecDeque<Queued>>,
    /// Spans in `items`, readable without the lock.
    depth: AtomicUsize,
    capacity: usize,
    wake_at: usize,
    closed: AtomicBool,
    wake: Notify,
}

/// Spans queued before the exporter task is woken. Few enough that the records' memory (the
/// bodies they share) is freed while still in cache; a larger threshold measured slower on the
/// request path, a wake-up per record much slower.
const WAKE_SPANS: usize = 64;

impl Queue {
    fn new(capacity: usize, batch: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            depth: AtomicUsize::new(0),
            capacity,
            wake_at: WAKE_SPANS.min(batch).min(capacity.div_ceil(2)).max(1),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Adds `queued`, pushing out the oldest records until it fits.
    fn push(&self, queued: Queued) -> Pushed {
        let n = queued.spans();
        if n > self.capacity {
            return Pushed::Refused(queued);
        }
        let mut evicted = Vec::new();
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Relaxed) {
            return Pushed::Refused(queued);
        }
        let before = self.depth.load(Ordering::Relaxed);
        let mut depth = before;
        while depth + n > self.capacity {
            let Some(oldest) = items.pop_front() else { break };
            depth -= oldest.spans();
            evicted.push(oldest);
        }
        items.push_back(queued);
        self.depth.store(depth + n, Ordering::Relaxed);
        drop(items);
        if before < self.wake_at && depth + n >= self.wake_at {
            self.wake.notify_one();
        }
        Pushed::Queued { evicted }
    }

    /// Swaps everything queued into `into` (empty, its capacity reused by the next pushes).
    fn take(&self, into: &mut VecDeque<Queued>) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *items, into);
        self.depth.store(0, Ordering::Relaxed);
    }

    fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// What [`Queue::push`] did with a record.
enum Pushed {
    /// Queued, after pushing out the oldest records (usually none) to make room.
    Queued { evicted: Vec<Queued> },
    /// Not queued: the exporter task is gone, or the record alone is larger than the queue.
    Refused(Queued),
}

// === LangfuseExporter ===

/// Handle to the background exporter. Cheap to clone; the task ends when every handle is
/// dropped (after exporting what is left) .
#[derive(Clone)]
pub struct LangfuseExporter {
    inner: Arc<Shared>,
}

struct Shared {
    queue: Arc<Queue>,
    control: mpsc::UnboundedSender<oneshot::Sender<()>>,
    counters: Arc<Counters>,
    losses: SpanLosses,
}

impl Drop for Shared {
    /// The last handle is gone: the task exports what is left and ends.
    fn drop(&mut self) {
        self.queue.close();
    }
}

impl std::fmt::Debug for LangfuseExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LangfuseExporter").field("counters", &self.snapshot()).finish()
    }
}

impl LangfuseExporter {
    /// Starts the background exporter on the current Tokio runtime.
    pub fn spawn(config: ExporterConfig, client: LangfuseClient) -> Self {
        let queue = Arc::new(Queue::new(config.max_queue_spans, config.max_batch_spans));
        let (control, control_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let losses = SpanLosses::default();
        let endpoint = format!("{}{}", config.host, OTEL_TRACES_PATH).parse::<Uri>().ok();
        if endpoint.is_none() {
            tracing::error!(host = %config.host, "invalid Langfuse host: nothing will be exported");
        }
        let worker = Worker {
            semaphore: Arc::new(Semaphore::new(config.max_concurrent_exports)),
            config: Arc::new(config),
            endpoint,
            client,
            counters: counters.clone(),
            losses: losses.clone(),
            queue: queue.clone(),
            pending: HashMap::new(),
        };
        tokio::spawn(worker.run(control_rx));
        Self { inner: Arc::new(Shared { queue, control, counters, losses }) }
    }

    /// The spans this exporter lost (dropped, or given up), per rollout: hand it to `/traces`.
    pub fn losses(&self) -> &SpanLosses {
        &self.inner.losses
    }

    /// Queues `span` for the project of `keys` without waiting; a full queue drops its oldest
    /// spans (counted) to make room. Returns `false` (and counts it as dropped) when the
    /// exporter stopped.
    pub fn enqueue(&self, keys: &LangfuseKeys, span: Span) -> bool {
        self.enqueue_spans(keys, Box::new(span))
    }

    /// Queues a request's record (all its spans, or none) without waiting.
    pub(crate) fn enqueue_spans(&self, keys: &LangfuseKeys, spans: Box<dyn WriteSpans>) -> bool {
        self.push(Queued { keys: keys.clone(), spans })
    }

    fn push(&self, queued: Queued) -> bool {
        if queued.spans() == 0 {
            return true;
        }
        match self.inner.queue.push(queued) {
            Pushed::Queued { evicted } => {
                evicted.iter().for_each(|old| self.count_dropped(old));
                true
            }
            Pushed::Refused(queued) => {
                self.count_dropped(&queued);
                false
            }
        }
    }

    fn count_dropped(&self, queued: &Queued) {
        let n = queued.spans();
        Counters::add(&self.inner.counters.dropped, n);
        count_lost(&self.inner.losses, queued.spans.rollout().as_ref(), n);
    }

    /// Counts a request that was not recorded because it had no project.
    pub(crate) fn count_skipped(&self) {
        Counters::add(&self.inner.counters.skipped, 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> CountersSnapshot {
        let c = &self.inner.counters;
        CountersSnapshot {
            exported: c.exported.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            queue_depth: self.inner.queue.depth() as u64,
        }
    }

    /// Exports everything queued so far and waits for those exports (retries included) until
    /// `deadline`. Returns `true` if all finished in time. Call it on graceful shutdown.
    pub async fn flush(&self, deadline: Instant) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.inner.control.send(tx).is_err() {
            return true;
        }
        matches!(tokio::time::timeout_at(deadline, rx).await, Ok(Ok(())))
    }
}

// === Worker ===

struct Worker {
    config: Arc<ExporterConfig>,
    endpoint: Option<Uri>,
    client: LangfuseClient,
    counters: Arc<Counters>,
    losses: SpanLosses,
    semaphore: Arc<Semaphore>,
    queue: Arc<Queue>,
    /// Records waiting for an export, by Basic auth header (one per project key pair).
    pending: HashMap<Bytes, Pending>,
}

/// A project's records waiting for an export, and how many spans they write.
#[derive(Default)]
struct Pending {
    records: Vec<Box<dyn WriteSpans>>,
    spans: usize,
}

impl Drop for Worker {
    /// The task ended (or its runtime went away): later spans are dropped and counted.
    fn drop(&mut self) {
        self.queue.close();
    }
}

impl Worker {
    async fn run(mut self, mut control: mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
        let mut tick = tokio::time::interval(self.config.schedule_delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let queue = self.queue.clone();
        let mut drained = VecDeque::new();
        loop {
            tokio::select! {
                biased;
                Some(reply) = control.recv() => {
                    self.drain(&mut drained).await;
                    self.export_all().await;
                    let all = self.config.max_concurrent_exports as u32;
                    let semaphore = self.semaphore.clone();
                    // Wait for the exports in flight without blocking the drain loop.
                    tokio::spawn(async move {
                        if let Ok(permits) = semaphore.acquire_many(all).await {
                            drop(permits);
                        }
                        let _ = reply.send(());
                    });
                }
                () = queue.wake.notified() => {
                    self.drain(&mut drained).await;
                    if queue.is_closed() {
                        self.export_all().await;
                        let all = self.config.max_concurrent_exports as u32;
                        let _ = self.semaphore.acquire_many(all).await;
                        return;
                    }
                }
                _ = tick.tick() => {
                    self.drain(&mut drained).await;
                    self.export_all().await;
                }
            }
        }
    }

    /// Moves the queue into the batches; `buffer` is the spare the queue swaps with.
    async fn drain(&mut self, buffer: &mut VecDeque<Queued>) {
        self.queue.take(buffer);
        for queued in buffer.drain(..) {
            self.push(queued).await;
        }
    }

    /// Adds the record to its project's pending batch and hands the batch to an export once
    /// it holds `max_batch_spans`.
    async fn push(&mut self, queued: Queued) {
        let Some(auth) = client::basic_auth(&queued.keys) else {
            let n = queued.spans();
            Counters::add(&self.counters.failed, n);
            count_lost(&self.losses, queued.spans.rollout().as_ref(), n);
            return;
        };
        let key = Bytes::copy_from_slice(auth.as_bytes());
        let pending = self.pending.entry(key.clone()).or_default();
        pending.spans += queued.spans();
        pending.records.push(queued.spans);
        if pending.spans >= self.config.max_batch_spans {
            let records = std::mem::take(pending);
            self.dispatch(key, records.records).await;
        }
    }

    async fn export_all(&mut self) {
        let pending: Vec<_> = self.pending.drain().collect();
        for (key, pending) in pending {
            self.dispatch(key, pending.records).await;
        }
    }

    /// Starts the export of `records` (written, compressed and sent on a task of its own),
    /// waiting for a free export slot.
    async fn dispatch(&mut self, auth: Bytes, records: Vec<Box<dyn WriteSpans>>) {
        let Ok(permit) = self.semaphore.clone().acquire_owned().await else {
            return;
        };
        let job = Export {
            config: self.config.clone(),
            endpoint: self.endpoint.clone(),
            client: self.client.clone(),
            counters: self.counters.clone(),
            losses: self.losses.clone(),
            auth,
        };
        tokio::spawn(async move {
            job.run(records).await;
            drop(permit);
        });
    }
}

/// Counts `n` lost spans for the rollout of `rollout` (when they have one).
fn count_lost(losses: &SpanLosses, rollout: Option<&RolloutTags>, n: usize) {
    if let Some(rollout_id) = rollout.and_then(rollout_id) {
        losses.add(rollout_id, n as u64);
    }
}

/// The rollout id of a request's tags (`rollout_id:` comes first).
fn rollout_id(tags: &RolloutTags) -> Option<&str> {
    tags.0.first()?.strip_prefix("rollout_id:")
}

// === Batch ===

/// The rollouts of an export's spans, and how many spans each (to count a lost export per
/// rollout).
type Owners = Vec<(RolloutTags, usize)>;

/// One export: its encoded spans, how many, and whose.
pub(crate) struct Encoded {
    spans: Vec<u8>,
    count: usize,
    owners: Owners,
}

/// One project's spans, encoded as `ScopeSpans.spans` entries, cut into exports by the span
/// and byte bounds.
pub(crate) struct Batch {
    open: Vec<u8>,
    spans: usize,
    owners: Owners,
    /// The rollout of the record being written.
    owner: Option<RolloutTags>,
    /// Closed exports.
    full: Vec<Encoded>,
    max_spans: usize,
    max_bytes: usize,
}

impl Batch {
    fn new(max_spans: usize, max_bytes: usize) -> Self {
        Self { open: Vec::new(), spans: 0, owners: Vec::new(), owner: None, full: Vec::new(), max_spans, max_bytes }
    }

    /// Writes a record's spans.
    fn record(&mut self, record: Box<dyn WriteSpans>) {
        self.owner = record.rollout();
        record.write_spans(self);
        self.owner = None;
    }

    /// Adds the span `write` appends; a span that would take the batch over `max_bytes` starts
    /// the next one.
    pub(crate) fn span(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.open.len();
        write(&mut self.open);
        if self.spans > 0 && self.open.len() > self.max_bytes {
            let span = self.open.split_off(start);
            self.close();
            self.open = span;
        }
        self.spans += 1;
        if let Some(owner) = &self.owner {
            match self.owners.last_mut() {
                Some((last, n)) if Arc::ptr_eq(&last.0, &owner.0) => *n += 1,
                _ => self.owners.push((owner.clone(), 1)),
            }
        }
        if self.spans >= self.max_spans {
            self.close();
        }
    }

    fn close(&mut self) {
        if self.spans > 0 {
            // The next batch likely fills like this one: growing to it would copy it over and over.
            let next = Vec::with_capacity(self.open.len());
            self.full.push(Encoded {
                spans: std::mem::replace(&mut self.open, next),
                count: std::mem::take(&mut self.spans),
                owners: std::mem::take(&mut self.owners),
            });
        }
    }

    /// All of it, the open batch included.
    fn into_exports(mut self) -> Vec<Encoded> {
        self.close();
        self.full
    }
}

/// The gzipped `ExportTraceServiceRequest` for one project's encoded spans: the resource and
/// scope (prost-encoded), then the spans as they are.
fn gzip_export(spans: &[u8]) -> std::io::Result<Bytes> {
    let resource = Resource {
        attributes: vec![kv_str("service.name", "llmgate"), kv_str("service.version", SDK_VERSION)],
        ..Default::default()
    }
    .encode_to_vec();
    let scope =
        InstrumentationScope { name: "llmgate-langfuse".into(), version: SDK_VERSION.into(), ..Default::default() }
            .encode_to_vec();
    // ExportTraceServiceRequest { resource_spans = 1: ResourceSpans { resource = 1,
    // scope_spans = 2: ScopeSpans { scope = 1, spans = 2… } } }
    let scope_spans = field_len(scope.len()) + spans.len();
    let resource_spans = field_len(resource.len()) + field_len(scope_spans);
    let mut head = Vec::with_capacity(resource.len() + scope.len() + 32);
    len_field_head(&mut head, 1, resource_spans);
    len_field(&mut head, 1, &resource);
    len_field_head(&mut head, 2, scope_spans);
    len_field(&mut head, 1, &scope);
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(spans.len() / 4 + 64), flate2::Compression::fast());
    gz.write_all(&head)?;
    gz.write_all(spans)?;
    Ok(Bytes::from(gz.finish()?))
}

struct Export {
    config: Arc<ExporterConfig>,
    endpoint: Option<Uri>,
    client: LangfuseClient,
    counters: Arc<Counters>,
    losses: SpanLosses,
    auth: Bytes,
}

enum Attempt {
    Done,
    Retry(Option<Duration>, String),
    GiveUp,
}

impl Export {
    /// Writes the records' spans and sends them, in as many exports as the bounds make.
    async fn run(self, records: Vec<Box<dyn WriteSpans>>) {
        let mut batch = Batch::new(self.config.max_batch_spans, self.config.max_batch_bytes);
        for record in records {
            batch.record(record);
        }
        for export in batch.into_exports() {
            if !self.send(&export.spans, export.count).await {
                Counters::add(&self.counters.failed, export.count);
                for (rollout, n) in &export.owners {
                    count_lost(&self.losses, Some(rollout), *n);
                }
            }
        }
    }

    /// Sends `n` encoded spans, retrying as configured; `false` when they were given up.
    async fn send(&self, spans: &[u8], n: usize) -> bool {
        let (Some(endpoint), Ok(auth)) = (self.endpoint.clone(), HeaderValue::from_maybe_shared(self.auth.clone()))
        else {
            return false;
        };
        let body = match gzip_export(spans) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(%error, "could not gzip a Langfuse export");
                return false;
            }
        };
        let mut backoff = self.config.initial_backoff;
        for attempt in 0..=self.config.max_retries {
            match self.attempt(&endpoint, &auth, body.clone()).await {
                Attempt::Done => {
                    Counters::add(&self.counters.exported, n);
                    return true;
                }
                Attempt::GiveUp => break,
                Attempt::Retry(retry_after, why) => {
                    if attempt == self.config.max_retries {
                        tracing::warn!(spans = n, reason = %why, "Langfuse export failed after retries");
                        break;
                    }
                    Counters::add(&self.counters.retried, n);
                    let wait = retry_after.unwrap_or(backoff).min(self.config.max_backoff);
                    tracing::debug!(spans = n, reason = %why, ?wait, "retrying Langfuse export");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
        false
    }

    async fn attempt(&self, endpoint: &Uri, auth: &HeaderValue, body: Bytes) -> Attempt {
        let request = Request::builder()
            .method(Method::POST)
            .uri(endpoint.clone())
            .header(header::AUTHORIZATION, auth.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(header::CONTENT_ENCODING, "gzip")
            .header("x-langfuse-ingestion-version", "4")
            .header("x-langfuse-sdk-name", "llmgate")
            .header("x-langfuse-sdk-version", SDK_VERSION)
            .body(Full::new(body));
        let Ok(request) = request else {
            return Attempt::GiveUp;
        };
        let sent = tokio::time::timeout(self.config.export_timeout, async {
            let response = self.client.send(request).await?;
            let status = response.status();
            // Capped by `max_backoff` where it is used.
            let retry_after = llmgate_core::forward::retry_after(response.headers(), std::time::SystemTime::now());
            // Read the (small) body so the connection goes back to the pool.
            let body = client::read_capped(response.into_body(), 64 * 1024).await.unwrap_or_default();
            Ok::<_, llmgate_core::BoxError>((status, retry_after, body))
        })
        .await;
        match sent {
            Err(_) => Attempt::Retry(None, "timeout".into()),
            Ok(Err(error)) => Attempt::Retry(None, format!("connection error: {error}")),
            Ok(Ok((status, _, _))) if status.is_success() => Attempt::Done,
            Ok(Ok((status, retry_after, _))) if matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504) => {
                Attempt::Retry(retry_after, format!("HTTP {status}"))
            }
            Ok(Ok((status, _, body))) => {
                let message = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    tracing::error!(%status, %message, "Langfuse rejected the project's keys or the project is suspended: spans dropped");
                } else {
                    tracing::warn!(%status, %message, "Langfuse rejected an export: spans dropped");
                }
                Attempt::GiveUp
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn span(name: &str) -> Span {
        Span { trace_id: vec![1; 16], span_id: vec![2; 8], name: name.into(), ..Default::default() }
    }

    fn counts(exports: &[Encoded]) -> Vec<usize> {
        exports.iter().map(|export| export.count).collect()
    }

    #[test]
    fn batches_are_cut_by_size_and_count() {
        let mut batch = Batch::new(512, 250);
        for _ in 0..3 {
            batch.span(|out| len_field(out, 2, &span(&"x".repeat(80)).encode_to_vec()));
        }
        assert_eq!(counts(&batch.into_exports()), vec![2, 1]);
        let mut batch = Batch::new(2, 1 << 20);
        for _ in 0..5 {
            batch.span(|out| len_field(out, 2, &span("x").encode_to_vec()));
        }
        assert_eq!(counts(&batch.full), vec![2, 2], "a batch is sent once it is full");
        assert_eq!(counts(&batch.into_exports()), vec![2, 2, 1]);
    }

    /// The export is the request prost would have written for the same spans.
    #[test]
    fn exports_are_what_prost_writes() {
        use opentelemetry_proto::tonic::{
            collector::trace::v1::ExportTraceServiceRequest,
            trace::v1::{ResourceSpans, ScopeSpans},
        };
        let spans = vec![span("a"), span(&"é".repeat(300))];
        let mut encoded = Vec::new();
        for s in &spans {
            len_field(&mut encoded, 2, &s.encode_to_vec());
        }
        let mut raw = Vec::new();
        let body = gzip_export(&encoded).unwrap();
        let mut gz = flate2::read::GzDecoder::new(&body[..]);
        std::io::Read::read_to_end(&mut gz, &mut raw).unwrap();
        let expected = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "llmgate"), kv_str("service.version", SDK_VERSION)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "llmgate-langfuse".into(),
                        version: SDK_VERSION.into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        assert_eq!(ExportTraceServiceRequest::decode(raw.as_slice()).unwrap(), expected);
        assert_eq!(raw, expected.encode_to_vec(), "byte for byte");
    }
}
