//! Reading an upstream error body behind a cap, and giving it back unchanged.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use llmgate_core::{BoxError, GatewayBody};

/// An error body read up to a cap.
pub(crate) struct Captured {
    /// The bytes read.
    pub(crate) bytes: Bytes,
    /// Whether `bytes` is the whole body (no cap hit, no error, no trailers left out).
    pub(crate) complete: bool,
    body: Replayed,
}

impl Captured {
    /// The body as it was: the bytes read, then whatever was not read.
    pub(crate) fn into_body(self) -> GatewayBody {
        GatewayBody::new(self.body)
    }
}

/// Reads `body` until its end or until more than `cap` bytes were read.
pub(crate) async fn read_capped(mut body: GatewayBody, cap: usize) -> Captured {
    let mut buf = BytesMut::new();
    let mut trailers = None;
    let mut error = None;
    let mut rest = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    if buf.len() > cap {
                        rest = Some(body);
                        break;
                    }
                }
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    break;
                }
            },
            Some(Err(e)) => {
                error = Some(e);
                break;
            }
        }
    }
    let bytes = buf.freeze();
    let complete = trailers.is_none() && error.is_none() && rest.is_none();
    Captured {
        bytes: bytes.clone(),
        complete,
        body: Replayed { prefix: (!bytes.is_empty()).then_some(bytes), error, trailers, rest },
    }
}

/// The bytes already read, then the error, the trailers or the rest of the body.
struct Replayed {
    prefix: Option<Bytes>,
    error: Option<BoxError>,
    trailers: Option<HeaderMap>,
    rest: Option<GatewayBody>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.error.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self.rest.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        llmgate_core::body::size_hint_after(prefix, rest)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A body yielding the given frames one by one.
    struct Frames(VecDeque<Result<Frame<Bytes>, BoxError>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.get_mut().0.pop_front())
        }
    }

    fn frames(parts: Vec<Result<Frame<Bytes>, BoxError>>) -> GatewayBody {
        GatewayBody::new(Frames(parts.into()))
    }

    async fn replay(captured: Captured) -> (Vec<Bytes>, Option<HeaderMap>, bool) {
        let mut body = captured.into_body();
        let (mut data, mut trailers, mut failed) = (Vec::new(), None, false);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(d) => data.push(d),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Err(_) => failed = true,
            }
        }
        (data, trailers, failed)
    }

    #[tokio::test]
    async fn small_body_is_complete_and_replayed() {
        let captured = read_capped(frames(vec![Ok(Frame::data("hel".into())), Ok(Frame::data("lo".into()))]), 10).await;
        assert!(captured.complete);
        assert_eq!(captured.bytes, "hello");
        let (data, trailers, failed) = replay(captured).await;
        assert_eq!(data.concat(), b"hello");
        assert!(trailers.is_none() && !failed);
    }

    #[tokio::test]
    async fn past_the_cap_the_rest_follows_unread() {
        let captured = read_capped(
            frames(vec![
                Ok(Frame::data("aaaa".into())),
                Ok(Frame::data("bbbb".into())),
                Ok(Frame::data("cccc".into())),
            ]),
            5,
        )
        .await;
        assert!(!captured.complete);
        assert_eq!(captured.bytes, "aaaabbbb");
        let (data, _, _) = replay(captured).await;
        assert_eq!(data.concat(), b"aaaabbbbcccc");
    }

    #[tokio::test]
    async fn trailers_and_errors_are_kept() {
        let mut headers = HeaderMap::new();
        headers.insert("x-t", "1".parse().unwrap());
        let captured =
            read_capped(frames(vec![Ok(Frame::data("a".into())), Ok(Frame::trailers(headers.clone()))]), 5).await;
        assert!(!captured.complete);
        let (data, trailers, _) = replay(captured).await;
        assert_eq!((data.concat(), trailers), (b"a".to_vec(), Some(headers)));

        let captured = read_capped(frames(vec![Ok(Frame::data("a".into())), Err("boom".into())]), 5).await;
        assert!(!captured.complete);
        let (data, _, failed) = replay(captured).await;
        assert_eq!(data.concat(), b"a");
        assert!(failed);
    }

    proptest::proptest! {
        /// Whatever the frames, the cap, an early end or an error: the replayed body's size hint
        /// stays consistent, and it gives back exactly what the upstream sent.
        #[test]
        fn replayed_size_hint_is_consistent(
            script in llmgate_test_support::body::scripts(200),
            cap in 0usize..220,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let captured = runtime.block_on(read_capped(llmgate_core::body::boxed(script.body()), cap));
            let played = llmgate_test_support::body::check_size_hints(captured.into_body(), &script);
            if script.ends_cleanly() {
                proptest::prop_assert_eq!(played.data, script.data());
            }
        }
    }
}
