//! The canonical stack, built once from the configuration.
//!
//! Outer → inner (the first layer listed sees the request first):
//!
//! ```text
//! CatchPanic (handler and response bodies) → Rescue → PathMetadata → Metrics → Routes (Route::of)
//!   ├─ GET /health
//!   ├─ GET /metrics, GET /stats:  Auth → answer
//!   ├─ chat:      Auth → DecodeJson → Project → InsertionId → [Langfuse] → ChatObserve
//!   │             → ContextRouting → RateLimitFallback
//!   │             → [per attempt] ResolveTarget → UpstreamAuth → [LangfuseAttempt] → EncodeJson
//!   │             → UpstreamMetrics → Upstream (llmgate-hyper or llmgate-pingora)
//!   ├─ traces:    Auth → TracesService (Langfuse read back end; 404 without Langfuse)
//!   └─ catch-all: Auth → UpstreamMetrics → Upstream (body streamed, nothing injected)
//! ```

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use llmgate_context_routing::ContextRoutingLayer;
use llmgate_core::{
    BoxError, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, GatewayError, RescueLayer,
    rescue::{CatchPanicBody, PanicHook},
};
use llmgate_credentials::{AuthLayer, ProjectLayer, UpstreamAuthLayer};
use llmgate_insertion_id::{InsertionIdLayer, InsertionStore};
use llmgate_langfuse::{Emit, LangfuseAttemptLayer, LangfuseClient, LangfuseExporter};
use llmgate_path_metadata::PathMetadataLayer;
use tokio::net::TcpListener;
use tower::{Layer, ServiceBuilder, util::BoxCloneService};

use crate::{
    config::{Config, Engine},
    metrics::{Metrics, MetricsLayer, Sources, UpstreamMetricsLayer},
    observe::ChatObserveLayer,
    routes::{self, BoxStack, Routes},
    target::ResolveTargetLayer,
};
use llmgate_hyper::{HyperUpstream, http_client};

/// The whole gateway as one infallible service.
pub type GatewayService = BoxCloneService<Request<GatewayBody>, Response<GatewayBody>, Infallible>;

/// A built gateway: its service and what it counts.
pub struct Gateway {
    service: GatewayService,
    background: Arc<Background>,
    insertion_store: Arc<dyn InsertionStore>,
    prometheus: Arc<Metrics>,
    config: Arc<Config>,
}

/// Work that goes on after responses: flushed on graceful shutdown.
pub struct Background {
    insertion: InsertionIdLayer,
    langfuse: Option<LangfuseExporter>,
}

impl Background {
    /// Flushes background work (export queues, record retries) for up to `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        if !self.insertion.flush(deadline).await {
            tracing::error!("shutdown: insertion-id records still pending after {timeout:?}");
        }
        if let Some(exporter) = &self.langfuse
            && !exporter.flush(deadline).await
        {
            tracing::error!("shutdown: Langfuse spans still queued after {timeout:?}");
        }
    }
}

/// The configured engine's upstream.
fn upstream(config: &Config) -> Result<BoxStack, BoxError> {
    let target = config.default_target().clone();
    let timeout = config.server.request_timeout;
    Ok(match config.server.engine {
        Engine::Hyper => BoxCloneService::new(HyperUpstream::with_client(http_client(timeout), target, timeout)),
        #[cfg(feature = "pingora")]
        Engine::Pingora => BoxCloneService::new(llmgate_pingora::PingoraUpstream::new(target, timeout)),
        #[cfg(not(feature = "pingora"))]
        Engine::Pingora => return Err("engine pingora needs a build with the `pingora` feature".into()),
    })
}

impl Gateway {
    /// Builds the canonical stack for `config`.
    pub async fn from_config(config: Config) -> Result<Self, BoxError> {
        let config = Arc::new(config);
        if config.langfuse.host.is_none() {
            tracing::info!("Langfuse export is off: no LANGFUSE_HOST or langfuse.host configured");
        }
        if config.redis.url.is_none() {
            tracing::info!("no Redis configured: insertion ids and rate limits use in-memory stores");
        }
        let upstream = upstream(&config)?;
        let catalog = Arc::new(config.models.catalog());
        let targets = Arc::new(config.upstreams.targets(catalog.clone()));

        let projects = Arc::new(config.langfuse.projects()?);
        let mut project = ProjectLayer::new(projects.clone()).allowlist(config.encoded_base_url.allowlist());
        if let Some(host) = &config.langfuse.host {
            project = project.langfuse_host(host.as_str());
        }
        let redis = config.redis.connect()?;
        let insertion_store = config.insertion_id.store(redis.as_ref());
        let rate_store = config.rate_limit.store(redis.as_ref());
        let insertion = config.insertion_id.layer(insertion_store.clone());
        let auth = config.auth.provider();

        // One pooled Langfuse client for export and reads.
        let langfuse_client = config
            .langfuse
            .host
            .as_ref()
            .map(|_| LangfuseClient::new(http_client::<Full<Bytes>>(config.server.request_timeout)));
        let traces: Option<BoxStack> =
            langfuse_client.clone().and_then(|client| config.langfuse.reader(client)).map(|reader| {
                let service =
                    crate::routes::traces::TracesService::new(reader, projects.clone(), insertion_store.clone())
                        .require_generation(config.langfuse.emit != Emit::Events);
                BoxCloneService::new(service)
            });
        let langfuse = langfuse_client
            .and_then(|client| config.langfuse.exporter(client))
            .map(|exporter| (config.langfuse.layer(exporter.clone()), exporter));
        let context = ContextRoutingLayer::new(catalog.clone());
        let rate_limit = config.rate_limit.layer(catalog.clone(), rate_store);
        let stats = rate_limit.stats();
        let prometheus = Arc::new(Metrics::new(
            Sources {
                insertion: Some(insertion.counters()),
                langfuse: langfuse.as_ref().map(|(_, exporter)| exporter.clone()),
                rate_limit: Some(stats.clone()),
                context: Some(context.stats()),
            },
            catalog.clone(),
        ));
        let upstream_metrics = UpstreamMetricsLayer::new(prometheus.clone(), config.upstreams.default.as_str().into());

        let per_attempt = ServiceBuilder::new()
            .layer(ResolveTargetLayer::new(targets))
            .layer(UpstreamAuthLayer::new())
            .option_layer(langfuse.as_ref().map(|_| LangfuseAttemptLayer::new().catalog(catalog.clone())))
            .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
            .layer(EncodeJsonLayer::new())
            .layer(upstream_metrics.clone())
            .service(upstream.clone());
        let chat: BoxStack = BoxCloneService::new(
            ServiceBuilder::new()
                .layer(DecodeJsonLayer::new().limit(config.server.body_limit))
                .layer(project)
                .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
                .layer(insertion.clone())
                .option_layer(langfuse.as_ref().map(|(layer, _)| layer.clone()))
                .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
                .layer(ChatObserveLayer::new(prometheus.clone(), catalog.clone()))
                .layer(context)
                .layer(rate_limit)
                .service(BoxCloneService::new(per_attempt)),
        );
        let catch_all: BoxStack = BoxCloneService::new(upstream_metrics.layer(upstream));
        // Every branch but `/health` behind the gateway's auth (which also consumes the
        // gateway's own key: it never reaches an upstream).
        let guard = AuthLayer::new(auth);
        let guarded = |branch: BoxStack| -> BoxStack { BoxCloneService::new(guard.layer(branch)) };
        let registry = prometheus.clone();
        let routes = Routes {
            health: routes::answer(routes::health),
            metrics: guarded(routes::answer(move || routes::metrics(&registry))),
            stats: guarded(routes::answer(move || routes::stats(Some(&stats)))),
            chat: guarded(chat),
            traces: guarded(traces.unwrap_or_else(|| routes::answer(routes::traces_off))),
            catch_all: guarded(catch_all),
        };

        let body_panics: PanicHook = {
            let prometheus = prometheus.clone();
            Arc::new(move || prometheus.count_panic("body"))
        };
        let handler_panics = prometheus.clone();
        let service = ServiceBuilder::new()
            .map_response(move |r: Response<_>| {
                r.map(|body| llmgate_core::body::boxed(CatchPanicBody::new(body, body_panics.clone())))
            })
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(move |_panic| {
                tracing::error!("a request handler panicked");
                handler_panics.count_panic("handler");
                GatewayError::Internal("Internal error".into()).to_response()
            }))
            .layer(RescueLayer::new())
            .layer(PathMetadataLayer::new())
            .layer(MetricsLayer::new(prometheus.clone()))
            .service(routes);
        let background = Background { insertion, langfuse: langfuse.map(|(_, exporter)| exporter) };
        Ok(Self {
            service: BoxCloneService::new(service),
            background: Arc::new(background),
            insertion_store,
            prometheus,
            config,
        })
    }

    /// The store of insertion ids.
    pub fn insertion_store(&self) -> &Arc<dyn InsertionStore> {
        &self.insertion_store
    }

    /// The gateway as a `tower::Service`.
    pub fn service(&self) -> GatewayService {
        self.service.clone()
    }

    /// The gateway's metrics (what `GET /metrics` renders).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.prometheus
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves on `listener` until `shutdown` resolves, drains in-flight requests for up to the
    /// configured drain timeout, then flushes background work.
    pub async fn serve(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        let Gateway { service, background, config, prometheus, .. } = self;
        let metrics_server = match config.server.metrics_listen {
            Some(addr) => match llmgate_hyper::bind(addr).await {
                Ok(listener) => Some(tokio::spawn(llmgate_hyper::serve(
                    listener,
                    crate::routes::metrics_only(prometheus),
                    std::future::pending(),
                    Duration::ZERO,
                ))),
                Err(error) => {
                    tracing::error!(%addr, %error, "cannot listen for /metrics");
                    None
                }
            },
            None => None,
        };
        serve_on(config.server.engine, listener, service, shutdown, config.server.drain_timeout).await;
        if let Some(metrics_server) = metrics_server {
            metrics_server.abort();
        }
        background.flush(config.server.drain_timeout).await;
    }
}

/// A bare proxy hop: the configured engine's upstream, no layers (a transport error becomes
/// the same JSON error the gateway gives). The baseline of the end-to-end benchmark
/// (`llmgate bare-proxy`, `scripts/bench.sh`).
pub fn bare_service(config: &Config) -> Result<GatewayService, BoxError> {
    Ok(BoxCloneService::new(RescueLayer::new().layer(upstream(config)?)))
}

/// Serves `service` on `listener` with `engine`'s host until `shutdown`, then drains for up to
/// `drain`.
pub async fn serve_on(
    engine: Engine,
    listener: TcpListener,
    service: GatewayService,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    match engine {
        Engine::Hyper => llmgate_hyper::serve(listener, service, shutdown, drain).await,
        #[cfg(feature = "pingora")]
        Engine::Pingora => {
            if let Err(error) = llmgate_pingora::serve_pingora(listener, service, shutdown, drain).await {
                tracing::error!(%error, "the Pingora host failed");
            }
        }
        #[cfg(not(feature = "pingora"))]
        Engine::Pingora => tracing::error!("engine pingora needs a build with the `pingora` feature"),
    }
}
