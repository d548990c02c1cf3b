//! [`ContextRoutingLayer`] and its service.

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use http::{Request, Response, StatusCode, header};
use llmgate_core::{
    BoxError, GatewayBody, GatewayError, body,
    catalog::{Catalog, ModelSpec},
    ext::{BodyEdits, EditScope, FallbackEvent, FallbackEvents, LlmRequest, ModelChoice, ServedBy, TokenEstimate},
};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    body::read_capped,
    detect::is_context_length_error,
    estimate::{Method, RequestEstimator, Tokenizer},
    route::{Choice, any_larger, choose, largest_window},
};

/// The most bytes of an upstream error body read to recognise a context-length error.
pub const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Requests whose counted text is larger than this are estimated on a blocking thread when they
/// need a tokenizer (about 1.5 ms of tokenizing at this size: o200k reads ~40 MiB/s).
pub const DEFAULT_OFFLOAD_THRESHOLD: u64 = 64 * 1024;

// === ContextRoutingStats ===

/// Counters of a [`ContextRoutingLayer`] (shared by every service it builds).
#[derive(Debug, Default)]
pub struct ContextRoutingStats {
    estimated: AtomicU64,
    fast_path: AtomicU64,
    tokenized: AtomicU64,
    proactive_fallbacks: AtomicU64,
    reactive_fallbacks: AtomicU64,
    rejected: AtomicU64,
    unrouted: AtomicU64,
    tokenizer_load_waits: AtomicU64,
}

/// A copy of [`ContextRoutingStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests for a catalogue model with a known window (so estimated).
    pub estimated: u64,
    /// Of those, the ones decided by the fast-path bound alone (nothing tokenized).
    pub fast_path: u64,
    /// Tokenizer runs over a request (at most one per tokenizer family per request).
    pub tokenized: u64,
    /// Requests routed to a larger model before sending (`context_length_fallback`).
    pub proactive_fallbacks: u64,
    /// Requests re-sent to a larger model after an upstream context-length error.
    pub reactive_fallbacks: u64,
    /// Requests refused with `context_length_exceeded` (nothing sent upstream): too large for
    /// their model and for every model of its configured `fallbacks` chain.
    pub rejected: u64,
    /// Requests too large for their model's window that have no configured `fallbacks`: sent
    /// unchanged, the provider answers.
    pub unrouted: u64,
    /// Estimates that needed a tokenizer whose tables were still loading (or not yet loaded):
    /// the requests that paid for a load. None for the models of fallback chains once
    /// [`ContextRoutingLayer::warm_up`] is done.
    pub tokenizer_load_waits: u64,
}

impl ContextRoutingStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            estimated: get(&self.estimated),
            fast_path: get(&self.fast_path),
            tokenized: get(&self.tokenized),
            proactive_fallbacks: get(&self.proactive_fallbacks),
            reactive_fallbacks: get(&self.reactive_fallbacks),
            rejected: get(&self.rejected),
            unrouted: get(&self.unrouted),
            tokenizer_load_waits: get(&self.tokenizer_load_waits),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

// === ContextRoutingLayer ===

/// Layer that applies [`ContextRouting`].
#[derive(Clone, Debug)]
pub struct ContextRoutingLayer {
    shared: Shared,
}

#[derive(Clone, Debug)]
struct Shared {
    catalog: Arc<Catalog>,
    stats: Arc<ContextRoutingStats>,
    reactive: bool,
    offload_threshold: u64,
}

impl ContextRoutingLayer {
    /// Routing over `catalog`, reactive fallback on.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self {
            shared: Shared {
                catalog,
                stats: Arc::default(),
                reactive: true,
                offload_threshold: DEFAULT_OFFLOAD_THRESHOLD,
            },
        }
    }

    /// Whether an upstream context-length 400 is retried once on a larger model (default on).
    pub fn reactive(mut self, on: bool) -> Self {
        self.shared.reactive = on;
        self
    }

    /// Counted-text size in bytes above which tokenizing runs on tokio's blocking pool
    /// (default 64 KiB; `u64::MAX` keeps it inline).
    pub fn offload_threshold(mut self, bytes: u64) -> Self {
        self.shared.offload_threshold = bytes;
        self
    }

    /// The counters, for a metrics endpoint.
    pub fn stats(&self) -> Arc<ContextRoutingStats> {
        self.shared.stats.clone()
    }

    /// The tokenizers whose counts can move a request: those of the catalogue's models that
    /// have a window and a `fallbacks` chain, and of the models of those chains. A request for
    /// any other model goes where it asked whatever its count, so its tokenizer (needed only
    /// when the request's byte bound passes its window) loads on first need. Empty for a
    /// catalogue without fallbacks (the built-in one).
    pub fn tokenizers_needed(&self) -> Vec<Tokenizer> {
        let catalog = &self.shared.catalog;
        let mut needed: Vec<Tokenizer> = catalog
            .iter()
            .filter(|spec| spec.context_window.is_some() && !spec.fallbacks.is_empty())
            .flat_map(|spec| std::iter::once(spec).chain(spec.fallbacks.iter().filter_map(|name| catalog.get(name))))
            .filter(|spec| spec.context_window.is_some())
            .map(|spec| Tokenizer::for_model(spec))
            .filter(|tokenizer| *tokenizer != Tokenizer::Bytes)
            .collect();
        needed.sort();
        needed.dedup();
        needed
    }

    /// Loads [`tokenizers_needed`](Self::tokenizers_needed) now, so that no routing decision
    /// waits for a load. Blocking (a few hundred ms per tokenizer): run it off the async
    /// runtime's worker threads, e.g. with `tokio::task::spawn_blocking`.
    pub fn warm_up(&self) {
        for tokenizer in self.tokenizers_needed() {
            tokenizer.load();
        }
    }
}

impl<S> Layer<S> for ContextRoutingLayer {
    type Service = ContextRouting<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ContextRouting { inner, shared: Arc::new(self.shared.clone()) }
    }
}

// === ContextRouting ===

/// Routes a chat request to a model whose context window fits it; see the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct ContextRouting<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> ContextRouting<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, catalog: Arc<Catalog>) -> Self {
        ContextRoutingLayer::new(catalog).layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The response future of [`ContextRouting`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

impl<S, F> Service<Request<GatewayBody>> for ContextRouting<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Future = F> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<GatewayBody>, S::Error>> + Send,
{
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        // The ready service moves into the future; the clone stays for the next call.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let target = parts.extensions.get::<LlmRequest>().and_then(|request| {
                let spec = shared.catalog.get(request.model()?)?.clone();
                let window = spec.context_window?;
                Some((request.clone(), spec, window))
            });
            // Unknown model, or no window known: untouched.
            let Some((request, spec, window)) = target else {
                return ready.call(Request::from_parts(parts, body)).await.map_err(Into::into);
            };

            let plan = plan(&shared, &request, &spec, window).await?;
            let (sent, sent_window, estimate) = match plan {
                Plan::Fits(estimate) => (spec.clone(), window, estimate),
                Plan::Route { choice, original_estimate } => {
                    record(&parts.extensions, &spec, window, &choice, original_estimate.tokens);
                    set_model(&mut parts.extensions, &spec.name, &choice.spec.name, 1);
                    ContextRoutingStats::add(&shared.stats.proactive_fallbacks, 1);
                    (choice.spec.clone(), choice.window, choice.estimate.token_estimate())
                }
            };
            parts.extensions.insert(estimate);

            let retry = (shared.reactive && any_larger(&shared.catalog, sent_window)).then(|| parts.clone());
            let response = ready.call(Request::from_parts(parts, body)).await.map_err(Into::into)?;
            let Some(mut retry) = retry else {
                return Ok(response);
            };
            if response.status() != StatusCode::BAD_REQUEST || declared_too_long(&response) {
                return Ok(response);
            }

            let (head, error_body) = response.into_parts();
            let captured = read_capped(error_body, ERROR_BODY_LIMIT).await;
            // The model that failed: the one an inner layer says answered, else the one sent.
            let failed =
                head.extensions.get::<ServedBy>().and_then(|s| shared.catalog.get(&s.model)).cloned().unwrap_or(sent);
            let choice = match (captured.complete && is_context_length_error(&captured.bytes))
                .then(|| failed.context_window)
                .flatten()
            {
                Some(failed_window) => reactive_choice(&shared, &request, &failed, failed_window).await?,
                None => None,
            };
            let Some((choice, failed_window)) = choice else {
                return Ok(Response::from_parts(head, captured.into_body()));
            };
            drop(captured);

            tracing::debug!(
                from = %failed.name,
                to = %choice.spec.name,
                "upstream reported a context-length error; re-sending once to a larger model"
            );
            record(&retry.extensions, &failed, failed_window, &choice, estimate.tokens);
            let attempt = head.extensions.get::<ServedBy>().map_or(1, |s| s.attempts) + 1;
            set_model(&mut retry.extensions, &spec.name, &choice.spec.name, attempt);
            retry.extensions.insert(choice.estimate.token_estimate());
            ContextRoutingStats::add(&shared.stats.reactive_fallbacks, 1);

            poll_fn(|cx| ready.poll_ready(cx)).await.map_err(Into::into)?;
            ready.call(Request::from_parts(retry, body::full(request.raw().clone()))).await.map_err(Into::into)
        })
    }
}

enum Plan {
    /// The request fits the requested model, or goes to it anyway (no fallbacks configured).
    Fits(TokenEstimate),
    /// It goes to `choice`.
    Route { choice: Choice, original_estimate: TokenEstimate },
}

/// The proactive decision, tokenizing on the blocking pool when the text is large.
async fn plan(
    shared: &Arc<Shared>,
    request: &LlmRequest,
    spec: &Arc<ModelSpec>,
    window: u64,
) -> Result<Plan, BoxError> {
    let mut estimator = RequestEstimator::new(request.json());
    // Tokenizing runs only past the window; a large text, or a tokenizer still to load, takes
    // long enough to go to the blocking pool.
    let big =
        estimator.bound() > window && (estimator.text_bytes() > shared.offload_threshold || !Tokenizer::all_loaded());
    let handle = tokio::runtime::Handle::try_current().ok().filter(|_| big);
    let Some(handle) = handle else {
        return decide(shared, &mut estimator, spec, window).map_err(Into::into);
    };
    let (shared, request, spec) = (shared.clone(), request.clone(), spec.clone());
    handle
        .spawn_blocking(move || {
            let mut estimator = RequestEstimator::new(request.json());
            decide(&shared, &mut estimator, &spec, window)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("token estimate failed: {e}")))?
        .map_err(Into::into)
}

fn decide(
    shared: &Shared,
    estimator: &mut RequestEstimator<'_>,
    spec: &ModelSpec,
    window: u64,
) -> Result<Plan, GatewayError> {
    let stats = &shared.stats;
    let estimate = estimator.estimate_for(spec);
    ContextRoutingStats::add(&stats.estimated, 1);
    let outcome = if estimate.fits(window) {
        Ok(Plan::Fits(estimate.token_estimate()))
    } else {
        match choose(&shared.catalog, spec, 0, estimator) {
            Some(choice) => Ok(Plan::Route { choice, original_estimate: estimate.token_estimate() }),
            None if spec.fallbacks.is_empty() => {
                // No fallback configured: nothing to route; the provider has the last word
                // (its own error if the prompt is really too long for it).
                tracing::debug!(model = %spec.name, estimate = estimate.tokens, window, "larger than the model's window and no fallbacks configured; sending it unchanged");
                ContextRoutingStats::add(&stats.unrouted, 1);
                Ok(Plan::Fits(estimate.token_estimate()))
            }
            None => {
                ContextRoutingStats::add(&stats.rejected, 1);
                Err(GatewayError::ContextLengthExceeded {
                    estimate: estimate.tokens,
                    max: largest_window(&shared.catalog, spec),
                    model: spec.name.clone(),
                })
            }
        }
    };
    if estimate.method == Method::Bound && estimator.tokenizer_runs() == 0 {
        ContextRoutingStats::add(&stats.fast_path, 1);
    }
    ContextRoutingStats::add(&stats.tokenized, u64::from(estimator.tokenizer_runs()));
    ContextRoutingStats::add(&stats.tokenizer_load_waits, u64::from(estimator.tokenizer_load_waits()));
    outcome
}

/// A model with a window larger than the failed one's that fits, and that window.
async fn reactive_choice(
    shared: &Arc<Shared>,
    request: &LlmRequest,
    failed: &Arc<ModelSpec>,
    failed_window: u64,
) -> Result<Option<(Choice, u64)>, BoxError> {
    let choose_larger = {
        let (shared, request, failed) = (shared.clone(), request.clone(), failed.clone());
        move || {
            let mut estimator = RequestEstimator::new(request.json());
            let choice = choose(&shared.catalog, &failed, failed_window, &mut estimator);
            ContextRoutingStats::add(&shared.stats.tokenized, u64::from(estimator.tokenizer_runs()));
            ContextRoutingStats::add(&shared.stats.tokenizer_load_waits, u64::from(estimator.tokenizer_load_waits()));
            choice.map(|c| (c, failed_window))
        }
    };
    let big = RequestEstimator::new(request.json()).text_bytes() > shared.offload_threshold || !Tokenizer::all_loaded();
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if big => handle
            .spawn_blocking(choose_larger)
            .await
            .map_err(|e| GatewayError::Internal(format!("token estimate failed: {e}")).into()),
        _ => Ok(choose_larger()),
    }
}

/// A 400 that declares a body larger than the cap is passed on unread.
fn declared_too_long(response: &Response<GatewayBody>) -> bool {
    response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > ERROR_BODY_LIMIT as u64)
}

/// Writes the [`ModelChoice`] and the `model` body edit.
fn set_model(extensions: &mut http::Extensions, requested: &str, current: &str, attempt: u32) {
    extensions.insert(ModelChoice { requested: requested.into(), current: current.into(), attempt });
    let mut edits = extensions.remove::<BodyEdits>().unwrap_or_default();
    edits.set("model", current.into(), EditScope::Always);
    extensions.insert(edits);
}

/// Records `context_length_fallback` on the request's sink, if any.
fn record(extensions: &http::Extensions, from: &ModelSpec, from_window: u64, choice: &Choice, estimated_tokens: u64) {
    if let Some(events) = extensions.get::<FallbackEvents>() {
        events.record(FallbackEvent::ContextLength {
            original_model: from.name.clone(),
            fallback_model: choice.spec.name.clone(),
            estimated_tokens,
            original_max_context: from_window,
            fallback_max_context: choice.window,
        });
    }
}
