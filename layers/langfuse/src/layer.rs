//! [`LangfuseLayer`] (per request) and [`LangfuseAttemptLayer`] (per upstream attempt).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, ready},
    time::SystemTime,
};

use http::{Request, Response, StatusCode};
use llmgate_core::{
    BoxError, GatewayError,
    catalog::{Catalog, Pricing},
    ext::{
        FallbackEvents, InsertionId, LlmRequest, ModelChoice, Project, RolloutTags, ServedBy, UpstreamMode,
        UpstreamTarget,
    },
    usage::{self, Outcome, StreamEnd},
};
use opentelemetry_proto::tonic::trace::v1::Span;
use pin_project_lite::pin_project;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    LangfuseExporter,
    span::{Level, SpanParts, bounded_text, iso_millis, kv_str, new_span_id},
    trace::{TraceContext, event_metadata},
};

/// How much a stack exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Emit {
    /// Root span, generations and events.
    All,
    /// Root span and events only (LiteLLM records the generations).
    Events,
    /// Nothing.
    Off,
    /// `All` for attempts to an `openai`-mode upstream, `Events` for `litellm` ones (the
    /// attempt's [`UpstreamTarget`] decides; no target counts as `openai`).
    #[default]
    ByUpstream,
}

/// Default bound of the recorded input and output (32 KiB each).
pub const DEFAULT_CAPTURE_LIMIT: usize = 32 * 1024;

pub(crate) struct LayerConfig {
    pub exporter: LangfuseExporter,
    pub trace_name: Arc<str>,
    pub emit: Emit,
    pub capture_limit: usize,
    pub environment: Option<Arc<str>>,
    pub release: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
}

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
}

impl LangfuseLayer {
    /// Records into `exporter`, with the defaults: trace name `chat-completion`,
    /// [`Emit::ByUpstream`], 32 KiB input/output bounds.
    pub fn new(exporter: LangfuseExporter) -> Self {
        Self {
            config: Arc::new(LayerConfig {
                exporter,
                trace_name: Arc::from("chat-completion"),
                emit: Emit::default(),
                capture_limit: DEFAULT_CAPTURE_LIMIT,
                environment: None,
                release: None,
                version: None,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut LayerConfig)) -> Self {
        if let Some(config) = Arc::get_mut(&mut self.config) {
            f(config);
        } else {
            let c = &self.config;
            let mut config = LayerConfig {
                exporter: c.exporter.clone(),
                trace_name: c.trace_name.clone(),
                emit: c.emit,
                capture_limit: c.capture_limit,
                environment: c.environment.clone(),
                release: c.release.clone(),
                version: c.version.clone(),
            };
            f(&mut config);
            self.config = Arc::new(config);
        }
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
        LangfuseService { inner, config: self.config.clone() }
    }
}

// === impl LangfuseService ===

/// The service of [`LangfuseLayer`].
#[derive(Clone)]
pub struct LangfuseService<S> {
    inner: S,
    config: Arc<LayerConfig>,
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
            self.config.exporter.count_skipped();
            return RootFuture { inner: self.inner.call(req), ctx: None };
        };
        let ctx = TraceContext::new(
            &self.config,
            project.langfuse.clone(),
            ext.get::<LlmRequest>(),
            ext.get::<InsertionId>(),
            ext.get::<RolloutTags>(),
        );
        req.extensions_mut().insert(FallbackEvents(ctx.0.events.clone()));
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
                    let outcome = usage::tap(&mut response, ctx.0.capture_limit);
                    let status = response.status();
                    let served = response.extensions().get::<ServedBy>().cloned();
                    outcome.subscribe(move |o| record_root(&ctx, Some(status), served.as_ref(), Some(o), None));
                    return Poll::Ready(Ok(response));
                }
                Err(error) => {
                    let status = GatewayError::find(error.as_ref()).map(GatewayError::status);
                    record_root(&ctx, status, None, None, Some(error.to_string()));
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(result)
    }
}

/// Builds the root span and the event spans and hands them to the exporter.
pub(crate) fn record_root(
    ctx: &TraceContext,
    status: Option<StatusCode>,
    served: Option<&ServedBy>,
    outcome: Option<&Outcome>,
    error: Option<String>,
) {
    let t = &ctx.0;
    let end = outcome.map_or_else(SystemTime::now, |o| ctx.wall(o.ended_at));
    let (level, status_message) = judge(status, outcome, error, true);
    let mut attrs = t.trace_attributes.clone();
    attrs.push(kv_str("langfuse.observation.type", "span"));
    attrs.push(kv_str("langfuse.observation.input", t.input.clone()));
    if let Some(o) = outcome {
        attrs.push(kv_str("langfuse.observation.output", output_text(o, t.capture_limit)));
    }
    let mut metadata = Map::new();
    if let Some(status) = status {
        metadata.insert("http_status".into(), status.as_u16().into());
    }
    if let Some(served) = served {
        metadata.insert("served_by_model".into(), served.model.as_ref().into());
        metadata.insert("upstream".into(), served.upstream.as_ref().into());
        metadata.insert("attempts".into(), served.attempts.into());
    }
    if !metadata.is_empty() {
        attrs.push(kv_str("langfuse.observation.metadata", Value::Object(metadata).to_string()));
    }
    let root = SpanParts {
        trace_id: &t.trace_id,
        span_id: t.root_span_id,
        parent: None,
        name: t.trace_attributes.first().and_then(string_value).unwrap_or("chat-completion").to_owned(),
        start: t.started,
        end,
        level,
        status_message,
    }
    .build(attrs);
    t.exporter.enqueue(&t.keys, root);
    for (event, at) in t.events.take() {
        let mut attrs = t.trace_attributes.clone();
        attrs.push(kv_str("langfuse.observation.type", "event"));
        attrs.push(kv_str("langfuse.observation.metadata", event_metadata(&event).to_string()));
        let span = SpanParts {
            trace_id: &t.trace_id,
            span_id: new_span_id(),
            parent: Some(&t.root_span_id),
            name: event.name().to_owned(),
            start: at,
            end: at,
            level: Level::Warning,
            status_message: None,
        }
        .build(attrs);
        t.exporter.enqueue(&t.keys, span);
    }
}

fn string_value(kv: &opentelemetry_proto::tonic::common::v1::KeyValue) -> Option<&str> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match kv.value.as_ref()?.value.as_ref()? {
        V::StringValue(s) => Some(s),
        _ => None,
    }
}

/// Level and status message from the status, the body's end and a transport error.
fn judge(
    status: Option<StatusCode>,
    outcome: Option<&Outcome>,
    error: Option<String>,
    client_facing: bool,
) -> (Level, Option<String>) {
    if let Some(error) = error {
        return (Level::Error, Some(error));
    }
    if let Some(status) = status.filter(|s| s.is_client_error() || s.is_server_error()) {
        let detail = outcome.map(|o| bounded_text(&o.captured, 512, o.bytes, o.truncated)).filter(|d| !d.is_empty());
        let message = match detail {
            Some(detail) => format!("HTTP {}: {detail}", status.as_u16()),
            None => format!("HTTP {}", status.as_u16()),
        };
        return (Level::Error, Some(message));
    }
    match outcome.map(|o| &o.end) {
        Some(StreamEnd::Error(e)) => (Level::Error, Some(format!("response body failed: {e}"))),
        Some(StreamEnd::Cancelled) if client_facing => {
            (Level::Warning, Some("the client went away before the end of the response".into()))
        }
        Some(StreamEnd::Cancelled) => (Level::Warning, Some("the response was not read to its end".into())),
        _ => (Level::Default, None),
    }
}

/// The recorded output: the JSON body, or for SSE the assembled message, bounded.
pub(crate) fn output_text(o: &Outcome, limit: usize) -> String {
    if o.sse
        && let Some(assembled) = assemble_sse(&o.captured)
    {
        let text = assembled.to_string();
        let cut = text.len() > limit || o.truncated;
        return if cut { bounded_text(text.as_bytes(), limit, text.len() as u64, true) } else { text };
    }
    bounded_text(&o.captured, limit, o.bytes, o.truncated)
}

/// Joins the `choices[0].delta.content` of OpenAI chunks into one assistant message.
fn assemble_sse(captured: &[u8]) -> Option<Value> {
    let mut content = String::new();
    let mut finish_reason = Value::Null;
    let mut seen = false;
    for line in captured.split(|b| *b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            continue;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            continue;
        };
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            continue;
        };
        seen = true;
        if let Some(text) = choice.get("delta").and_then(|d| d.get("content")).and_then(Value::as_str) {
            content.push_str(text);
        }
        if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
            finish_reason = reason.clone();
        }
    }
    seen.then(|| json!({"role": "assistant", "content": content, "finish_reason": finish_reason}))
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

/// What is known about an attempt when it starts.
pub(crate) struct AttemptInfo {
    pub ctx: TraceContext,
    pub model: String,
    pub upstream_model: String,
    pub parameters: Value,
    pub pricing: Option<Pricing>,
    pub is_primary: bool,
    pub attempt: u32,
    pub started: SystemTime,
    pub started_at: Instant,
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let info = attempt_info(&req, self.catalog.as_deref());
        AttemptFuture { inner: self.inner.call(req), info }
    }
}

fn attempt_info<B>(req: &Request<B>, catalog: Option<&Catalog>) -> Option<AttemptInfo> {
    let ext = req.extensions();
    let ctx = ext.get::<TraceContext>()?;
    let mode = ext.get::<UpstreamTarget>().map_or(UpstreamMode::OpenAi, |t| t.mode);
    match ctx.0.emit {
        Emit::All => {}
        Emit::ByUpstream if mode == UpstreamMode::OpenAi => {}
        _ => return None,
    }
    let request = ext.get::<LlmRequest>();
    let choice = ext.get::<ModelChoice>();
    let model = choice
        .map(|c| c.current.to_string())
        .or_else(|| request.and_then(LlmRequest::model).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    let spec = catalog.and_then(|c| c.get(&model));
    let attempt = match choice {
        Some(c) => c.attempt,
        None => ctx.0.attempts.fetch_add(1, Ordering::Relaxed) + 1,
    };
    Some(AttemptInfo {
        ctx: ctx.clone(),
        upstream_model: spec.and_then(|s| s.upstream_model.clone()).unwrap_or_else(|| model.clone()),
        model,
        parameters: request.map_or(Value::Object(Map::new()), model_parameters),
        pricing: spec.and_then(|s| s.pricing),
        is_primary: choice.is_none_or(ModelChoice::is_primary),
        attempt,
        started: SystemTime::now(),
        started_at: Instant::now(),
    })
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

fn model_parameters(request: &LlmRequest) -> Value {
    let json = request.json();
    let params: Map<String, Value> =
        PARAMETERS.iter().filter_map(|k| json.get(*k).map(|v| ((*k).to_owned(), v.clone()))).collect();
    Value::Object(params)
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
                    let outcome = usage::tap(&mut response, info.ctx.0.capture_limit);
                    let status = response.status();
                    outcome.subscribe(move |o| record_generation(&info, Some(status), Some(o), None));
                    return Poll::Ready(Ok(response));
                }
                Err(error) => {
                    record_generation(&info, None, None, Some(error.to_string()));
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(result)
    }
}

/// Builds one generation span and hands it to the exporter.
pub(crate) fn record_generation(
    info: &AttemptInfo,
    status: Option<StatusCode>,
    outcome: Option<&Outcome>,
    error: Option<String>,
) {
    let t = &info.ctx.0;
    let ended_at = outcome.map_or_else(Instant::now, |o| o.ended_at);
    let end = info.started + ended_at.saturating_duration_since(info.started_at);
    let (level, status_message) = judge(status, outcome, error, false);
    let mut attrs = t.trace_attributes.clone();
    attrs.reserve(10);
    attrs.push(kv_str("langfuse.observation.type", "generation"));
    attrs.push(kv_str("langfuse.observation.model.name", info.upstream_model.clone()));
    attrs.push(kv_str("langfuse.observation.model.parameters", info.parameters.to_string()));
    attrs.push(kv_str("langfuse.observation.input", t.input.clone()));
    let mut metadata = Map::new();
    if let Some(o) = outcome {
        attrs.push(kv_str("langfuse.observation.output", output_text(o, t.capture_limit)));
        if let Some(u) = o.usage {
            attrs.push(kv_str(
                "langfuse.observation.usage_details",
                json!({"input": u.input, "output": u.output, "total": u.total}).to_string(),
            ));
            if let Some(pricing) = info.pricing {
                let cost = pricing.cost(u.input, u.output);
                attrs.push(kv_str(
                    "langfuse.observation.cost_details",
                    json!({"input": cost.input, "output": cost.output, "total": cost.total}).to_string(),
                ));
                metadata.insert("cost_usd".into(), json!(cost.total));
                metadata.insert("input_cost_usd".into(), json!(cost.input));
                metadata.insert("output_cost_usd".into(), json!(cost.output));
            }
        }
        if o.sse
            && let Some(first) = o.first_frame_at
        {
            let first = info.started + first.saturating_duration_since(info.started_at);
            attrs.push(kv_str("langfuse.observation.completion_start_time", iso_millis(first)));
        }
    }
    metadata.insert("is_primary".into(), info.is_primary.into());
    metadata.insert("latency_seconds".into(), json!(ended_at.saturating_duration_since(info.started_at).as_secs_f64()));
    if let Some(status) = status {
        metadata.insert("http_status".into(), status.as_u16().into());
    }
    metadata.insert("attempt".into(), info.attempt.into());
    metadata.insert("model".into(), info.model.clone().into());
    attrs.push(kv_str("langfuse.observation.metadata", Value::Object(metadata).to_string()));
    let span: Span = SpanParts {
        trace_id: &t.trace_id,
        span_id: new_span_id(),
        parent: Some(&t.root_span_id),
        name: format!("llm_call_{}", info.model.replace('/', "_")),
        start: info.started,
        end,
        level,
        status_message,
    }
    .build(attrs);
    t.exporter.enqueue(&t.keys, span);
}
