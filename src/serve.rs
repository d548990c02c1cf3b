//! Serving: the configured engine's two halves (its upstream, innermost in every stack, and its
//! host), the separate metrics listener, and the drain and flush at shutdown.

use std::time::Duration;

use llmgate_core::{BoxError, RescueLayer};
use llmgate_hyper::{HyperUpstream, http_client};
use tokio::net::TcpListener;
use tower::{Layer, util::BoxCloneService};

use crate::{
    config::{Config, Engine},
    routes::BoxStack,
    stack::{Gateway, GatewayService},
};

/// The configured engine's upstream, trusting each upstream's `ca_file`.
pub(crate) fn upstream(config: &Config) -> Result<BoxStack, BoxError> {
    let target = config.default_target().clone();
    let timeout = config.server.request_timeout;
    let ca_files = &config.upstreams.ca_files;
    Ok(match config.server.engine {
        Engine::Hyper => {
            let mut upstream = HyperUpstream::with_client(http_client(timeout), target, timeout);
            for (name, ca) in ca_files {
                upstream = upstream.with_extra_roots(name, &ca.certificates)?;
            }
            BoxCloneService::new(upstream)
        }
        #[cfg(feature = "pingora")]
        Engine::Pingora => {
            let mut builder = llmgate_pingora::PingoraUpstream::builder(target).timeout(timeout);
            for (name, ca) in ca_files {
                builder = builder.extra_roots(name, &ca.certificates)?;
            }
            BoxCloneService::new(builder.build())
        }
        #[cfg(not(feature = "pingora"))]
        Engine::Pingora => return Err(crate::config::PINGORA_NOT_BUILT.into()),
    })
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
        Engine::Pingora => llmgate_pingora::serve_pingora(listener, service, shutdown, drain).await,
        #[cfg(not(feature = "pingora"))]
        Engine::Pingora => tracing::error!("{}", crate::config::PINGORA_NOT_BUILT),
    }
}

// === impl Gateway ===

impl Gateway {
    /// Starts the warm-up and the secrets reload (`SIGHUP`, secrets file changes), serves on
    /// `listener` until `shutdown` resolves, drains in-flight requests for up to the configured
    /// drain timeout, then flushes background work.
    pub async fn serve(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        self.start_warm_up();
        let Gateway { service, background, config, prometheus, secrets_reload, .. } = self;
        let reload = tokio::spawn(secrets_reload.watch());
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
        reload.abort();
        background.flush(config.server.drain_timeout).await;
    }
}
