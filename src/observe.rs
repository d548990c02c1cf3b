//! What the reference proxy counts about itself and logs per request.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use http::{Request, Response};
use llmgate_core::{BoxError, GatewayBody, ext::LlmRequest, usage};
use tokio::time::Instant;
use tower::{Layer, Service};

/// Counters of the reference proxy.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    /// Chat responses whose usage outcome was reported.
    pub usage_reports: AtomicU64,
    /// Input tokens reported by upstreams.
    pub input_tokens: AtomicU64,
    /// Output tokens reported by upstreams.
    pub output_tokens: AtomicU64,
    /// Chat responses that ended complete, with an error, or cancelled by the client.
    pub completed: AtomicU64,
    /// Chat responses whose body failed.
    pub failed: AtomicU64,
    /// Chat responses whose client went away before the end.
    pub cancelled: AtomicU64,
}

/// Layer that applies [`ChatObserve`].
#[derive(Clone, Debug)]
pub struct ChatObserveLayer {
    metrics: Arc<GatewayMetrics>,
}

impl ChatObserveLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<GatewayMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ChatObserveLayer {
    type Service = ChatObserve<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ChatObserve { inner, metrics: self.metrics.clone() }
    }
}

/// Subscribes to each chat response's usage outcome: counts tokens and logs one line when the
/// body ends (so a stream's line carries its usage and how it ended).
#[derive(Clone, Debug)]
pub struct ChatObserve<S> {
    inner: S,
    metrics: Arc<GatewayMetrics>,
}

impl<S, B> Service<Request<B>> for ChatObserve<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let model: Option<Arc<str>> = req.extensions().get::<LlmRequest>().and_then(|r| r.model()).map(Into::into);
        let metrics = self.metrics.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            let status = response.status().as_u16();
            usage::tap(&mut response, 0).subscribe(move |outcome| {
                metrics.usage_reports.fetch_add(1, Ordering::Relaxed);
                if let Some(usage) = outcome.usage {
                    metrics.input_tokens.fetch_add(usage.input, Ordering::Relaxed);
                    metrics.output_tokens.fetch_add(usage.output, Ordering::Relaxed);
                }
                let counter = match outcome.end {
                    usage::StreamEnd::Complete => &metrics.completed,
                    usage::StreamEnd::Error(_) => &metrics.failed,
                    usage::StreamEnd::Cancelled => &metrics.cancelled,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    model = model.as_deref().unwrap_or("-"),
                    status,
                    latency_ms = started.elapsed().as_secs_f64() * 1e3,
                    input_tokens = outcome.usage.map(|u| u.input),
                    output_tokens = outcome.usage.map(|u| u.output),
                    end = ?outcome.end,
                    "chat completion"
                );
            });
            Ok(response)
        })
    }
}
