//! Rate-limit fallback: per-model rpm/tpm/rpd budgets, short waits, fallback chains, cooldowns
//! after upstream 429s.
//!
//! [`RateLimitFallbackLayer`] sits below context routing and above everything that depends on
//! the chosen model (target resolution, upstream auth, `EncodeJson`, the upstream). Per chat
//! request (one with an [`LlmRequest`](llmgate_core::ext::LlmRequest)):
//!
//! 1. **Candidates**: the current model (`ModelChoice.current` when context routing set one,
//!    else the body's `model`), then its catalogue `fallbacks` in order, skipping models whose
//!    context window is smaller than the request's `TokenEstimate`. A model the catalogue does
//!    not know gets one untouched attempt.
//! 2. **Per candidate**: one [`RateStore::check`] (rpm, tpm with the estimate, rpd and the
//!    model's cooldown, checked and consumed together). Refused → wait when the wait fits in
//!    `max_wait` (default 0, so never), else the next candidate.
//! 3. **Send**: the original request parts with `ModelChoice { requested, current, attempt }`
//!    and the body edit `model` = candidate, body re-sent from the buffered bytes.
//! 4. **Upstream 429**: the wait comes from `Retry-After` (seconds or HTTP date), or the
//!    provider's `x-ratelimit-reset-*` headers; the error body (64 KiB at most) decides whether
//!    it is a quota exhaustion (cool down until the daily reset, reason `upstream_quota`) or not
//!    (cool down for the wait, `upstream_429`). The cooldown applies to every request. Then the
//!    same wait-or-next decision.
//! 5. Any other response goes back as is, with [`ServedBy`](llmgate_core::ext::ServedBy); when
//!    the model has a tpm limit the real usage corrects the estimate once the body ends.
//!    Fallback therefore only ever happens before the client saw a byte.
//! 6. Every switch records `FallbackEvent::RateLimit { original_model, fallback_model, reason }`
//!    (`rpm`, `tpm`, `rpd`, `upstream_429`, `upstream_quota`, `cooldown`). An exhausted chain is
//!    `GatewayError::RateLimited { retry_after, tried }` (429 with `Retry-After`).
//!
//! Budgets live in a [`RateStore`]: [`MemoryRateStore`] in-process, or [`RedisRateStore`]
//! shared by every replica (one Lua script per attempt; `fail_open`/`fail_closed` outages).
//!
//! # Wiring with Redis
//!
//! ```text
//! let conn = redis::Client::open(url)?.get_connection_manager_lazy(
//!     ConnectionManagerConfig::new()
//!         .set_connection_timeout(Some(500ms)).set_response_timeout(Some(500ms)))?;
//! // or: redis::cluster::ClusterClient::new(nodes)?.get_async_connection().await?
//! let store = RedisRateStore::new(conn).policy(OutagePolicy::FailOpen).replicas(n);
//! let layer = RateLimitFallbackLayer::new(catalog, Arc::new(store)).max_wait(max_wait_seconds);
//! ```
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response};
//! use llmgate_core::{body, catalog::{Catalog, Limits, ModelSpec}, ext::ModelChoice, DecodeJsonLayer};
//! use llmgate_rate_limit_fallback::{MemoryRateStore, RateLimitFallbackLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let catalog = Catalog::new([
//!     ModelSpec {
//!         name: "big".into(),
//!         limits: Limits { rpm: Some(1), tpm: None, rpd: None },
//!         fallbacks: vec!["small".into()],
//!         ..Default::default()
//!     },
//!     ModelSpec { name: "small".into(), ..Default::default() },
//! ]);
//! let layer = RateLimitFallbackLayer::new(Arc::new(catalog), Arc::new(MemoryRateStore::new()));
//! let stats = layer.stats();
//! let svc = ServiceBuilder::new()
//!     .layer(DecodeJsonLayer::new())
//!     .layer(layer)
//!     .service(service_fn(|req: Request<llmgate_core::GatewayBody>| async move {
//!         // The upstream side sees which model this attempt is for.
//!         let model = req.extensions().get::<ModelChoice>().unwrap().current.to_string();
//!         Ok::<_, llmgate_core::BoxError>(Response::new(body::full(model)))
//!     }));
//!
//! let ask = || Request::new(body::full(r#"{"model":"big","messages":[]}"#));
//! let first = svc.clone().oneshot(ask()).await.unwrap();
//! assert_eq!(first.extensions().get::<llmgate_core::ext::ServedBy>().unwrap().model.as_ref(), "big");
//! // rpm 1 is used up: the second request falls back to "small".
//! let second = svc.oneshot(ask()).await.unwrap();
//! assert_eq!(second.extensions().get::<llmgate_core::ext::ServedBy>().unwrap().model.as_ref(), "small");
//! assert_eq!(stats.snapshot()["fallback_requests"], 1);
//! # }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

pub mod classify;
mod layer;
mod memory;
mod redis;
mod stats;
pub mod store;

pub use layer::{ERROR_BODY_LIMIT, RateLimitFallback, RateLimitFallbackLayer};
pub use memory::MemoryRateStore;
pub use redis::{OutagePolicy, RedisRateStore};
pub use stats::Stats;
pub use store::{Clock, Decision, LimitKind, RateStore, StoreHealth, TokioClock};
