//! The canonical stack, built once from the configuration: the config's sections build their
//! components ([`Parts`]), and one function, [`compose`], puts the whole request path together,
//! readable in one place. Serving it is `serve.rs`'s.
//!
//! Outer → inner (the first layer listed sees the request first):
//!
//! ```text
//! CatchPanic (handler and response bodies) → Rescue → PathMetadata → Metrics → Routes (Route::of)
//!   ├─ GET /health, GET /ready
//!   ├─ GET /metrics, GET /stats:  Auth (keys for every project only) → answer
//!   ├─ chat:      Auth → DecodeJson → Project → InsertionId → [Langfuse] → ChatObserve
//!   │             → ContextRouting → RateLimitFallback
//!   │             → [per attempt] ResolveTarget → UpstreamAuth → [LangfuseAttempt] → EncodeJson
//!   │             → UpstreamMetrics → Upstream (llmgate-hyper or llmgate-pingora)
//!   ├─ traces:    Auth → TracesService (Langfuse read back end; 404 without Langfuse)
//!   ├─ logs, status: Auth → RolloutLogService (rollout logs and status, memory or Redis)
//!   └─ catch-all: Auth → UpstreamMetrics → Upstream (body streamed, nothing injected)
//! ```

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use llmgate_context_routing::ContextRoutingLayer;
use llmgate_core::{
    BoxError, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, GatewayError, RescueLayer,
    catalog::Catalog,
    rescue::{CatchPanicBody, PanicHook},
};
use llmgate_credentials::{AuthLayer, ProjectLayer, Reloadable, UpstreamAuthLayer};
use llmgate_insertion_id::{InsertionIdLayer, InsertionStore};
use llmgate_langfuse::{Emit, LangfuseAttemptLayer, LangfuseClient, LangfuseExporter, LangfuseLayer};
use llmgate_path_metadata::PathMetadataLayer;
use llmgate_rate_limit_fallback::{RateLimitFallbackLayer, RateStore};
use llmgate_rollout_logs::RolloutLogService;
use tower::{Layer, ServiceBuilder, ServiceExt, util::BoxCloneService};

use crate::{
    config::Config,
    metrics::{Metrics, MetricsLayer, Sources, UpstreamMetricsLayer},
    observe::ChatObserveLayer,
    reload::{SecretHandles, SecretsReload},
    routes::{self, BoxStack, Routes},
    target::{ResolveTargetLayer, Targets},
    warm_up::WarmUp,
};

/// The whole gateway as one infallible service.
pub type GatewayService = BoxCloneService<Request<GatewayBody>, Response<GatewayBody>, Infallible>;

/// A built gateway: its service and what it counts.
pub struct Gateway {
    pub(crate) service: GatewayService,
    pub(crate) background: Arc<Background>,
    insertion_store: Arc<dyn InsertionStore>,
    pub(crate) prometheus: Arc<Metrics>,
    pub(crate) config: Arc<Config>,
    warm_up: Arc<WarmUp>,
    pub(crate) secrets_reload: SecretsReload,
}

/// Work that goes on after responses: flushed on graceful shutdown.
pub struct Background {
    insertion: InsertionIdLayer,
    langfuse: Option<LangfuseExporter>,
    rate_store: Arc<dyn RateStore>,
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
        // Rate-limit leases go back to the other replicas.
        if tokio::time::timeout_at(deadline, self.rate_store.release()).await.is_err() {
            tracing::error!("shutdown: rate-limit leases not handed back within {timeout:?}");
        }
    }
}

/// What the config's sections build, before anything is composed.
pub struct Parts {
    catalog: Arc<Catalog>,
    targets: Arc<Targets>,
    upstream: BoxStack,
    body_limit: usize,
    project: ProjectLayer,
    insertion: InsertionIdLayer,
    insertion_store: Arc<dyn InsertionStore>,
    /// The Langfuse layer and its exporter, when export is on.
    langfuse: Option<(LangfuseLayer, LangfuseExporter)>,
    /// The traces routes, when Langfuse is configured.
    traces: Option<BoxStack>,
    /// The rollout log and status routes.
    rollout_logs: RolloutLogService,
    context: ContextRoutingLayer,
    rate_limit: RateLimitFallbackLayer,
    /// The rate store, for its leases to be handed back on shutdown.
    rate_store: Arc<dyn RateStore>,
    /// The gateway's auth, with the projects whose default a one-project-less request uses.
    auth: AuthLayer,
    /// What a secrets reload swaps.
    secrets: SecretHandles,
    metrics: Arc<Metrics>,
    default_upstream: Arc<str>,
    warm_up: Arc<WarmUp>,
}

impl Parts {
    /// Builds every component from its config section.
    pub fn build(config: &Config) -> Result<Self, BoxError> {
        if config.langfuse.host.is_none() {
            tracing::info!("Langfuse export is off: no LANGFUSE_HOST or langfuse.host configured");
        }
        if config.redis.url.is_none() {
            tracing::info!("no Redis configured: insertion ids and rate limits use in-memory stores");
        }
        let catalog = Arc::new(config.models.catalog());
        let projects = Reloadable::new(config.langfuse.projects()?);
        let mut project = ProjectLayer::new(projects.clone()).allowlist(config.encoded_base_url.allowlist());
        if let Some(host) = &config.langfuse.host {
            project = project.langfuse_host(host.as_str());
        }
        let redis = config.redis.connect()?;
        let insertion_store = config.insertion_id.store(redis.as_ref());
        let insertion = config.insertion_id.layer(insertion_store.clone());
        let rate_store = config.rate_limit.store(redis.as_ref());
        let rate_limit = config.rate_limit.layer(catalog.clone(), rate_store.clone());
        let rollout_logs = config.rollout_logs.service(
            config.rollout_logs.store(redis.as_ref()),
            config.server.body_limit,
            projects.current().default_project().map(|p| &*p.id),
        );

        // One pooled Langfuse client for export and reads.
        let langfuse_client = config
            .langfuse
            .host
            .as_ref()
            .map(|_| LangfuseClient::new(llmgate_hyper::http_client::<Full<Bytes>>(config.server.request_timeout)));
        let langfuse = langfuse_client
            .clone()
            .and_then(|client| config.langfuse.exporter(client))
            .map(|exporter| (config.langfuse.layer(exporter.clone()), exporter));
        let traces = langfuse_client.and_then(|client| config.langfuse.reader(client)).map(|reader| {
            let mut service = routes::traces::TracesService::new(reader, projects.clone(), insertion_store.clone())
                .require_generation(config.langfuse.emit != Emit::Events);
            if let Some((_, exporter)) = &langfuse {
                service = service.span_losses(exporter.losses().clone());
            }
            BoxStack::new(service)
        });

        let context = ContextRoutingLayer::new(catalog.clone());
        let secrets = SecretHandles {
            projects,
            gateway_keys: config.auth.static_keys().map(Reloadable::new),
            key_names: Reloadable::new(config.auth.key_names()),
        };
        let auth =
            AuthLayer::new(config.auth.provider(secrets.gateway_keys.as_ref())).projects(secrets.projects.clone());
        let warm_up = Arc::new(WarmUp::new(context.clone()));
        let metrics = Arc::new(Metrics::new(
            Sources {
                insertion: Some(insertion.counters()),
                langfuse: langfuse.as_ref().map(|(_, exporter)| exporter.clone()),
                rate_limit: Some(rate_limit.stats()),
                context: Some(context.stats()),
                rollout_logs: Some(rollout_logs.counters()),
                auth_refusals: Some(auth.refusals()),
                key_names: secrets.key_names.clone(),
            },
            catalog.clone(),
        ));
        Ok(Self {
            targets: Arc::new(config.upstreams.targets(catalog.clone())),
            catalog,
            upstream: crate::serve::upstream(config)?,
            body_limit: config.server.body_limit,
            project,
            insertion,
            insertion_store,
            langfuse,
            traces,
            rollout_logs,
            context,
            rate_limit,
            rate_store,
            auth,
            secrets,
            metrics,
            default_upstream: config.upstreams.default.as_str().into(),
            warm_up,
        })
    }
}

/// The request path, outer → inner, in one place (the diagram in the module doc).
pub fn compose(parts: &Parts) -> GatewayService {
    let Parts { catalog, targets, upstream, metrics, langfuse, .. } = parts;
    let upstream_metrics = UpstreamMetricsLayer::new(metrics.clone(), parts.default_upstream.clone());

    // Per upstream attempt, inside the routing layers.
    let per_attempt = ServiceBuilder::new()
        .layer(ResolveTargetLayer::new(targets.clone()))
        .layer(UpstreamAuthLayer::new())
        .option_layer(langfuse.as_ref().map(|_| LangfuseAttemptLayer::new().catalog(catalog.clone())))
        .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
        .layer(EncodeJsonLayer::new())
        .layer(upstream_metrics.clone())
        .service(upstream.clone());
    let chat = BoxStack::new(
        ServiceBuilder::new()
            .layer(DecodeJsonLayer::new().limit(parts.body_limit))
            .layer(parts.project.clone())
            .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
            .layer(parts.insertion.clone())
            .option_layer(langfuse.as_ref().map(|(layer, _)| layer.clone()))
            .map_response(|r: Response<_>| r.map(llmgate_core::body::boxed))
            .layer(ChatObserveLayer::new(metrics.clone(), catalog.clone()))
            .layer(parts.context.clone())
            .layer(parts.rate_limit.clone())
            .service(BoxCloneService::new(per_attempt)),
    );
    let catch_all = BoxStack::new(upstream_metrics.layer(upstream.clone()));

    // Every branch but `/health` and `/ready` behind the gateway's auth (which also consumes the
    // gateway's own key: it never reaches an upstream, and applies the key's projects);
    // `/metrics` and `/stats` show every project's data at once, so only keys for every project
    // see them.
    let guarded = |branch: BoxStack| -> BoxStack { BoxCloneService::new(parts.auth.layer(branch)) };
    let whole_gateway = parts.auth.clone().whole_gateway();
    let guarded_whole = |branch: BoxStack| -> BoxStack { BoxCloneService::new(whole_gateway.layer(branch)) };
    let (registry, stats) = (metrics.clone(), parts.rate_limit.stats());
    let routes = Routes {
        health: routes::answer(routes::health),
        ready: {
            let warm_up = parts.warm_up.clone();
            routes::answer(move || routes::ready(warm_up.is_ready()))
        },
        metrics: guarded_whole(routes::answer(move || routes::metrics(&registry))),
        stats: guarded_whole(routes::answer(move || routes::stats(Some(&stats)))),
        chat: guarded(chat),
        traces: routes::detail_errors(guarded(
            parts.traces.clone().unwrap_or_else(|| routes::answer(routes::traces_off)),
        )),
        rollout_logs: routes::detail_errors(guarded(BoxStack::new(
            parts.rollout_logs.clone().map_err(|never| match never {}),
        ))),
        catch_all: guarded(catch_all),
    };

    let body_panics: PanicHook = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.count_panic("body"))
    };
    let handler_panics = metrics.clone();
    GatewayService::new(
        ServiceBuilder::new()
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
            .layer(MetricsLayer::new(metrics.clone()))
            .service(routes),
    )
}

// === impl Gateway ===

impl Gateway {
    /// Builds the canonical stack for `config`.
    pub async fn from_config(config: Config) -> Result<Self, BoxError> {
        let parts = Parts::build(&config)?;
        let service = compose(&parts);
        let Parts { insertion, insertion_store, langfuse, metrics, warm_up, secrets, rate_store, .. } = parts;
        let config = Arc::new(config);
        let background = Background { insertion, langfuse: langfuse.map(|(_, exporter)| exporter), rate_store };
        Ok(Self {
            service,
            background: Arc::new(background),
            insertion_store,
            secrets_reload: SecretsReload::new(config.clone(), secrets, metrics.clone()),
            prometheus: metrics,
            config,
            warm_up,
        })
    }

    /// Starts the warm-up in the background (`GET /ready` answers 200 once it is done; see
    /// [`crate::warm_up`]). [`serve`](Self::serve) calls it; call it when hosting
    /// [`service`](Self::service) yourself.
    pub fn start_warm_up(&self) {
        self.warm_up.start();
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
}
