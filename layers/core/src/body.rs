//! The body type used inside a stack.
//!
//! Requests and responses inside an llmgate stack carry a [`GatewayBody`]: a boxed, `Send` but not
//! `Sync` body (Pingora's client sessions are not `Sync`), the type axum and tower-http's tests
//! standardise on.

use bytes::Bytes;
use http_body::{Body, SizeHint};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::BoxError;

/// The body type inside a stack.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> GatewayBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The hint of a body that gives out `held` bytes it already holds before the rest (`rest`).
///
/// Built from scratch with saturating sums: adding to a hint's lower bound in place
/// (`SizeHint::set_lower`) panics when the rest has an exact size.
pub fn size_hint_after(held: u64, rest: SizeHint) -> SizeHint {
    let mut hint = SizeHint::new();
    if let Some(upper) = rest.upper() {
        hint.set_upper(upper.saturating_add(held));
    }
    hint.set_lower(rest.lower().saturating_add(held));
    hint
}

/// A JSON response with the given status.
pub fn json_response(status: http::StatusCode, value: &serde_json::Value) -> http::Response<GatewayBody> {
    let mut response = http::Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

/// What a host serves: a clonable Tower service over [`GatewayBody`] that never fails (errors
/// are the stack's to render, e.g. with [`RescueLayer`](crate::RescueLayer)) and whose futures
/// can move between threads. Any such service is one; the engines' `serve` functions take it.
pub trait HostedService:
    tower_service::Service<
        http::Request<GatewayBody>,
        Response = http::Response<GatewayBody>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> HostedService for S where
    S: tower_service::Service<
            http::Request<GatewayBody>,
            Response = http::Response<GatewayBody>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}
