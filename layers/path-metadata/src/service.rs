//! The layer and its service.

use std::task::{Context, Poll};

use http::Request;
use llmgate_core::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use llmgate_core::future::ResponseFuture;

use crate::route::apply_route;

// === PathMetadataLayer ===

/// Layer that applies [`PathMetadata`]. It has no configuration: the route table is fixed.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathMetadataLayer {
    _priv: (),
}

impl PathMetadataLayer {
    /// A new layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for PathMetadataLayer {
    type Service = PathMetadata<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PathMetadata::new(inner)
    }
}

// === PathMetadata ===

/// Classifies the request path with the route table, inserts
/// [`RouteMeta`](llmgate_core::ext::RouteMeta) and rewrites chat routes to `/chat/completions`.
/// See the [crate docs](crate) for the rules.
#[derive(Clone, Debug)]
pub struct PathMetadata<S> {
    inner: S,
}

impl<S> PathMetadata<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }

    /// A [`PathMetadataLayer`].
    pub const fn layer() -> PathMetadataLayer {
        PathMetadataLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for PathMetadata<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match apply_route(&mut req) {
            Ok(()) => ResponseFuture::future(self.inner.call(req)),
            Err(error) => ResponseFuture::refused(error),
        }
    }
}
