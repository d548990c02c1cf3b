//! Rate-limit fallback: per-model rpm/tpm/rpd budgets, short waits, fallback chains, cooldowns
//! after upstream 429s.
//!
//! [`RateLimitFallbackLayer`] sits below context routing and above everything that depends on
//! the chosen model (target resolution, upstream auth, `EncodeJson`, the upstream). Per chat
//! request (one with an [`LlmRequest`](llmgate_core::ext::LlmRequest)):
//!
//! 0. **The account's own budget**: when the request's
//!    [`AccountInfo`](llmgate_core::ext::AccountInfo) has `limits` (a gateway key's), one
//!    [`RateStore::check`] of the bucket `@account/{name}` with the estimate, in the same store
//!    (so shared by the replicas, with the same leases), before any model: refused → wait when
//!    it fits in `max_wait`, else `GatewayError::AccountRateLimited` (429 with `Retry-After`; no
//!    other model is tried, the limit holds over all of them). Its tpm is corrected like a
//!    model's once the usage is known.
//! 1. **Candidates**: the current model (`ModelChoice.current` when context routing set one,
//!    else the body's `model`), then its catalogue `fallbacks` in order, skipping models whose
//!    context window is smaller than the request's `TokenEstimate`. A model the catalogue does
//!    not know gets one untouched attempt. Only the `fallbacks` chain ever moves a request: a
//!    catalogue entry without one (the reference proxy's built-in entries have none) keeps every
//!    request on its model.
//! 2. **Per candidate**: one [`RateStore::check_with`] (rpm, tpm with the estimate, rpd and the
//!    cooldowns that concern this client, checked and consumed together). Refused → wait when
//!    the wait fits in `max_wait` (default 0, so never), else the next candidate.
//! 3. **Send**: the original request parts with `ModelChoice { requested, current, attempt }`
//!    and the body edit `model` = candidate, body re-sent from the buffered bytes.
//! 4. **Upstream 429**: the wait comes from `Retry-After` (seconds or HTTP date), or the
//!    provider's `x-ratelimit-reset-*` headers; the error body (64 KiB at most) decides whether
//!    it is a quota exhaustion (cool down until the daily reset, reason `upstream_quota`) or not
//!    (cool down for the wait, `upstream_429`). **Whose cooldown** follows the response's
//!    [`CredentialScope`](llmgate_core::ext::CredentialScope): `Gateway` (or none: a stack
//!    without the credentials layer) cools the model down for every request, across replicas
//!    sharing the store; `Client(id)` (the client's own key, or its `encoded_base_url`) cools
//!    down only that model for that digest. Then the same wait-or-next decision.
//! 5. Any other response goes back as is, with [`ServedBy`](llmgate_core::ext::ServedBy); when
//!    the model has a tpm limit the real usage corrects the estimate once the body ends.
//!    Fallback therefore only ever happens before the client saw a byte.
//! 6. Every switch records `FallbackEvent::RateLimit { original_model, fallback_model, reason }`
//!    (`rpm`, `tpm`, `rpd`, `upstream_429`, `upstream_quota`, `cooldown`). An exhausted chain is
//!    the provider's own 429 (status, headers, the first 64 KiB of its body) when one was earned
//!    with the client's own credentials or endpoint during this request; otherwise
//!    `GatewayError::RateLimited { retry_after, tried }` (429 with `Retry-After`).
//!
//! **Which cooldowns a request consults** comes from the request's
//! [`ClientScope`](llmgate_core::ext::ClientScope) (written by the credentials layer): none →
//! the model's shared cooldown ([`Cooldowns::Shared`]); the client's own key →
//! the shared one and its own ([`Cooldowns::SharedAndScope`]: whether its key or the server-side
//! key goes upstream depends on the model's upstream, and both cooldowns are only ever earned
//! that way); a client-chosen endpoint → only its own ([`Cooldowns::Scope`]: the gateway's
//! credentials never go there). rpm/tpm/rpd are the operator's limits for the model and apply
//! to every request.
//!
//! Budgets live in a [`RateStore`]: [`MemoryRateStore`] in-process, [`RedisRateStore`] shared by
//! every replica (one Lua script per attempt, exact; `fail_open`/`fail_closed` outages), or
//! [`LeasedRateStore`] over a `RedisRateStore` (each replica spends leases of a slice of the
//! budget locally: most checks make no round trip; over-admission across N replicas at most N
//! slices per window, see its docs).
//!
//! # Wiring with Redis
//!
//! ```text
//! let conn = redis::Client::open(url)?.get_connection_manager_lazy(
//!     ConnectionManagerConfig::new()
//!         .set_connection_timeout(Some(500ms)).set_response_timeout(Some(500ms)))?;
//! // or: redis::cluster::ClusterClient::new(nodes)?.get_async_connection().await?
//! let store = RedisRateStore::new(conn).policy(OutagePolicy::FailOpen).replicas(n);
//! let store = LeasedRateStore::new(store).slice(0.05); // or keep the exact `store`
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
mod lease;
mod memory;
mod redis;
mod stats;
pub mod store;

pub use layer::{ERROR_BODY_LIMIT, RateLimitFallback, RateLimitFallbackLayer};
pub use lease::{DEFAULT_COOLDOWN_REFRESH, DEFAULT_LEASE_SLICE, LeasedRateStore};
pub use memory::MemoryRateStore;
pub use redis::{OutagePolicy, RedisRateStore};
pub use stats::Stats;
pub use store::{Clock, Cooldowns, Decision, LimitKind, RateStore, StoreHealth, TokioClock};
