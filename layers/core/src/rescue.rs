//! Turns errors into OpenAI-style JSON responses, and panics in response bodies into errors.
//!
//! [`RescueLayer`] sits above everything that can fail. It walks the error's source chain for a
//! [`GatewayError`] (rendered in its route's shape where a [`RouteRefusal`] carries it:
//! `{"detail": "…"}` on the traces, logs and status routes); a body that outgrew its limit becomes 413, a timer that elapsed 504, and
//! anything else a 500 whose details are logged, not shown. The stack above it is infallible.
//!
//! A panic inside a response body happens on the host's connection task, after the service
//! returned, where no layer's future can catch it: [`CatchPanicBody`] ends such a body with an
//! error instead (the client sees a broken response, as for an upstream that broke), logs the
//! panic and runs a hook (the proxy counts it).
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
    any::Any,
    convert::Infallible,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::{BoxError, GatewayBody, GatewayError, RouteRefusal};

/// Renders the error of a stack as the response the client gets.
pub fn error_response(error: &BoxError) -> Response<GatewayBody> {
    if let Some(refusal) = RouteRefusal::find(&**error) {
        return refusal.to_response();
    }
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

// === CatchPanicBody ===

/// Called once per panic a [`CatchPanicBody`] caught.
pub type PanicHook = Arc<dyn Fn() + Send + Sync>;

pin_project! {
    /// A response body whose panics (in `poll_frame`, `size_hint` or `is_end_stream`) end it with
    /// an error instead of tearing down the connection task unannounced. The panic is logged
    /// and the hook runs; the inner body is never polled again.
    ///
    /// ```
    /// use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
    /// use http_body_util::BodyExt;
    /// use llmgate_core::{body, rescue::CatchPanicBody};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let panics = Arc::new(AtomicU32::new(0));
    /// let counted = panics.clone();
    /// let exploding = body::full("x").map_frame(|_| -> http_body::Frame<bytes::Bytes> { panic!("boom") });
    /// let body = CatchPanicBody::new(exploding, Arc::new(move || { counted.fetch_add(1, Ordering::SeqCst); }));
    /// assert!(body.collect().await.is_err());
    /// assert_eq!(panics.load(Ordering::SeqCst), 1);
    /// # }
    /// ```
    pub struct CatchPanicBody<B> {
        #[pin]
        inner: B,
        hook: PanicHook,
        // Set by a panic in `size_hint`/`is_end_stream` (which take `&self`) or `poll_frame`.
        panicked: AtomicBool,
        // Whether the error frame for the panic was given out.
        reported: bool,
    }
}

impl<B> CatchPanicBody<B> {
    /// Wraps `inner`; `hook` runs once per caught panic.
    pub fn new(inner: B, hook: PanicHook) -> Self {
        Self { inner, hook, panicked: AtomicBool::new(false), reported: false }
    }

    fn caught(&self, payload: Box<dyn Any + Send>, place: &str) {
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(panic = message, "a response body panicked in {place}; the response ends with an error");
        self.panicked.store(true, Ordering::Relaxed);
        (self.hook)();
    }
}

impl<B> Body for CatchPanicBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.panicked.load(Ordering::Relaxed) {
            let this = self.project();
            if std::mem::replace(this.reported, true) {
                return Poll::Ready(None);
            }
            return Poll::Ready(Some(Err("the response body failed (a panic, logged)".into())));
        }
        let mut this = self.as_mut().project();
        match catch_unwind(AssertUnwindSafe(|| this.inner.as_mut().poll_frame(cx))) {
            Ok(polled) => polled.map(|frame| frame.map(|r| r.map_err(Into::into))),
            Err(payload) => {
                self.caught(payload, "poll_frame");
                self.poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.panicked.load(Ordering::Relaxed) {
            return self.reported;
        }
        match catch_unwind(AssertUnwindSafe(|| self.inner.is_end_stream())) {
            Ok(end) => end,
            Err(payload) => {
                self.caught(payload, "is_end_stream");
                false
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.panicked.load(Ordering::Relaxed) {
            return SizeHint::new();
        }
        match catch_unwind(AssertUnwindSafe(|| self.inner.size_hint())) {
            Ok(hint) => hint,
            Err(payload) => {
                self.caught(payload, "size_hint");
                SizeHint::new()
            }
        }
    }
}
