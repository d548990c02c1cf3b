//! The Pingora engine of llmgate: the same two halves as the hyper engine, on pingora-core.
//!
//! - [`PingoraUpstream`]: forwards a stack's requests over pingora-core's pooled connector
//!   (HTTP/1.1, h2 by ALPN, TLS with rustls and the Mozilla roots, extra roots per upstream).
//! - [`serve_pingora`] / [`PingoraHost`]: hosts any clonable Tower service over `GatewayBody`
//!   that never fails, with the same drain semantics as the hyper host.
//!
//! It depends on `llmgate-core` only (and pingora-core with its `rustls` feature: ring, no
//! OpenSSL or BoringSSL). Building pingora-core needs `cmake` (for zlib-ng).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

mod connection;
pub mod server;
pub mod upstream;

pub use server::{PingoraHost, serve_pingora};
pub use upstream::{PingoraUpstream, PingoraUpstreamBuilder};
