//! Property tests of the response bodies this crate defines: whatever the frame split, early
//! end or error, their `size_hint` stays consistent and they pass every byte on; a panic inside
//! a body ends it with an error and is reported once.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use llmgate_core::{body, rescue::CatchPanicBody, usage};
use llmgate_test_support::body::{Script, Scripted, check_size_hints, scripts};
use proptest::prelude::*;

const CONTENT_TYPES: [&str; 3] = ["application/json", "text/event-stream", "text/plain"];

fn counter() -> (Arc<AtomicU32>, llmgate_core::rescue::PanicHook) {
    let count = Arc::new(AtomicU32::new(0));
    let hook = count.clone();
    (count, Arc::new(move || _ = hook.fetch_add(1, Ordering::SeqCst)))
}

proptest! {
    #[test]
    fn usage_tap_size_hint_is_consistent(script in scripts(300), content_type in 0..3usize, capture in 0usize..64) {
        let mut response = Response::new(body::boxed(script.body()));
        response.headers_mut().insert("content-type", CONTENT_TYPES[content_type].parse().unwrap());
        let outcome = usage::tap(&mut response, capture);
        let played = check_size_hints(response.into_body(), &script);
        if script.ends_cleanly() {
            prop_assert_eq!(played.data, script.data());
        }
        // The outcome has fired, whatever the end.
        let fired = Arc::new(AtomicU32::new(0));
        let seen = fired.clone();
        outcome.subscribe(move |_| _ = seen.fetch_add(1, Ordering::SeqCst));
        prop_assert_eq!(fired.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn catch_panic_body_size_hint_is_consistent(script in scripts(300)) {
        let (panics, hook) = counter();
        let played = check_size_hints(CatchPanicBody::new(script.body(), hook), &script);
        if script.ends_cleanly() {
            prop_assert_eq!(played.data, script.data());
        }
        prop_assert_eq!(panics.load(Ordering::SeqCst), 0);
    }

    /// A body that panics in any of its methods at any point: the wrapped body ends with one
    /// error after what came before, and the panic is counted once.
    #[test]
    fn a_panic_in_a_body_ends_it_with_an_error(script in scripts(100), at in 0usize..8, method in 0..3u8) {
        let (panics, hook) = counter();
        let inner = Exploding { inner: script.body(), calls: 0, at, method };
        let mut body = std::pin::pin!(CatchPanicBody::new(inner, hook));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut failed = false;
        runtime.block_on(async {
            while !body.is_end_stream() {
                _ = body.size_hint();
                match body.frame().await {
                    Some(Ok(_)) => {}
                    Some(Err(_)) => {
                        failed = true;
                        break;
                    }
                    None => break,
                }
            }
        });
        let count = panics.load(Ordering::SeqCst);
        prop_assert!(count <= 1);
        if count == 1 {
            prop_assert!(failed, "a caught panic ends the body with an error");
            // Then it stays ended.
            prop_assert!(body.is_end_stream());
            prop_assert!(runtime.block_on(body.frame()).is_none());
        }
    }
}

/// A body over a script that panics in `poll_frame`, `size_hint` or `is_end_stream` (by
/// `method`) on its `at`-th call.
struct Exploding {
    inner: Scripted,
    calls: usize,
    at: usize,
    method: u8,
}

impl Exploding {
    fn tick(&self, method: u8, calls: usize) {
        if method == self.method && calls == self.at {
            panic!("exploding body, method {method}, call {calls}");
        }
    }
}

impl Body for Exploding {
    type Data = Bytes;
    type Error = llmgate_test_support::body::ScriptError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.calls += 1;
        self.tick(0, self.calls - 1);
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.tick(1, self.calls);
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.tick(2, self.calls);
        self.inner.size_hint()
    }
}

#[test]
fn scripts_round_trip() {
    let script = Script::of(["ab", "c"]);
    let played = check_size_hints(script.body(), &script);
    assert_eq!(played.data, b"abc");
}
