//! Turns errors into OpenAI-style JSON responses.
//!
//! [`RescueLayer`] sits above everything that can fail. It walks the error's source chain for a
//! [`GatewayError`]; a body that outgrew its limit becomes 413, a timer that elapsed 504, and
//! anything else a 500 whose details are logged, not shown. The stack above it is infallible.
//!
//! ```
//! use http::{Request, StatusCode};
//! use llmgate_core::{body, GatewayError, RescueLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new().layer(RescueLayer::new()).service(service_fn(
//!     |_req: Request<llmgate_core::GatewayBody>| async {
//!         Err::<http::Response<llmgate_core::GatewayBody>, _>(GatewayError::NotFound("no such project".into()))
//!     },
//! ));
//! let response = svc.oneshot(Request::new(body::empty())).await.unwrap();
//! assert_eq!(response.status(), StatusCode::NOT_FOUND);
//! # }
//! ```

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{BoxError, GatewayBody, GatewayError};

/// Renders the error of a stack as the response the client gets.
pub fn error_response(error: &BoxError) -> Response<GatewayBody> {
    if let Some(cause) = GatewayError::find(&**error) {
        return cause.to_response();
    }
    if caused_by::<http_body_util::LengthLimitError>(error) {
        return GatewayError::PayloadTooLarge { limit: None }.to_response();
    }
    if caused_by::<tokio::time::error::Elapsed>(error) {
        return GatewayError::UpstreamTimeout(None).to_response();
    }
    tracing::error!(error = %error, "unhandled error in the stack");
    GatewayError::Internal("Internal error".into()).to_response()
}

/// Whether `error` or one of its sources is a `T`.
pub fn caused_by<T: std::error::Error + 'static>(error: &BoxError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
    while let Some(err) = cause {
        if err.is::<T>() {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Layer that applies [`Rescue`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer {
    _priv: (),
}

impl RescueLayer {
    /// A new rescue layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rescue { inner, not_ready: None }
    }
}

/// Service that turns its inner service's errors into JSON error responses.
#[derive(Debug)]
pub struct Rescue<S> {
    inner: S,
    /// A readiness error of `inner`, answered on the next call instead of calling `inner`.
    not_ready: Option<BoxError>,
}

// === impl Rescue ===

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), not_ready: None }
    }
}

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => {
                self.not_ready = Some(error.into());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.not_ready.take() {
            Some(error) => RescueFuture::Failed { response: Some(error_response(&error)) },
            None => RescueFuture::Inner { inner: self.inner.call(req) },
        }
    }
}

pin_project! {
    /// Response future of [`Rescue`].
    #[project = RescueProj]
    #[allow(missing_docs)]
    pub enum RescueFuture<F> {
        /// Waiting for the inner service.
        Inner {
            #[pin]
            inner: F,
        },
        /// The inner service was not ready; its error is already rendered.
        Failed {
            response: Option<Response<GatewayBody>>,
        },
    }
}

impl<F, E> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<GatewayBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<GatewayBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RescueProj::Inner { inner } => match inner.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(response)) => Poll::Ready(Ok(response)),
                Poll::Ready(Err(error)) => Poll::Ready(Ok(error_response(&error.into()))),
            },
            RescueProj::Failed { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("RescueFuture polled after completion"),
            },
        }
    }
}
