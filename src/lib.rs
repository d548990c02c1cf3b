//! llmgate: an LLM gateway built from composable Tower layers, and its reference proxy.
//!
//! The layers live in their own crates (`llmgate-*`) and speak only through the typed
//! extensions of [`llmgate_core`]; the engines (`llmgate-hyper`, `llmgate-pingora`) forward to
//! the providers and host a stack. This crate composes them: each [`config`] section builds its
//! component, [`stack`] composes the canonical stack in one function, [`serve`] runs it on the
//! configured engine, [`routes`] classifies and dispatches the proxy's routes, [`warm_up`] loads
//! what requests would otherwise wait for, [`reload`] swaps rotated secrets in, and
//! [`mock_upstream`] is the OpenAI-compatible fake the tests and benchmarks use.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod metrics;
pub mod mock_upstream;
pub mod observe;
pub mod redis;
pub mod reload;
pub mod report;
pub mod routes;
pub mod serve;
pub mod stack;
pub mod target;
pub mod warm_up;

pub use llmgate_core as core;
pub use stack::Gateway;
