//! The canonical stack, built once from the configuration.
//!
//! Outer → inner (the first layer listed sees the request first):
//!
//! ```text
//! CatchPanic → Rescue → PathMetadata → Router
//!   ├─ GET /health
//!   └─ Dispatch on RouteMeta
//!      ├─ chat:      DecodeJson → ChatObserve → [per attempt] ResolveTarget → EncodeJson → Upstream
//!      └─ catch-all: Upstream (body streamed, nothing injected)
//! ```

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Request, Response};
use llmgate_core::{
    BoxError, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, GatewayError, RescueLayer,
    catalog::Catalog,
};
use llmgate_path_metadata::PathMetadataLayer;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, util::BoxCloneService};

use crate::{
    config::Config,
    observe::{ChatObserveLayer, GatewayMetrics},
    routes::{BoxStack, Dispatch, Router},
    server,
    target::{ResolveTargetLayer, Targets},
    upstream::{HyperUpstream, hyper::http_client},
};

/// The whole gateway as one infallible service.
pub type GatewayService = BoxCloneService<Request<GatewayBody>, Response<GatewayBody>, Infallible>;

/// A built gateway: its service and what it counts.
pub struct Gateway {
    service: GatewayService,
    metrics: Arc<GatewayMetrics>,
    background: Arc<Background>,
    config: Arc<Config>,
}

/// Work that goes on after responses: flushed on graceful shutdown.
#[derive(Default)]
pub struct Background {}

impl Background {
    /// Flushes background work (export queues, record retries) for up to `deadline`.
    pub async fn flush(&self, deadline: Duration) {
        let _ = deadline;
    }
}

impl Gateway {
    /// Builds the canonical stack for `config`.
    pub async fn from_config(config: Config) -> Result<Self, BoxError> {
        let config = Arc::new(config);
        if config.langfuse_host.is_none() {
            tracing::info!("Langfuse export is off: no LANGFUSE_HOST or langfuse.host configured");
        }
        if config.redis_url.is_none() {
            tracing::info!(
                "no Redis configured: insertion ids and rate limits use in-memory stores"
            );
        }
        let metrics = Arc::new(GatewayMetrics::default());
        let client = http_client(config.request_timeout);
        let upstream = HyperUpstream::with_client(
            client,
            config.default_target().clone(),
            config.request_timeout,
        );
        let targets = Arc::new(Targets {
            upstreams: config.upstreams.clone(),
            default_upstream: config.default_upstream.clone(),
            catalog: Arc::new(Catalog::new(config.models.iter().cloned())),
        });

        let per_attempt = ServiceBuilder::new()
            .layer(ResolveTargetLayer::new(targets))
            .layer(EncodeJsonLayer::new())
            .service(upstream.clone());
        let chat: BoxStack = BoxCloneService::new(
            ServiceBuilder::new()
                .layer(DecodeJsonLayer::new().limit(config.body_limit))
                .layer(ChatObserveLayer::new(metrics.clone()))
                .service(per_attempt),
        );
        let catch_all: BoxStack = BoxCloneService::new(upstream);
        let dispatch = Dispatch {
            chat,
            traces: None,
            catch_all,
        };

        let service = ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                panic_response,
            ))
            .layer(RescueLayer::new())
            .layer(PathMetadataLayer::new())
            .service(Router::new(dispatch));
        Ok(Self {
            service: BoxCloneService::new(service),
            metrics,
            background: Arc::new(Background::default()),
            config,
        })
    }

    /// The gateway as a `tower::Service`.
    pub fn service(&self) -> GatewayService {
        self.service.clone()
    }

    /// The gateway's counters.
    pub fn metrics(&self) -> &Arc<GatewayMetrics> {
        &self.metrics
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves on `listener` until `shutdown` resolves, drains in-flight requests for up to the
    /// configured drain timeout, then flushes background work.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let Gateway {
            service,
            background,
            config,
            ..
        } = self;
        server::hyper::serve(listener, service, shutdown, config.drain_timeout).await;
        background.flush(config.drain_timeout).await;
    }
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response<GatewayBody> {
    tracing::error!("a request handler panicked");
    GatewayError::Internal("Internal error".into()).to_response()
}
