//! What the reference proxy counts about itself and logs per request.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use llmgate_core::{
    BoxError, GatewayBody,
    catalog::Catalog,
    ext::{FallbackEvent, FallbackEventSink, FallbackEvents, LlmRequest, ServedBy},
    usage,
};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::metrics::{CostLabels, EndLabels, FallbackKindLabels, FallbackLabels, Metrics, TokenLabels};

/// Layer that applies [`ChatObserve`].
#[derive(Clone)]
pub struct ChatObserveLayer {
    observer: Arc<Observer>,
}

struct Observer {
    metrics: Arc<Metrics>,
    catalog: Arc<Catalog>,
}

impl Observer {
    fn model_label(&self, model: Option<&str>) -> String {
        self.metrics.model_label(model)
    }
}

impl ChatObserveLayer {
    /// Counts into `metrics`; `catalog` bounds model labels and prices usage.
    pub fn new(metrics: Arc<Metrics>, catalog: Arc<Catalog>) -> Self {
        Self { observer: Arc::new(Observer { metrics, catalog }) }
    }
}

impl<S> Layer<S> for ChatObserveLayer {
    type Service = ChatObserve<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ChatObserve { inner, observer: self.observer.clone() }
    }
}

/// Counts fallback events, then hands them on to the sink it found (Langfuse's).
struct CountingSink {
    observer: Arc<Observer>,
    next: Option<FallbackEvents>,
}

impl FallbackEventSink for CountingSink {
    fn record(&self, event: FallbackEvent) {
        let labels = match &event {
            FallbackEvent::RateLimit { original_model, fallback_model, reason } => FallbackLabels {
                r#type: "rate_limit",
                reason,
                original_model: self.observer.model_label(Some(original_model)),
                fallback_model: self.observer.model_label(Some(fallback_model)),
            },
            FallbackEvent::ContextLength { original_model, fallback_model, .. } => FallbackLabels {
                r#type: "context_length",
                reason: "context_length",
                original_model: self.observer.model_label(Some(original_model)),
                fallback_model: self.observer.model_label(Some(fallback_model)),
            },
        };
        self.observer.metrics.fallbacks.get_or_create(&labels).inc();
        if let Some(next) = &self.next {
            next.record(event);
        }
    }
}

/// Subscribes to each chat response's usage outcome: counts tokens and cost, times streams,
/// and logs one line when the body ends (so a stream's line carries its usage and how it
/// ended). Counts fallback events on their way to the sink further out.
#[derive(Clone)]
pub struct ChatObserve<S> {
    inner: S,
    observer: Arc<Observer>,
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let model: Option<Arc<str>> = req.extensions().get::<LlmRequest>().and_then(|r| r.model()).map(Into::into);
        let next = req.extensions().get::<FallbackEvents>().cloned();
        let observer = self.observer.clone();
        req.extensions_mut().insert(FallbackEvents(Arc::new(CountingSink { observer: observer.clone(), next })));
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            let status = response.status().as_u16();
            let served_by = response.extensions().get::<ServedBy>();
            let served: Option<Arc<str>> = served_by.map(|s| s.model.clone());
            // Rate-limit fallbacks take more than one attempt; a different model in one attempt
            // was chosen for its context window.
            let fallback = match served_by {
                Some(s) if s.attempts > 1 => "rate_limit",
                Some(s) if model.as_deref().is_some_and(|m| m != &*s.model) => "context_length",
                _ => "none",
            };
            observer
                .metrics
                .chat_duration
                .get_or_create(&FallbackKindLabels { fallback })
                .observe(started.elapsed().as_secs_f64());
            let streaming = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if streaming {
                observer.metrics.open_streams.inc();
            }
            usage::tap(&mut response, 0).subscribe(move |outcome| {
                let model = served.as_deref().or(model.as_deref());
                if streaming {
                    observer.metrics.open_streams.dec();
                    if let Some(first) = outcome.first_frame_at {
                        observer.metrics.time_to_first_byte.observe(first.duration_since(started).as_secs_f64());
                    }
                }
                if let Some(usage) = outcome.usage {
                    let label = observer.model_label(model);
                    let tokens = &observer.metrics.tokens;
                    tokens.get_or_create(&TokenLabels { model: label.clone(), direction: "input" }).inc_by(usage.input);
                    tokens
                        .get_or_create(&TokenLabels { model: label.clone(), direction: "output" })
                        .inc_by(usage.output);
                    let pricing = model.and_then(|m| observer.catalog.get(m)).and_then(|spec| spec.pricing);
                    if let Some(pricing) = pricing {
                        let cost = pricing.cost(usage.input, usage.output);
                        observer
                            .metrics
                            .cost_usd
                            .get_or_create(&CostLabels { model: label, fallback })
                            .inc_by(cost.total);
                    }
                }
                let end = match outcome.end {
                    usage::StreamEnd::Complete => "complete",
                    usage::StreamEnd::Error(_) => "error",
                    usage::StreamEnd::Cancelled => "cancelled",
                };
                observer.metrics.chat_responses.get_or_create(&EndLabels { end }).inc();
                tracing::debug!(
                    model = model.unwrap_or("-"),
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
