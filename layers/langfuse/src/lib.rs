//! Langfuse emission over OpenTelemetry (OTLP/HTTP), and the Langfuse read back ends.
//!
//! **Writing.** [`LangfuseLayer`] (outside the routing layers) records each request as one
//! Langfuse trace whose id is the request's insertion id (or a fresh UUIDv7): a root span with
//! the bounded request and response bodies, and one zero-length `event` span per fallback
//! decision the routing layers report through the `FallbackEvents` extension it installs.
//! [`LangfuseAttemptLayer`] (per attempt, inside the routing layers) adds one `generation` per
//! upstream response, with model, parameters, usage, cost, `is_primary`, latency and
//! completion start time. Every span carries the trace-level attributes (name, tags as a string
//! array, rollout metadata, user, session, environment/release/version). The request path only
//! keeps what the spans need (bounded body heads as bytes, a few small strings) and hands a
//! request's record to a [`LangfuseExporter`] in one non-blocking push when the root finishes;
//! the background task builds the spans, batches them per project, gzips and POSTs them to
//! `{host}/api/public/otel/v1/traces`. **A full queue drops its oldest spans** and counts them;
//! Langfuse being slow, failing or unreachable never delays a response. See [`exporter`] for
//! the retry rules.
//!
//! **Reading.** [`LangfuseReader`] with [`V3Reader`] (`/api/public/traces`) and [`V4Reader`]
//! (`/api/public/v2/observations`), both returning [`Trace`]s.
//!
//! **Modules.** Writing flows one way: `layer` (the two layers) → `trace` (a request's trace,
//! handed over as one record) → `record` (a root span's or a generation's record) → `span`
//! (the hand-made OTLP span encoder) → [`exporter`] (queue, per-project batches, gzip,
//! retries). No module imports one that imports it back: the exporter takes anything that
//! writes spans and knows nothing of traces or records. [`reader`] (the read back ends),
//! [`timestamp`], `io` (bounded input and output), `settings` and `client` (the pooled HTTP
//! client) sit beside them.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response};
//! use http_body_util::BodyExt;
//! use llmgate_core::{body, ext::{LangfuseKeys, Project, Secret}, GatewayBody};
//! use llmgate_langfuse::{ExporterConfig, LangfuseAttemptLayer, LangfuseClient, LangfuseExporter, LangfuseLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let exporter = LangfuseExporter::spawn(ExporterConfig::new("http://127.0.0.1:1"), LangfuseClient::http());
//! let svc = ServiceBuilder::new()
//!     .layer(LangfuseLayer::new(exporter.clone()).trace_name("chat-completion"))
//!     .layer(LangfuseAttemptLayer::new())
//!     .service(service_fn(|_req: Request<GatewayBody>| async move {
//!         let mut response = Response::new(body::full(r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#));
//!         response.headers_mut().insert("content-type", "application/json".parse().unwrap());
//!         Ok::<_, llmgate_core::BoxError>(response)
//!     }));
//!
//! let mut req = Request::new(body::full("{}"));
//! req.extensions_mut().insert(Project {
//!     id: Arc::from("p1"),
//!     langfuse: LangfuseKeys { public_key: Arc::from("pk-lf-1"), secret_key: Secret::new("sk-lf-1") },
//! });
//! let response = svc.oneshot(req).await.unwrap();
//! response.into_body().collect().await.unwrap();
//! // The root span and the generation are queued, not sent: the response never waits.
//! assert_eq!(exporter.snapshot().queue_depth, 2);
//! # }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

mod client;
pub mod exporter;
mod io;
mod layer;
pub mod reader;
mod record;
mod settings;
mod span;
pub mod timestamp;
mod trace;

pub use client::{BoxFuture, LangfuseClient, SendRequest};
pub use exporter::{
    Counters, CountersSnapshot, DEFAULT_MAX_CONCURRENT_EXPORTS, DEFAULT_MAX_QUEUE_SPANS, ExporterConfig,
    LangfuseExporter,
};
pub use layer::{
    AttemptFuture, LangfuseAttemptLayer, LangfuseAttemptService, LangfuseLayer, LangfuseService, RootFuture,
};
pub use reader::{LangfuseReader, Observation, ReadError, Trace, TraceQuery, V3Reader, V4Reader};
pub use settings::{DEFAULT_CAPTURE_LIMIT, Emit};
pub use trace::TraceContext;
