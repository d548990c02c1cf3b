//! The canonical stack, built once from the configuration.
//!
//! Outer → inner (the first layer listed sees the request first):
//!
//! ```text
//! CatchPanic → Rescue → PathMetadata → Router
//!   ├─ GET /health
//!   └─ Auth → Dispatch on RouteMeta
//!      ├─ chat:      DecodeJson → Project → InsertionId → ChatObserve
//!      │             → [per attempt] ResolveTarget → UpstreamAuth → EncodeJson → Upstream
//!      └─ catch-all: Upstream (body streamed, nothing injected)
//! ```

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Request, Response};
use llmgate_core::{
    BoxError, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, GatewayError, RescueLayer, catalog::Catalog,
};
use llmgate_credentials::{
    AuthLayer, AuthProvider, BaseUrlAllowlist, NoAuth, ProjectLayer, Projects, Secrets, StaticApiKeys,
    UpstreamAuthLayer,
};
use llmgate_insertion_id::{InsertionIdLayer, InsertionStore, MemoryStore, RedisStore};
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
    insertion_store: Arc<dyn InsertionStore>,
    config: Arc<Config>,
}

/// Work that goes on after responses: flushed on graceful shutdown.
#[derive(Default)]
pub struct Background {
    insertion: Option<InsertionIdLayer>,
}

impl Background {
    /// Flushes background work (export queues, record retries) for up to `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(insertion) = &self.insertion {
            if !insertion.flush(deadline).await {
                tracing::error!("shutdown: insertion-id records still pending after {timeout:?}");
            }
        }
    }
}

/// The insertion store: Redis (single node, or a cluster for `redis+cluster://` URLs and
/// comma-separated node lists) when configured, else in memory.
fn insertion_store(config: &Config) -> Result<Arc<dyn InsertionStore>, BoxError> {
    let ttl = config.insertion_ttl;
    let prefix = config.insertion_prefix.clone();
    let Some(url) = &config.redis_url else {
        return Ok(Arc::new(MemoryStore::new().ttl(ttl)));
    };
    let nodes = redis_nodes(url.expose());
    Ok(
        if nodes.len() > 1
            || url.expose().starts_with("redis+cluster://")
            || url.expose().starts_with("rediss+cluster://")
        {
            Arc::new(RedisStore::cluster(nodes)?.prefix(prefix).ttl(ttl))
        } else {
            Arc::new(RedisStore::single_node(url.expose())?.prefix(prefix).ttl(ttl))
        },
    )
}

/// The node URLs of a Redis URL: `redis+cluster://a:1,b:2` or `redis://a:1,redis://b:2`.
fn redis_nodes(url: &str) -> Vec<String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.replace("+cluster", ""), rest),
        None => ("redis".to_string(), url),
    };
    rest.split(',')
        .map(|node| node.trim())
        .filter(|node| !node.is_empty())
        .map(|node| node.split_once("://").map_or_else(|| format!("{scheme}://{node}"), |_| node.to_string()))
        .collect()
}

impl Gateway {
    /// Builds the canonical stack for `config`.
    pub async fn from_config(config: Config) -> Result<Self, BoxError> {
        let config = Arc::new(config);
        if config.langfuse_host.is_none() {
            tracing::info!("Langfuse export is off: no LANGFUSE_HOST or langfuse.host configured");
        }
        if config.redis_url.is_none() {
            tracing::info!("no Redis configured: insertion ids and rate limits use in-memory stores");
        }
        let metrics = Arc::new(GatewayMetrics::default());
        let client = http_client(config.request_timeout);
        let upstream = HyperUpstream::with_client(client, config.default_target().clone(), config.request_timeout);
        let targets = Arc::new(Targets {
            upstreams: config.upstreams.clone(),
            default_upstream: config.default_upstream.clone(),
            catalog: Arc::new(Catalog::new(config.models.iter().cloned())),
        });

        let projects = match &config.secrets_path {
            Some(path) => {
                Projects::from(Secrets::load(path).map_err(|e| format!("secrets file {}: {e}", path.display()))?)
            }
            None => Projects::empty(),
        };
        let allowlist = BaseUrlAllowlist::parse(config.encoded_base_url_allow.iter())
            .map_err(|e| format!("encoded_base_url.allow: {e}"))?;
        let mut project = ProjectLayer::new(Arc::new(projects)).allowlist(allowlist);
        if let Some(host) = &config.langfuse_host {
            project = project.langfuse_host(host.as_str());
        }
        let insertion_store = insertion_store(&config)?;
        let insertion = InsertionIdLayer::new(insertion_store.clone()).record_timeout(config.record_timeout);
        let auth: Arc<dyn AuthProvider> = if config.api_keys.is_empty() {
            Arc::new(NoAuth)
        } else {
            Arc::new(StaticApiKeys::new(config.api_keys.iter().map(|k| k.expose().to_string())))
        };

        let per_attempt = ServiceBuilder::new()
            .layer(ResolveTargetLayer::new(targets))
            .layer(UpstreamAuthLayer::new())
            .layer(EncodeJsonLayer::new())
            .service(upstream.clone());
        let chat: BoxStack = BoxCloneService::new(
            ServiceBuilder::new()
                .layer(DecodeJsonLayer::new().limit(config.body_limit))
                .layer(project)
                .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
                .layer(insertion.clone())
                .layer(ChatObserveLayer::new(metrics.clone()))
                .service(per_attempt),
        );
        let catch_all: BoxStack = BoxCloneService::new(upstream);
        // With gateway keys on, the client's `Authorization` is the gateway's own key: it is
        // consumed here and never forwarded (upstreams get their server-side keys).
        let consume_gateway_key = !config.api_keys.is_empty();
        let dispatch = ServiceBuilder::new()
            .layer(AuthLayer::new(auth))
            .map_request(move |mut req: Request<GatewayBody>| {
                if consume_gateway_key {
                    req.headers_mut().remove(http::header::AUTHORIZATION);
                }
                req
            })
            .service(Dispatch { chat, traces: None, catch_all });

        let service = ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
            .layer(RescueLayer::new())
            .layer(PathMetadataLayer::new())
            .service(Router::new(dispatch));
        let background = Background { insertion: Some(insertion) };
        Ok(Self {
            service: BoxCloneService::new(service),
            metrics,
            background: Arc::new(background),
            insertion_store,
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
    pub async fn serve(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        let Gateway { service, background, config, .. } = self;
        server::hyper::serve(listener, service, shutdown, config.drain_timeout).await;
        background.flush(config.drain_timeout).await;
    }
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response<GatewayBody> {
    tracing::error!("a request handler panicked");
    GatewayError::Internal("Internal error".into()).to_response()
}
