//! The response future of layers that may refuse a request without I/O: the inner service's
//! future, or the refusal, without boxing.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use crate::{BoxError, GatewayError};
use pin_project_lite::pin_project;

pin_project! {
    /// Response future of a layer that may refuse a request before calling its inner service.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Future { #[pin] future: F },
        Refused { error: Option<BoxError> },
    }
}

// === impl ResponseFuture ===

impl<F> ResponseFuture<F> {
    /// Waits for the inner service's `future`.
    pub fn future(future: F) -> Self {
        Self { kind: Kind::Future { future } }
    }

    /// Fails with `error` (a [`GatewayError`], or one wrapping it) without calling the inner
    /// service.
    pub fn refused(error: impl Into<BoxError>) -> Self {
        Self { kind: Kind::Refused { error: Some(error.into()) } }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Future { future } => future.poll(cx).map_err(Into::into),
            KindProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| GatewayError::Internal("response future polled after completion".into()).into()))),
        }
    }
}
