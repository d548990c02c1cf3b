//! `GET /metrics`: Prometheus text format.
//!
//! Request counts and latencies are recorded as requests pass ([`MetricsLayer`], chat usage and
//! fallbacks in [`ChatObserve`](crate::observe::ChatObserve)); the layers' own counters
//! (insertion records, Langfuse export, rate limits, context estimates) are read at scrape
//! time. Label sets stay bounded: routes are a fixed set, models are catalogue names (anything
//! else is `other`), and no rollout ids or raw paths are used.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use http::{Method, Request, Response};
use llmgate_context_routing::ContextRoutingStats;
use llmgate_core::{
    BoxError, GatewayBody, GatewayError,
    catalog::Catalog,
    ext::{AccountInfo, RouteKind, RouteMeta, ServedBy},
};
use llmgate_credentials::{Refusals, Reloadable};
use llmgate_insertion_id::Counters as InsertionCounters;
use llmgate_langfuse::LangfuseExporter;
use llmgate_rate_limit_fallback::Stats;
use llmgate_rollout_logs::{Counters as RolloutLogCounters, PollOutcome};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::time::Instant;
use tower::{Layer, Service};

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~ 8 min
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

/// `route`, `method`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    route: &'static str,
    /// The model that answered a chat request (a catalogue name or `other`), `-` elsewhere.
    model: String,
    status: u16,
    /// The gateway key's name (`external` for an identity service's account, `-` without one).
    key: String,
}

/// `key`, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    key: String,
    reason: &'static str,
}

/// `route`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    route: &'static str,
}

/// `model`, `direction`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// A catalogue model, or `other`.
    pub model: String,
    /// `input` or `output`.
    pub direction: &'static str,
}

/// `model`, `fallback`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    /// A catalogue model, or `other`.
    pub model: String,
    /// How the request was served: `none`, `rate_limit` or `context_length`.
    pub fallback: &'static str,
}

/// `fallback`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackKindLabels {
    /// `none`, `rate_limit` or `context_length`.
    pub fallback: &'static str,
}

/// `type`, `reason`, `original_model`, `fallback_model`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// `rate_limit` or `context_length`.
    pub r#type: &'static str,
    /// The rate-limit reason, or `context_length`.
    pub reason: &'static str,
    /// The model given up.
    pub original_model: String,
    /// The model used instead.
    pub fallback_model: String,
}

/// `upstream`, `status` (`error` for a transport failure or timeout).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The configured upstream name.
    pub upstream: Arc<str>,
    /// The HTTP status, or `error`.
    pub status: Arc<str>,
}

/// `end`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    /// `complete`, `error` or `cancelled` (the client went away).
    pub end: &'static str,
}

/// `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// `place`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PanicLabels {
    /// `handler` (a service's future) or `body` (a response body).
    place: &'static str,
}

/// The layers' counters, read at scrape time.
#[derive(Default)]
pub struct Sources {
    /// Insertion-id records.
    pub insertion: Option<Arc<InsertionCounters>>,
    /// The Langfuse exporter.
    pub langfuse: Option<LangfuseExporter>,
    /// Rate limits and fallbacks.
    pub rate_limit: Option<Arc<Stats>>,
    /// Context estimates.
    pub context: Option<Arc<ContextRoutingStats>>,
    /// Rollout logs and status polls.
    pub rollout_logs: Option<Arc<RolloutLogCounters>>,
    /// Requests the auth layer refused.
    pub auth_refusals: Option<Arc<Refusals>>,
    /// The configured gateway keys' names: the `key` label's values (others are `external`).
    pub key_names: Reloadable<HashSet<String>>,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    in_flight: Gauge,
    upstream_duration: HistogramFamily<UpstreamLabels>,
    /// Chat responses streaming right now.
    pub open_streams: Gauge,
    /// Time to the first body frame of streamed chat responses.
    pub time_to_first_byte: Histogram,
    /// Tokens by model and direction.
    pub tokens: Family<TokenLabels, Counter>,
    /// Cost in USD by model and how the request was served.
    pub cost_usd: Family<CostLabels, Counter<f64, AtomicU64>>,
    /// Chat requests: time to the response head, primary vs fallback.
    pub chat_duration: HistogramFamily<FallbackKindLabels>,
    /// Fallbacks by type, reason and model pair.
    pub fallbacks: Family<FallbackLabels, Counter>,
    /// Chat response bodies by how they ended.
    pub chat_responses: Family<EndLabels, Counter>,
    insertion_records: Family<OutcomeLabels, Counter>,
    insertion_pending: Gauge,
    insertion_writes: Counter,
    langfuse_spans: Family<OutcomeLabels, Counter>,
    langfuse_queue_depth: Gauge,
    rate_limit_waits: Counter,
    cooldowns_active: Gauge,
    redis_errors: Counter,
    context_estimates: Family<OutcomeLabels, Counter>,
    rollout_log_entries: Family<OutcomeLabels, Counter>,
    rollout_status_polls: Family<OutcomeLabels, Counter>,
    auth_refusals: Family<RefusalLabels, Counter>,
    tokenizer_load_waits: Counter,
    secrets_reloads: Family<OutcomeLabels, Counter>,
    panics: Family<PanicLabels, Counter>,
    sources: Sources,
    catalog: Arc<Catalog>,
}

impl Metrics {
    /// The registry with every family registered; `catalog` bounds the `model` labels.
    pub fn new(sources: Sources, catalog: Arc<Catalog>) -> Self {
        let mut registry = Registry::with_prefix("llmgate");
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            in_flight: Gauge::default(),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            open_streams: Gauge::default(),
            time_to_first_byte: latency_histogram(),
            tokens: Family::default(),
            cost_usd: Family::default(),
            chat_duration: Family::new_with_constructor(latency_histogram),
            fallbacks: Family::default(),
            chat_responses: Family::default(),
            insertion_records: Family::default(),
            insertion_pending: Gauge::default(),
            insertion_writes: Counter::default(),
            langfuse_spans: Family::default(),
            langfuse_queue_depth: Gauge::default(),
            rate_limit_waits: Counter::default(),
            cooldowns_active: Gauge::default(),
            redis_errors: Counter::default(),
            context_estimates: Family::default(),
            rollout_log_entries: Family::default(),
            rollout_status_polls: Family::default(),
            auth_refusals: Family::default(),
            tokenizer_load_waits: Counter::default(),
            secrets_reloads: Family::default(),
            panics: Family::default(),
            sources,
            catalog,
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by route and status", m.requests.clone());
        registry.register("request_duration_seconds", "Time to the response head", m.request_duration.clone());
        registry.register("in_flight_requests", "Requests being handled", m.in_flight.clone());
        registry.register(
            "upstream_duration_seconds",
            "Upstream calls: time to the response head, by upstream and status",
            m.upstream_duration.clone(),
        );
        registry.register("open_streams", "Chat responses streaming now", m.open_streams.clone());
        registry.register(
            "time_to_first_byte_seconds",
            "Streams: time to the first frame",
            m.time_to_first_byte.clone(),
        );
        registry.register("tokens", "Tokens reported by upstreams", m.tokens.clone());
        registry.register("cost_usd", "Cost in USD from the configured pricing", m.cost_usd.clone());
        registry.register(
            "chat_duration_seconds",
            "Chat requests: time to the response head, by fallback kind",
            m.chat_duration.clone(),
        );
        registry.register("fallbacks", "Fallbacks by type, reason and model pair", m.fallbacks.clone());
        registry.register(
            "chat_responses",
            "Chat response bodies by how they ended (complete, error, cancelled)",
            m.chat_responses.clone(),
        );
        registry.register("insertion_records", "Insertion-id records by outcome", m.insertion_records.clone());
        registry.register(
            "insertion_records_pending",
            "Insertion-id records waiting for a retry",
            m.insertion_pending.clone(),
        );
        registry.register(
            "insertion_writes",
            "Insertion-store writes (group commits: records per write = recorded / writes)",
            m.insertion_writes.clone(),
        );
        registry.register("langfuse_spans", "Langfuse spans by export outcome", m.langfuse_spans.clone());
        registry.register("langfuse_queue_depth", "Spans waiting for export", m.langfuse_queue_depth.clone());
        registry.register("rate_limit_waits", "Waits for a rate limit", m.rate_limit_waits.clone());
        registry.register("cooldowns_active", "Models cooling down after a 429", m.cooldowns_active.clone());
        registry.register("redis_errors", "Rate-limit store errors", m.redis_errors.clone());
        registry.register("context_estimates", "Context estimates by path", m.context_estimates.clone());
        registry.register(
            "rollout_log_entries",
            "Rollout log entries by outcome (written, rejected, evicted, failed)",
            m.rollout_log_entries.clone(),
        );
        registry.register(
            "rollout_status_polls",
            "Rollout status polls by outcome (none, running, ended, failed)",
            m.rollout_status_polls.clone(),
        );
        registry.register(
            "auth_refusals",
            "Requests refused by the gateway's auth, by key name and reason",
            m.auth_refusals.clone(),
        );
        registry.register(
            "tokenizer_load_waits",
            "Context estimates that waited for a tokenizer to load",
            m.tokenizer_load_waits.clone(),
        );
        registry.register(
            "secrets_reloads",
            "Reloads of the secrets (secrets file, gateway keys) by outcome (ok, error)",
            m.secrets_reloads.clone(),
        );
        registry.register("panics", "Panics caught, by place (handler or response body)", m.panics.clone());
        Self { registry, ..m }
    }

    /// Counts a reload of the secrets: `ok` (swapped in) or `error` (refused, the old ones kept).
    pub fn count_secrets_reload(&self, outcome: &'static str) {
        self.secrets_reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts a panic caught in a request handler (`handler`) or a response body (`body`).
    pub fn count_panic(&self, place: &'static str) {
        self.panics.get_or_create(&PanicLabels { place }).inc();
    }

    /// A bounded key label: a configured key's name, `external` for another account (an
    /// identity service's, whose names are not bounded), `-` for none.
    fn key_label(&self, account: Option<&AccountInfo>) -> String {
        match account {
            Some(a) if self.sources.key_names.current().contains(&a.account_id) => a.account_id.clone(),
            Some(_) => "external".to_string(),
            None => "-".to_string(),
        }
    }

    /// A bounded model label: a catalogue name, else `other`.
    pub fn model_label(&self, model: Option<&str>) -> String {
        match model {
            Some(m) if self.catalog.get(m).is_some() => m.to_string(),
            _ => "other".to_string(),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Brings the scrape-time counters up to the layers' snapshots.
    fn refresh(&self) {
        fn advance(counter: &Counter, to: u64) {
            counter.inc_by(to.saturating_sub(counter.get()));
        }
        let outcome = |family: &Family<OutcomeLabels, Counter>, outcome: &'static str, to: u64| {
            advance(&family.get_or_create(&OutcomeLabels { outcome }), to);
        };
        if let Some(c) = &self.sources.insertion {
            let s = c.snapshot();
            outcome(&self.insertion_records, "recorded", s.recorded);
            outcome(&self.insertion_records, "retried", s.retried);
            outcome(&self.insertion_records, "failed", s.failed);
            outcome(&self.insertion_records, "dropped", s.dropped);
            self.insertion_pending.set(s.pending as i64);
            advance(&self.insertion_writes, s.writes);
        }
        if let Some(exporter) = &self.sources.langfuse {
            let s = exporter.snapshot();
            outcome(&self.langfuse_spans, "exported", s.exported);
            outcome(&self.langfuse_spans, "retried", s.retried);
            outcome(&self.langfuse_spans, "dropped", s.dropped);
            outcome(&self.langfuse_spans, "failed", s.failed);
            outcome(&self.langfuse_spans, "skipped", s.skipped);
            self.langfuse_queue_depth.set(s.queue_depth as i64);
        }
        if let Some(stats) = &self.sources.rate_limit {
            let s = stats.snapshot();
            let get = |key: &str| s.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
            advance(&self.rate_limit_waits, get("rate_limit_waits"));
            advance(&self.redis_errors, get("store_errors"));
            self.cooldowns_active.set(get("cooldowns_active") as i64);
        }
        if let Some(stats) = &self.sources.context {
            let s = stats.snapshot();
            outcome(&self.context_estimates, "fast_path", s.fast_path);
            outcome(&self.context_estimates, "tokenized", s.tokenized);
            advance(&self.tokenizer_load_waits, s.tokenizer_load_waits);
        }
        if let Some(c) = &self.sources.rollout_logs {
            let entries =
                [("written", &c.written), ("rejected", &c.rejected), ("evicted", &c.evicted), ("failed", &c.failed)];
            for (label, count) in entries {
                outcome(&self.rollout_log_entries, label, count.load(Relaxed));
            }
            for (poll, count) in PollOutcome::ALL.iter().zip(&c.polls) {
                outcome(&self.rollout_status_polls, poll.label(), count.load(Relaxed));
            }
        }
        if let Some(refusals) = &self.sources.auth_refusals {
            // External names fold into one series: summed before it is advanced.
            let mut totals: HashMap<RefusalLabels, u64> = HashMap::new();
            let key_names = self.sources.key_names.current();
            for ((key, reason), count) in refusals.snapshot() {
                let key = if key == "unknown" || key_names.contains(&key) { key } else { "external".into() };
                *totals.entry(RefusalLabels { key, reason }).or_default() += count;
            }
            for (labels, total) in totals {
                advance(&self.auth_refusals.get_or_create(&labels), total);
            }
        }
    }
}

/// The route label of a request.
fn route_label<B>(req: &Request<B>) -> &'static str {
    match req.extensions().get::<RouteMeta>().map(|m| m.kind) {
        Some(RouteKind::ChatCompletions) => "chat",
        Some(RouteKind::Traces) => "traces",
        Some(RouteKind::TracesPointwise) => "traces_pointwise",
        Some(RouteKind::Logs) => "logs",
        Some(RouteKind::Status) => "status",
        None if req.method() == Method::GET => match req.uri().path() {
            "/health" => "health",
            "/ready" => "ready",
            "/metrics" => "metrics",
            "/stats" => "stats",
            _ => "catch_all",
        },
        None => "catch_all",
    }
}

// === MetricsLayer ===

/// Counts requests by route and status, times them to the response head, and logs one line per
/// request (method, route, status, latency, model, fallback, insertion id).
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, metrics: self.metrics.clone() }
    }
}

/// Service of [`MetricsLayer`].
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Decrements the in-flight gauge when the request ends, however it ends.
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl<S, F> Service<Request<GatewayBody>> for MetricsService<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError, Future = F>,
    // Naming the future sidesteps a higher-ranked `Send` inference limitation of async blocks.
    F: Future<Output = Result<Response<GatewayBody>, BoxError>> + Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let route = route_label(&req);
        let method = req.method().clone();
        let metrics = self.metrics.clone();
        metrics.in_flight.inc();
        let guard = InFlight(metrics.clone());
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let result = future.await;
            let status = match &result {
                Ok(response) => response.status().as_u16(),
                Err(error) => GatewayError::find(&**error).map_or(500, |e| e.status().as_u16()),
            };
            let latency = started.elapsed();
            let served = result.as_ref().ok().and_then(|r| r.extensions().get::<ServedBy>());
            let account = result.as_ref().ok().and_then(|r| r.extensions().get::<AccountInfo>());
            let model = match route {
                "chat" => metrics.model_label(served.map(|s| &*s.model)),
                _ => "-".to_string(),
            };
            let key = metrics.key_label(account);
            metrics.requests.get_or_create(&RequestLabels { route, model, status, key }).inc();
            metrics.request_duration.get_or_create(&RouteLabels { route }).observe(latency.as_secs_f64());
            drop(guard);
            // One line per request (probes of /health, /ready and /metrics aside): no keys, no
            // prompt text.
            if matches!(route, "health" | "ready" | "metrics") {
                return result;
            }
            let response = result.as_ref().ok();
            let insertion_id = response.and_then(|r| r.headers().get("x-insertion-id")).and_then(|v| v.to_str().ok());
            tracing::info!(
                %method,
                route,
                status,
                latency_ms = latency.as_secs_f64() * 1e3,
                model = served.map(|s| &*s.model),
                fallback = served.is_some_and(|s| s.attempts > 1),
                insertion_id,
                key = account.map(|a| &*a.account_id),
                "request"
            );
            result
        })
    }
}

// === UpstreamMetricsLayer ===

/// Times every upstream call (each attempt of a chat request, and catch-all calls) to its
/// response head, by upstream and status.
#[derive(Clone)]
pub struct UpstreamMetricsLayer {
    metrics: Arc<Metrics>,
    default_upstream: Arc<str>,
}

impl UpstreamMetricsLayer {
    /// Records into `metrics`; calls without an `UpstreamTarget` go to `default_upstream`.
    pub fn new(metrics: Arc<Metrics>, default_upstream: Arc<str>) -> Self {
        Self { metrics, default_upstream }
    }
}

impl<S> Layer<S> for UpstreamMetricsLayer {
    type Service = UpstreamMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamMetrics { inner, layer: self.clone() }
    }
}

/// Service of [`UpstreamMetricsLayer`].
#[derive(Clone)]
pub struct UpstreamMetrics<S> {
    inner: S,
    layer: UpstreamMetricsLayer,
}

impl<S, F> Service<Request<GatewayBody>> for UpstreamMetrics<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError, Future = F>,
    F: Future<Output = Result<Response<GatewayBody>, BoxError>> + Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let upstream = req
            .extensions()
            .get::<llmgate_core::ext::UpstreamTarget>()
            .map_or_else(|| self.layer.default_upstream.clone(), |t| t.name.clone());
        let metrics = self.layer.metrics.clone();
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let result = future.await;
            let status: Arc<str> = match &result {
                Ok(response) => response.status().as_str().into(),
                Err(_) => "error".into(),
            };
            metrics
                .upstream_duration
                .get_or_create(&UpstreamLabels { upstream, status })
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }
}
