//! The hyper engine of llmgate: the two halves a stack needs to run on hyper.
//!
//! - [`HyperUpstream`]: the innermost service of a stack. It forwards each request to the
//!   [`UpstreamTarget`](llmgate_core::ext::UpstreamTarget) in its extensions (or its default
//!   one) over a pooled `hyper-util` client (HTTP/1.1 and h2, TLS with rustls and the webpki
//!   roots plus any extra roots of the upstream, `TCP_NODELAY`), and streams both bodies.
//! - [`serve`]: hosts any clonable `tower::Service<Request<GatewayBody>, Response =
//!   Response<GatewayBody>, Error = Infallible>` on a listener (HTTP/1.1 and h2c), the way
//!   `axum::serve` hosts a router, with a graceful drain on shutdown; [`bind`] makes the
//!   listener (`SO_REUSEADDR`, a deep backlog).
//!
//! It depends on `llmgate-core` only, so an embedder gets the engine without the reference
//! proxy's CLI, config, metrics or mock.
//!
//! ```no_run
//! use std::time::Duration;
//! use llmgate_core::{DecodeJsonLayer, EncodeJsonLayer, RescueLayer, ext::{UpstreamMode, UpstreamTarget}};
//! use llmgate_hyper::{HyperUpstream, bind, serve};
//! use tower::ServiceBuilder;
//!
//! # async fn run() -> Result<(), llmgate_core::BoxError> {
//! let target = UpstreamTarget {
//!     name: "openai".into(),
//!     base_url: "https://api.openai.com/v1".into(),
//!     mode: UpstreamMode::OpenAi,
//!     api_key: None,
//! };
//! let stack = ServiceBuilder::new()
//!     .layer(RescueLayer::new())
//!     .layer(DecodeJsonLayer::new().limit(1 << 20))
//!     .layer(EncodeJsonLayer::new())
//!     .service(HyperUpstream::new(target, Duration::from_secs(300)));
//! let listener = bind("127.0.0.1:4000".parse()?).await?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! serve(listener, stack, shutdown, Duration::from_secs(30)).await;
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod server;
pub mod upstream;

pub use server::{bind, serve};
pub use upstream::{HttpClient, HyperUpstream, http_client, http_client_trusting};
