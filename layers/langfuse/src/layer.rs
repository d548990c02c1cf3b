//! [`LangfuseLayer`] (per request) and [`LangfuseAttemptLayer`] (per upstream attempt).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use llmgate_core::{
    BoxError, GatewayError,
    catalog::Catalog,
    ext::{
        FallbackEvents, InsertionId, LlmRequest, ModelChoice, Project, RolloutTags, ServedBy, UpstreamMode,
        UpstreamTarget,
    },
    usage,
};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    LangfuseExporter,
    record::{AttemptStart, Ended, GenerationRecord, RootRecord, Started},
    settings::{Emit, LayerConfig},
    trace::TraceContext,
};

// === impl LangfuseLayer ===

/// Records each request as a Langfuse trace: the root span, the fallback events, and (with
/// [`LangfuseAttemptLayer`] inside the routing layers) one generation per upstream attempt.
///
/// **Requires:** `Project` (optional: without it nothing is recorded and `skipped` counts it),
/// `LlmRequest`, `InsertionId`, `RolloutTags` (all optional). **Provides:** [`TraceContext`],
/// `FallbackEvents`. Reads the response's `UsageOutcome` (installing the tap if needed) and
/// `ServedBy`.
#[derive(Clone)]
pub struct LangfuseLayer {
    config: Arc<LayerConfig>,
    exporter: LangfuseExporter,
}

impl LangfuseLayer {
    /// Records into `exporter`, with the defaults: trace name `chat-completion`,
    /// [`Emit::ByUpstream`], 32 KiB input/output bounds.
    pub fn new(exporter: LangfuseExporter) -> Self {
        Self { exporter, config: Arc::default() }
    }

    /// Changes the settings (a copy of them when a stack already shares them).
    fn with(mut self, f: impl FnOnce(&mut LayerConfig)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The trace (and root span) name.
    pub fn trace_name(self, name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        self.with(|c| c.trace_name = name)
    }

    /// How much is exported.
    pub fn emit(self, emit: Emit) -> Self {
        self.with(|c| c.emit = emit)
    }

    /// Bound of the recorded input and output, each, in bytes.
    pub fn capture_limit(self, bytes: usize) -> Self {
        self.with(|c| c.capture_limit = bytes)
    }

    /// `langfuse.environment` (Langfuse lower-cases it and wants `[a-z0-9-_]`).
    pub fn environment(self, value: impl Into<Arc<str>>) -> Self {
        let value = value.into();
        self.with(|c| c.environment = Some(value))
    }

    /// `langfuse.release`.
    pub fn release(self, value: impl Into<Arc<str>>) -> Self {
        let value = value.into();
        self.with(|c| c.release = Some(value))
    }

    /// `langfuse.version`.
    pub fn version(self, value: impl Into<Arc<str>>) -> Self {
        let value = value.into();
        self.with(|c| c.version = Some(value))
    }
}

impl<S> Layer<S> for LangfuseLayer {
    type Service = LangfuseService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LangfuseService { inner, config: self.config.clone(), exporter: self.exporter.clone() }
    }
}

// === impl LangfuseService ===

/// The service of [`LangfuseLayer`].
#[derive(Clone)]
pub struct LangfuseService<S> {
    inner: S,
    config: Arc<LayerConfig>,
    exporter: LangfuseExporter,
}

impl<S, B> Service<Request<B>> for LangfuseService<S>
where
    S: Service<Request<B>, Response = Response<llmgate_core::GatewayBody>, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RootFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if self.config.emit == Emit::Off {
            return RootFuture { inner: self.inner.call(req), ctx: None };
        }
        let ext = req.extensions();
        let Some(project) = ext.get::<Project>() else {
            self.exporter.count_skipped();
            return RootFuture { inner: self.inner.call(req), ctx: None };
        };
        let ctx = TraceContext::new(
            &self.config,
            &self.exporter,
            project.langfuse.clone(),
            ext.get::<LlmRequest>(),
            ext.get::<InsertionId>(),
            ext.get::<RolloutTags>(),
        );
        req.extensions_mut().insert(FallbackEvents(ctx.0.clone()));
        req.extensions_mut().insert(ctx.clone());
        RootFuture { inner: self.inner.call(req), ctx: Some(ctx) }
    }
}

pin_project! {
    /// Response future of [`LangfuseService`].
    pub struct RootFuture<F> {
        #[pin]
        inner: F,
        ctx: Option<TraceContext>,
    }
}

impl<F> Future for RootFuture<F>
where
    F: Future<Output = Result<Response<llmgate_core::GatewayBody>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(ctx) = this.ctx.take() {
            match result {
                Ok(mut response) => {
                    let limit = ctx.0.data.config.capture_limit;
                    let outcome = usage::tap(&mut response, limit);
                    let status = response.status();
                    let served = response.extensions().get::<ServedBy>().cloned();
                    outcome.subscribe(move |o| {
                        ctx.0.finish_root(RootRecord { ended: Ended::new(Some(status), Some(o), None, limit), served });
                    });
                    return Poll::Ready(Ok(response));
                }
                Err(error) => {
                    let status = GatewayError::find(error.as_ref()).map(GatewayError::status);
                    let ended = Ended::new(status, None, Some(error.to_string()), ctx.0.data.config.capture_limit);
                    ctx.0.finish_root(RootRecord { ended, served: None });
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(result)
    }
}

// === impl LangfuseAttemptLayer ===

/// Records one `generation` per upstream attempt. Sits per attempt, just outside `EncodeJson`.
///
/// **Requires:** [`TraceContext`] (optional: without it, pass-through). Reads `ModelChoice`,
/// `UpstreamTarget`, `LlmRequest` (all optional) and the response's `UsageOutcome`.
#[derive(Clone, Default)]
pub struct LangfuseAttemptLayer {
    catalog: Option<Arc<Catalog>>,
}

impl LangfuseAttemptLayer {
    /// Without a catalogue: no cost is recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Prices and upstream model names come from `catalog`.
    pub fn catalog(mut self, catalog: Arc<Catalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }
}

impl<S> Layer<S> for LangfuseAttemptLayer {
    type Service = LangfuseAttemptService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LangfuseAttemptService { inner, catalog: self.catalog.clone() }
    }
}

/// The service of [`LangfuseAttemptLayer`].
#[derive(Clone)]
pub struct LangfuseAttemptService<S> {
    inner: S,
    catalog: Option<Arc<Catalog>>,
}

/// An attempt being recorded.
pub(crate) struct AttemptInfo {
    ctx: TraceContext,
    start: AttemptStart,
}

impl<S, B> Service<Request<B>> for LangfuseAttemptService<S>
where
    S: Service<Request<B>, Response = Response<llmgate_core::GatewayBody>, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = AttemptFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        join_upstream_trace(&mut req);
        let info = attempt_info(&req, self.catalog.as_ref());
        AttemptFuture { inner: self.inner.call(req), info }
    }
}

/// A `litellm`-mode upstream records the call itself (its `langfuse_otel` callback): the W3C
/// `traceparent` of this request's trace makes LiteLLM's spans children of its root span, so a
/// completion has one trace, whose id is the insertion id, with llmgate's root and events and
/// LiteLLM's generation in it (LiteLLM's proxy takes the header as the parent of its spans).
/// A client's own `traceparent` is replaced: the trace must be the one `/traces` looks for.
fn join_upstream_trace<B>(req: &mut Request<B>) {
    let ext = req.extensions();
    let litellm = ext.get::<UpstreamTarget>().is_some_and(|t| t.mode == UpstreamMode::LiteLlm);
    let Some(ctx) = ext.get::<TraceContext>().filter(|_| litellm) else {
        return;
    };
    if let Ok(value) = http::HeaderValue::from_str(&ctx.traceparent()) {
        req.headers_mut().insert(TRACEPARENT, value);
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

fn attempt_info<B>(req: &Request<B>, catalog: Option<&Arc<Catalog>>) -> Option<AttemptInfo> {
    let ext = req.extensions();
    let ctx = ext.get::<TraceContext>()?;
    let mode = ext.get::<UpstreamTarget>().map_or(UpstreamMode::OpenAi, |t| t.mode);
    match ctx.0.data.config.emit {
        Emit::All => {}
        Emit::ByUpstream if mode == UpstreamMode::OpenAi => {}
        _ => return None,
    }
    let request = ext.get::<LlmRequest>();
    let choice = ext.get::<ModelChoice>();
    let model = match choice {
        Some(c) => c.current.clone(),
        None => Arc::from(request.and_then(LlmRequest::model).unwrap_or("unknown")),
    };
    let attempt = match choice {
        Some(c) => c.attempt,
        None => ctx.0.attempts.fetch_add(1, Ordering::Relaxed) + 1,
    };
    let start = AttemptStart {
        model,
        catalog: catalog.cloned(),
        parameters: request.map_or_else(Vec::new, model_parameters),
        is_primary: choice.is_none_or(ModelChoice::is_primary),
        attempt,
        started: Started::now(),
    };
    Some(AttemptInfo { ctx: ctx.clone(), start })
}

const PARAMETERS: &[&str] = &[
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "stream",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "stop",
    "n",
    "reasoning_effort",
    "response_format",
    "tool_choice",
];

/// The request's model parameters in [`PARAMETERS`] order; serialised on the exporter's task.
/// One pass over the body's keys: a lookup per parameter would hash thirteen keys.
fn model_parameters(request: &LlmRequest) -> Vec<(&'static str, Value)> {
    let position = |key: &str| PARAMETERS.iter().position(|p| *p == key);
    let mut params: Vec<(&'static str, Value)> = request
        .json()
        .iter()
        .filter_map(|(key, value)| position(key).map(|i| (PARAMETERS[i], value.clone())))
        .collect();
    params.sort_unstable_by_key(|(name, _)| position(name));
    params
}

pin_project! {
    /// Response future of [`LangfuseAttemptService`].
    pub struct AttemptFuture<F> {
        #[pin]
        inner: F,
        info: Option<AttemptInfo>,
    }
}

impl<F> Future for AttemptFuture<F>
where
    F: Future<Output = Result<Response<llmgate_core::GatewayBody>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(info) = this.info.take() {
            match result {
                Ok(mut response) => {
                    let limit = info.ctx.0.data.config.capture_limit;
                    let outcome = usage::tap(&mut response, limit);
                    let status = response.status();
                    outcome.subscribe(move |o| info.finish(Ended::new(Some(status), Some(o), None, limit)));
                    return Poll::Ready(Ok(response));
                }
                Err(error) => {
                    let limit = info.ctx.0.data.config.capture_limit;
                    info.finish(Ended::new(None, None, Some(error.to_string()), limit));
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(result)
    }
}

impl AttemptInfo {
    fn finish(self, ended: Ended) {
        self.ctx.0.finish_generation(GenerationRecord { start: self.start, ended });
    }
}
