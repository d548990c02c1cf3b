//! The reference proxy's routes: `/health`, chat routes, the traces routes and the catch-all.
//!
//! Dispatch follows the [`RouteMeta`] that the path-metadata layer wrote: chat routes go to the
//! chat stack, anything without route metadata to the catch-all, which forwards it unchanged.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Method, Request, Response, StatusCode};
use llmgate_core::{
    BoxError, GatewayBody,
    body::json_response,
    ext::{RouteKind, RouteMeta},
};
use llmgate_rate_limit_fallback::Stats;

use crate::metrics::Metrics;
use serde_json::json;
use tower::{Service, ServiceExt, util::BoxCloneService};

pub mod traces;

/// A boxed stack.
pub type BoxStack = BoxCloneService<Request<GatewayBody>, Response<GatewayBody>, BoxError>;

/// `GET /health`: the same body as the gateway this replaces, so existing probes keep working.
pub fn health() -> Response<GatewayBody> {
    json_response(StatusCode::OK, &json!({"status": "healthy", "service": "metadata-proxy"}))
}

/// Whether `req` is `GET /health` (the one route outside auth).
pub fn is_health(req: &Request<GatewayBody>) -> bool {
    req.method() == Method::GET && req.uri().path() == "/health"
}

/// Dispatches on [`RouteMeta`]: chat stack, traces service, or catch-all.
#[derive(Clone)]
pub struct Dispatch {
    /// Chat routes.
    pub chat: BoxStack,
    /// `/traces` and `/traces/pointwise`; `None` answers 404.
    pub traces: Option<BoxStack>,
    /// Everything else.
    pub catch_all: BoxStack,
    /// `GET /stats`: the fallback statistics.
    pub stats: Option<Arc<Stats>>,
    /// `GET /metrics`: Prometheus text format.
    pub metrics: Option<Arc<Metrics>>,
}

impl Service<Request<GatewayBody>> for Dispatch {
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each branch is made ready on its own clone in `call` (waiting for all of them here
        // would be `tower::steer`'s problem).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let kind = req.extensions().get::<RouteMeta>().map(|m| m.kind);
        if let (None, Some(metrics)) = (kind, &self.metrics)
            && req.method() == Method::GET
            && req.uri().path() == "/metrics"
        {
            let response = metrics_response(metrics);
            return Box::pin(async move { Ok(response) });
        }
        let branch = match kind {
            Some(RouteKind::ChatCompletions) => self.chat.clone(),
            Some(RouteKind::Traces | RouteKind::TracesPointwise) => match &self.traces {
                Some(traces) => traces.clone(),
                None => {
                    return Box::pin(async {
                        Ok(json_response(
                            StatusCode::NOT_FOUND,
                            &json!({"detail": "Trace endpoints need Langfuse (set LANGFUSE_HOST)"}),
                        ))
                    });
                }
            },
            None if req.method() == Method::GET && req.uri().path() == "/stats" => {
                let stats = self.stats.as_ref().map_or_else(|| json!({}), |s| s.snapshot());
                return Box::pin(async move { Ok(json_response(StatusCode::OK, &stats)) });
            }
            None => self.catch_all.clone(),
        };
        Box::pin(branch.oneshot(req))
    }
}

/// The outermost router: `/health` without auth, everything else through `rest`.
#[derive(Clone)]
pub struct Router<S> {
    rest: S,
}

impl<S> Router<S> {
    /// A router sending everything but `/health` to `rest`.
    pub fn new(rest: S) -> Self {
        Self { rest }
    }
}

impl<S> Service<Request<GatewayBody>> for Router<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        if is_health(&req) {
            return Box::pin(async { Ok(health()) });
        }
        Box::pin(self.rest.clone().oneshot(req))
    }
}

/// The Prometheus text of `metrics` as a response.
fn metrics_response(metrics: &Metrics) -> Response<GatewayBody> {
    let mut response = Response::new(llmgate_core::body::full(metrics.render()));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// The service of the separate metrics listener: `GET /metrics`, no auth; 404 for anything else.
pub fn metrics_only(metrics: Arc<Metrics>) -> crate::stack::GatewayService {
    BoxCloneService::new(tower::service_fn(move |req: Request<GatewayBody>| {
        let response = if req.method() == Method::GET && req.uri().path() == "/metrics" {
            metrics_response(&metrics)
        } else {
            json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"}))
        };
        std::future::ready(Ok::<_, std::convert::Infallible>(response))
    }))
}
