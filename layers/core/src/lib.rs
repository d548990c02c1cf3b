//! The shared vocabulary of llmgate's layers.
//!
//! Every llmgate layer depends on this crate and on no other layer crate. Layers talk to each
//! other only through the typed request and response extensions defined in [`ext`], so a stack
//! of any subset of layers, in any sensible order, still compiles and behaves.
//!
//! What lives here:
//!
//! - [`ext`]: the extension types (route metadata, the parsed chat request, the chosen model,
//!   the upstream target, the insertion id, fallback events, …);
//! - [`body`]: the body type used inside a stack, [`GatewayBody`];
//! - [`error`]: the one error type, [`GatewayError`], and its OpenAI-style JSON rendering;
//! - [`rescue`]: the layer that turns errors into JSON responses;
//! - [`json`]: read the request body once behind a limit, parse it once ([`DecodeJsonLayer`]),
//!   and write it back once per upstream attempt ([`EncodeJsonLayer`]);
//! - [`usage`]: the SSE-aware pass-through response body that reports usage exactly once;
//! - [`catalog`]: the model catalogue shared by the routing layers and the cost calculation;
//! - [`forward`]: URL joining and header hygiene for the upstream engines;
//! - [`losses`]: the Langfuse spans lost per rollout, shared by the exporter and `/traces`.
//!
//! # Example
//!
//! A decode → encode round trip around a service that echoes the body it receives:
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::BodyExt;
//! use llmgate_core::{body, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, RescueLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(RescueLayer::new())
//!     .layer(DecodeJsonLayer::new().limit(1024))
//!     .layer(EncodeJsonLayer::new())
//!     .service(service_fn(|req: Request<GatewayBody>| async move {
//!         Ok::<_, llmgate_core::BoxError>(Response::new(req.into_body()))
//!     }));
//!
//! let ok = svc.clone().oneshot(Request::new(body::full(r#"{"model":"m"}"#))).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! let bytes = ok.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(bytes, Bytes::from_static(br#"{"model":"m"}"#));
//!
//! let bad = svc.oneshot(Request::new(body::full("[1]"))).await.unwrap();
//! assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
//! # }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod body;
pub mod catalog;
pub mod error;
pub mod ext;
pub mod forward;
pub mod future;
pub mod json;
pub mod losses;
pub mod rescue;
pub mod usage;

pub use body::GatewayBody;
pub use error::{BoxError, GatewayError, RouteRefusal};
pub use json::{DecodeJsonLayer, EncodeJsonLayer};
pub use rescue::RescueLayer;
