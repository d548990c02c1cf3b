//! Context-length routing: send a chat request to a model whose context window fits it.
//!
//! [`ContextRoutingLayer`] estimates the request's tokens ([`estimate`]: input plus requested
//! output, with the model family's tokenizer, and a fast path that skips tokenizing when the
//! byte count alone proves the request fits) and compares them with the requested model's
//! `context_window` from the [`Catalog`](llmgate_core::catalog::Catalog).
//!
//! - **Fits** → sent unchanged, with a [`TokenEstimate`](llmgate_core::ext::TokenEstimate).
//! - **Too large** → the first model of the requested model's `fallbacks` chain whose window
//!   fits. The layer writes [`ModelChoice`](llmgate_core::ext::ModelChoice)
//!   `{requested, current, attempt: 1}`, the `model` body edit (scope `Always`), and records
//!   `context_length_fallback` on the request's
//!   [`FallbackEvents`](llmgate_core::ext::FallbackEvents) sink, if there is one. Only the chain
//!   is considered: a request never goes to a model nobody configured as its fallback (earlier
//!   versions fell back to the catalogue model with the smallest window that fits).
//! - **Too large, no `fallbacks` configured** → sent unchanged (with its
//!   [`TokenEstimate`](llmgate_core::ext::TokenEstimate)): there is no routing decision to make,
//!   and the provider, which knows its real window, answers (its own `context_length_exceeded`
//!   if the prompt really is too long; an estimate can be high, e.g. the bytes rule for other
//!   providers' models). Counted as `unrouted`.
//! - **Too large for the model and its whole chain** → `GatewayError::ContextLengthExceeded`
//!   (400, `context_length_exceeded`, naming the estimate, the largest window of the model and
//!   its chain, and the model); nothing is sent.
//! - **Reactive**: an upstream 400 recognised by [`detect`] as a context-length error (its body
//!   read up to 64 KiB) is re-sent **once** to a model of the failed model's `fallbacks` chain
//!   with a larger window than the one that failed, with the event recorded. Otherwise (no
//!   such model) the 400 is passed on byte for byte.
//! - A model the catalogue does not know, or whose window is unknown, passes through untouched.
//!
//! Each candidate is judged by its own tokenizer's estimate (each family tokenized at most once
//! per request); the [`TokenEstimate`](llmgate_core::ext::TokenEstimate) written is the one of
//! the model the request goes to, and the event's `estimated_tokens` is the estimate of the model
//! that did not fit. A request is tokenized only when its byte bound passes the window; texts
//! over 64 KiB are then counted on a sample unless that lands near the window (see
//! [`estimate`]). Tokenizing more than 64 KiB of text, or loading a tokenizer (a few hundred ms; ~4 MB
//! each once loaded, on first need unless [`ContextRoutingLayer::warm_up`] or [`warm_up`] ran), happens on
//! tokio's blocking pool; a request that fits by its byte bound never loads one.
//!
//! **Requires** `LlmRequest` (else untouched). **Reads** `FallbackEvents`, `BodyEdits`, response
//! `ServedBy`. **Provides** `TokenEstimate`, `ModelChoice`, `BodyEdits` (`model`).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response, StatusCode};
//! use llmgate_context_routing::ContextRoutingLayer;
//! use llmgate_core::{body, catalog::{Catalog, ModelSpec}, ext::{ModelChoice, TokenEstimate},
//!     BoxError, DecodeJsonLayer, GatewayBody, GatewayError};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let model = |name: &str, window: u64, fallbacks: &[&str]| ModelSpec {
//!     name: name.into(),
//!     context_window: Some(window),
//!     fallbacks: fallbacks.iter().map(|f| f.to_string()).collect(),
//!     ..ModelSpec::default()
//! };
//! let catalog = Catalog::new([model("small", 50, &["big"]), model("big", 1_000, &[])]);
//! let svc = ServiceBuilder::new()
//!     .layer(DecodeJsonLayer::new())
//!     .layer(ContextRoutingLayer::new(Arc::new(catalog)))
//!     .service(service_fn(|req: Request<GatewayBody>| async move {
//!         let chosen = req.extensions().get::<ModelChoice>().map(|c| c.current.to_string());
//!         assert!(req.extensions().get::<TokenEstimate>().is_some());
//!         Ok::<_, BoxError>(Response::new(body::full(chosen.unwrap_or_default())))
//!     }));
//!
//! let chat = |text: &str| Request::new(body::full(serde_json::json!({
//!     "model": "small", "messages": [{"role": "user", "content": text}],
//! }).to_string()));
//! // Fits: untouched (no ModelChoice written).
//! let response = svc.clone().oneshot(chat("hi")).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! // Too large for `small` (50 tokens): routed to `big`.
//! let long = "lorem ipsum ".repeat(30);
//! let response = svc.clone().oneshot(chat(&long)).await.unwrap();
//! use http_body_util::BodyExt;
//! assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "big");
//! // Too large for every model: refused, nothing sent.
//! let err = svc.oneshot(chat(&"lorem ipsum ".repeat(2_000))).await.unwrap_err();
//! assert!(matches!(GatewayError::find(&*err), Some(GatewayError::ContextLengthExceeded { .. })));
//! # }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

mod body;
mod bpe;
pub mod detect;
pub mod estimate;
mod layer;
mod route;

use std::sync::LazyLock;

use llmgate_core::catalog::ModelSpec;

pub use layer::{
    ContextRouting, ContextRoutingLayer, ContextRoutingStats, DEFAULT_OFFLOAD_THRESHOLD, ERROR_BODY_LIMIT,
    ResponseFuture, StatsSnapshot,
};

/// The default catalogue file, as shipped.
pub const DEFAULT_MODELS_YAML: &str = include_str!("../default_models.yaml");

static DEFAULT_MODELS: LazyLock<Vec<ModelSpec>> = LazyLock::new(|| match serde_saphyr::from_str(DEFAULT_MODELS_YAML) {
    Ok(models) => models,
    Err(error) => {
        // A test parses the shipped file, so this cannot happen in a released build.
        tracing::error!(%error, "the default model catalogue does not parse; using none");
        Vec::new()
    }
});

/// The default catalogue: OpenAI's gpt-4o, gpt-4o-mini, gpt-4.1, gpt-4.1-mini, o1, o1-mini and
/// gpt-3.5-turbo by their API names, and `gemini/gemini-2.5-pro`, `-2.5-flash`, `-2.5-flash-lite`
/// and `gemini/gemini-1.5-flash`, with published windows, output caps and prices (see
/// `default_models.yaml` for the sources). Facts only: **no fallback chains and no limits**, so
/// that a built-in entry informs context checks and costs but never moves or refuses a request
/// by itself; chains and limits are the operator's to configure.
///
/// A config extends or overrides it: `Catalog::new(default_catalog().into_iter().chain(config))`
/// (a later entry of the same name replaces the earlier one).
pub fn default_catalog() -> Vec<ModelSpec> {
    DEFAULT_MODELS.clone()
}

/// Loads the tokenizers now; see [`estimate::warm_up`].
pub fn warm_up() {
    estimate::warm_up();
}

#[cfg(test)]
mod tests;
