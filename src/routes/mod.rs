//! The reference proxy's routes, classified in one place ([`Route::of`]) and dispatched by one
//! service ([`Routes`]): `/health`, `/ready`, `/metrics`, `/stats`, the chat, traces, logs and status routes (which the
//! path-metadata layer recognised and described in [`RouteMeta`]) and the catch-all, which
//! forwards anything else unchanged. Authentication is applied per branch where the routes are
//! composed (`stack.rs`): every branch but `/health` and `/ready` is guarded.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Method, Request, Response, StatusCode};
use llmgate_core::{
    BoxError, GatewayBody, GatewayError,
    body::json_response,
    ext::{RouteKind, RouteMeta},
};
use llmgate_rate_limit_fallback::Stats;
use serde_json::json;
use tower::{Service, ServiceExt, service_fn, util::BoxCloneService};

use crate::metrics::Metrics;

pub mod traces;

/// A boxed stack.
pub type BoxStack = BoxCloneService<Request<GatewayBody>, Response<GatewayBody>, BoxError>;

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /health`, outside auth.
    Health,
    /// `GET /ready`, outside auth.
    Ready,
    /// `GET /metrics`.
    Metrics,
    /// `GET /stats`.
    Stats,
    /// A chat route (`…/chat/completions`).
    Chat,
    /// `…/traces` and `…/traces/pointwise`.
    Traces,
    /// `…/logs` and `…/status`.
    RolloutLogs,
    /// Anything else: forwarded unchanged.
    CatchAll,
}

impl Route {
    /// The route of `req`: its [`RouteMeta`] when the path-metadata layer recognised a gateway
    /// route, else the proxy's own paths (`GET` only; other methods go to the catch-all).
    pub fn of<B>(req: &Request<B>) -> Self {
        match req.extensions().get::<RouteMeta>().map(|m| m.kind) {
            Some(RouteKind::ChatCompletions) => Route::Chat,
            Some(RouteKind::Traces | RouteKind::TracesPointwise) => Route::Traces,
            Some(RouteKind::Logs | RouteKind::Status) => Route::RolloutLogs,
            None if req.method() != Method::GET => Route::CatchAll,
            None => match req.uri().path() {
                "/health" => Route::Health,
                "/ready" => Route::Ready,
                "/metrics" => Route::Metrics,
                "/stats" => Route::Stats,
                _ => Route::CatchAll,
            },
        }
    }
}

/// The dispatcher: one service per [`Route`].
#[derive(Clone)]
pub struct Routes {
    /// `GET /health`.
    pub health: BoxStack,
    /// `GET /ready`.
    pub ready: BoxStack,
    /// `GET /metrics`.
    pub metrics: BoxStack,
    /// `GET /stats`.
    pub stats: BoxStack,
    /// Chat routes.
    pub chat: BoxStack,
    /// `/traces` and `/traces/pointwise`.
    pub traces: BoxStack,
    /// `/logs` and `/status`.
    pub rollout_logs: BoxStack,
    /// Everything else.
    pub catch_all: BoxStack,
}

impl Service<Request<GatewayBody>> for Routes {
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each branch is made ready on its own clone in `call` (waiting for all of them here
        // would be `tower::steer`'s problem).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let branch = match Route::of(&req) {
            Route::Health => &self.health,
            Route::Ready => &self.ready,
            Route::Metrics => &self.metrics,
            Route::Stats => &self.stats,
            Route::Chat => &self.chat,
            Route::Traces => &self.traces,
            Route::RolloutLogs => &self.rollout_logs,
            Route::CatchAll => &self.catch_all,
        };
        Box::pin(branch.clone().oneshot(req))
    }
}

/// A branch that answers every request with `respond()`.
pub fn answer(respond: impl Fn() -> Response<GatewayBody> + Clone + Send + Sync + 'static) -> BoxStack {
    BoxCloneService::new(service_fn(move |_req: Request<GatewayBody>| std::future::ready(Ok(respond()))))
}

/// `branch` with its refusals (auth's 401, 403 and 503) answered `{"detail": "…"}`, the shape
/// the traces, logs and status routes answer in (the original's, which clients parse); any
/// other error goes on to the rescue layer.
pub fn detail_errors(branch: BoxStack) -> BoxStack {
    BoxCloneService::new(branch.map_result(|result| match result {
        Err(error) => match GatewayError::find(&*error) {
            Some(refusal) => Ok(refusal.to_detail_response()),
            None => Err(error),
        },
        ok => ok,
    }))
}

/// `GET /health`: the same body as the gateway this replaces, so existing probes keep working.
pub fn health() -> Response<GatewayBody> {
    json_response(StatusCode::OK, &json!({"status": "healthy", "service": "metadata-proxy"}))
}

/// `GET /ready`: 200 `{"status":"ready"}` once the warm-up is done ([`crate::warm_up`]), 503
/// `{"status":"warming_up"}` before (for a readiness probe; `/health` answers 200 throughout).
pub fn ready(is_ready: bool) -> Response<GatewayBody> {
    match is_ready {
        true => json_response(StatusCode::OK, &json!({"status": "ready"})),
        false => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "warming_up"})),
    }
}

/// `GET /stats`: the fallback statistics.
pub fn stats(stats: Option<&Stats>) -> Response<GatewayBody> {
    json_response(StatusCode::OK, &stats.map_or_else(|| json!({}), Stats::snapshot))
}

/// The traces routes without Langfuse.
pub fn traces_off() -> Response<GatewayBody> {
    json_response(StatusCode::NOT_FOUND, &json!({"detail": "Trace endpoints need Langfuse (set LANGFUSE_HOST)"}))
}

/// The Prometheus text of `metrics` as a response.
pub fn metrics(metrics: &Metrics) -> Response<GatewayBody> {
    let mut response = Response::new(llmgate_core::body::full(metrics.render()));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// The service of the separate metrics listener: `GET /metrics`, no auth; 404 for anything else.
pub fn metrics_only(registry: Arc<Metrics>) -> crate::stack::GatewayService {
    BoxCloneService::new(service_fn(move |req: Request<GatewayBody>| {
        let response = match Route::of(&req) {
            Route::Metrics => metrics(&registry),
            _ => json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"})),
        };
        std::future::ready(Ok::<_, std::convert::Infallible>(response))
    }))
}
