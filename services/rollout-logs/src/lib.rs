//! Rollout logs and status for Eval Protocol's remote rollouts: `/logs` and `/status`.
//!
//! A remote rollout server reports its progress and its end through eval-protocol's
//! `FireworksTracingHttpHandler`, which `POST`s each log record to `{gateway}/logs`; the
//! `RemoteRolloutProcessor` polls `GET {gateway}/v1/status?rollout_id=…` until the status is no
//! longer RUNNING (101), then reads `GET {gateway}/logs?tags=rollout_id:…` once for the
//! status's message, details and extras. [`RolloutLogService`] serves those three requests
//! (under `[/v1][/project_id/{p}]`, told apart by the [`RouteMeta`] of the path-metadata
//! layer) over a [`LogStore`]:
//!
//! - `POST /logs` checks the body ([`entry::parse`]: a `rollout_id:` tag, field types, the
//!   entry bound), stores it under each of its `rollout_id:` tags (a groupwise record is seen
//!   under every one) and answers 200 only once it is stored; bad input is a 400, a body past
//!   the limit a 413, a store failure a 503, each `{"detail": "…"}`.
//! - `GET /status?rollout_id=R` answers `{"rollout_id", "status", "extras"}` of the newest
//!   status-bearing entry (`null`s before one). Status codes are kept as sent.
//! - `GET /logs?tags=…&limit=&hours_back=&program=` answers `{"entries": […], "evicted": n}`:
//!   the entries holding every tag, newest first, at most `limit` (100 by default).
//!
//! Each rollout keeps at most `max_entries` entries (the oldest go, `evicted` counts them), but
//! never loses its newest status. Logs live in the scope of their project: the path's
//! `project_id`, else the [default scope](RolloutLogService::default_scope).
//!
//! Stores: [`MemoryLogStore`] (in process) and [`RedisLogStore`] (single node or Redis
//! Cluster, shared by replicas; one Lua script per append).
//!
//! **Requires:** `RouteMeta` (without it every request is a 404). **Provides:** nothing to
//! other layers; it answers requests.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use http::Request;
//! use http_body_util::BodyExt;
//! use llmgate_core::{body, ext::{RouteKind, RouteMeta}};
//! use llmgate_rollout_logs::{MemoryLogStore, RolloutLogService};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let service = RolloutLogService::new(Arc::new(MemoryLogStore::new()));
//! let route = |kind| RouteMeta { kind, project: None, rollout: None, encoded_base_url: None };
//!
//! let mut log = Request::post("/logs").body(body::full(
//!     r#"{"program": "eval_protocol", "message": "done", "tags": ["rollout_id:r1"],
//!         "status": {"code": 100, "message": "Rollout finished", "details": []}, "extras": {"score": 1}}"#,
//! )).unwrap();
//! log.extensions_mut().insert(route(RouteKind::Logs));
//! assert_eq!(service.clone().oneshot(log).await.unwrap().status(), 200);
//!
//! let mut poll = Request::get("/status?rollout_id=r1").body(body::empty()).unwrap();
//! poll.extensions_mut().insert(route(RouteKind::Status));
//! let answer = service.oneshot(poll).await.unwrap().into_body().collect().await.unwrap().to_bytes();
//! let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
//! assert_eq!(answer["status"]["code"], 100);
//! assert_eq!(answer["extras"]["score"], 1);
//! # }
//! ```
//!
//! [`RouteMeta`]: llmgate_core::ext::RouteMeta

#![deny(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

pub mod entry;
pub mod query;
mod redis_store;
mod service;
pub mod store;

pub use redis_store::{DEFAULT_PREFIX, RedisLogStore};
pub use service::{Counters, DEFAULT_BODY_LIMIT, DEFAULT_MAX_ENTRY_BYTES, PollOutcome, RolloutLogService};
pub use store::{DEFAULT_MAX_ENTRIES, DEFAULT_TTL, LogStore, MemoryLogStore, RolloutKey, RolloutLog};
