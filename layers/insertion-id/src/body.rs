//! The response body: passes every frame through, except that on a 2xx rollout response the
//! frame that completes it waits until the record is written: on an SSE stream the frame holding
//! `data: [DONE]` (or the last frame, when the stream has no `[DONE]`), on any other body its last
//! frame (known from `content-length`, or from the end of the stream). A body that breaks before
//! that frame is never recorded.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use llmgate_core::body::size_hint_after;
use pin_project_lite::pin_project;

/// The record of a response, started when its end is in sight.
pub(crate) type RecordFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// Builds the record future (once).
pub(crate) type StartRecord = Box<dyn FnOnce() -> RecordFuture + Send>;

pin_project! {
    /// The response body of [`InsertionId`](crate::InsertionId): the inner body, frame by frame.
    pub struct RecordBody<B: Body> {
        #[pin]
        inner: B,
        state: State,
        // A frame (or error) read ahead by the response future, given out first.
        first: Option<Result<Frame<Bytes>, B::Error>>,
    }

    impl<B: Body> PinnedDrop for RecordBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // A record under way belongs to a completion that finished upstream: a client that
            // leaves while its last frame waits must not make the record a coin toss.
            if let State::Record { record, .. } = std::mem::replace(this.project().state, State::Ended)
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                runtime.spawn(record);
            }
        }
    }
}

enum State {
    /// Nothing to do: not a 2xx rollout response, or already recorded.
    Pass,
    /// A 2xx rollout response whose end has not been seen yet.
    Watch { end: EndWatch, start: StartRecord },
    /// The end was seen: the record runs, `held` waits for it (`None`: the end of the stream).
    Record { record: RecordFuture, held: Option<Frame<Bytes>> },
    /// The record is written; the held end of stream comes next.
    Ended,
}

impl<B: Body<Data = Bytes>> RecordBody<B> {
    pub(crate) fn pass(inner: B) -> Self {
        Self { inner, state: State::Pass, first: None }
    }

    /// Records once `end` sees the response complete; a body that breaks first is not recorded.
    pub(crate) fn record_at_end(inner: B, end: EndWatch, start: StartRecord) -> Self {
        Self { inner, state: State::Watch { end, start }, first: None }
    }

    /// Reads the first frame ahead (when it completes the body, after its record is written).
    pub(crate) fn read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<()>
    where
        B: Unpin,
    {
        if self.first.is_none() {
            self.first = ready!(Pin::new(&mut *self).poll_frame(cx));
        }
        Poll::Ready(())
    }
}

/// How the frame that completes a response is recognised (besides the end of the stream).
#[derive(Debug)]
pub(crate) enum EndWatch {
    /// An SSE stream: its `data: [DONE]` line.
    Sse(DoneScanner),
    /// A body of known length: the frame that brings its last byte.
    Length(u64),
    /// Only the end of the stream.
    EndOfStream,
}

impl EndWatch {
    /// Feeds one data frame; `true` once the response is complete with it.
    fn feed(&mut self, data: &[u8]) -> bool {
        match self {
            EndWatch::Sse(scanner) => scanner.feed(data),
            EndWatch::Length(remaining) => {
                *remaining = remaining.saturating_sub(data.len() as u64);
                *remaining == 0
            }
            EndWatch::EndOfStream => false,
        }
    }
}

impl<B> Body for RecordBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.as_mut().project();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        loop {
            match this.state {
                State::Pass => return this.inner.poll_frame(cx),
                State::Ended => return Poll::Ready(None),
                State::Record { record, held } => {
                    ready!(record.as_mut().poll(cx));
                    let held = held.take();
                    *this.state = if held.is_some() { State::Pass } else { State::Ended };
                    return Poll::Ready(held.map(Ok));
                }
                State::Watch { end, .. } => {
                    let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                        Some(Ok(frame)) => frame,
                        Some(Err(error)) => {
                            // Cut short: never recorded.
                            *this.state = State::Pass;
                            return Poll::Ready(Some(Err(error)));
                        }
                        None => {
                            start_record(this.state, None);
                            continue;
                        }
                    };
                    let done = frame.data_ref().is_some_and(|data| end.feed(data));
                    if done || this.inner.is_end_stream() {
                        start_record(this.state, Some(frame));
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.first.is_some() {
            return false;
        }
        match self.state {
            State::Pass => self.inner.is_end_stream(),
            State::Ended => true,
            // A frame or the record is still to come.
            State::Watch { .. } | State::Record { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let held = |frame: &Frame<Bytes>| frame.data_ref().map_or(0, |data| data.len() as u64);
        let rest = match &self.state {
            State::Ended => SizeHint::with_exact(0),
            // The frame held back for the record is no longer in the inner body's hint.
            State::Record { held: Some(frame), .. } => size_hint_after(held(frame), self.inner.size_hint()),
            _ => self.inner.size_hint(),
        };
        match &self.first {
            Some(Ok(frame)) => size_hint_after(held(frame), rest),
            _ => rest,
        }
    }
}

fn start_record(state: &mut State, held: Option<Frame<Bytes>>) {
    if let State::Watch { start, .. } = std::mem::replace(state, State::Ended) {
        *state = State::Record { record: start(), held };
    }
}

impl<B: Body> fmt::Debug for RecordBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Pass => "pass",
            State::Watch { .. } => "watch",
            State::Record { .. } => "record",
            State::Ended => "ended",
        };
        f.debug_struct("RecordBody").field("state", &state).finish()
    }
}

// === DoneScanner ===

/// Finds a `data: [DONE]` (or `data:[DONE]`) line as frames pass, also across frame boundaries.
///
/// Only line starts are examined (located with `memchr`), at most 12 bytes each, and nothing is
/// copied or allocated.
#[derive(Debug)]
pub(crate) struct DoneScanner {
    /// Progress of the match at the current line start; `None` when the line cannot match.
    progress: Option<Progress>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// Bytes of `data:` matched (0..=5).
    prefix: u8,
    /// Whether the optional space after `data:` was seen.
    space: bool,
    /// Bytes of `[DONE]` matched (0..=6).
    done: u8,
}

const PREFIX: &[u8] = b"data:";
const DONE: &[u8] = b"[DONE]";

impl Default for DoneScanner {
    fn default() -> Self {
        // The stream starts at a line start.
        Self { progress: Some(Progress::default()) }
    }
}

impl DoneScanner {
    /// Feeds one frame; `true` once the frame completes a `[DONE]` line.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> bool {
        let mut rest = chunk;
        loop {
            if let Some(progress) = self.progress.take() {
                match progress.advance(rest) {
                    Step::Done => return true,
                    Step::NeedMore(progress) => {
                        self.progress = Some(progress);
                        return false;
                    }
                    Step::NoMatch => {}
                }
            }
            match memchr::memchr2(b'\n', b'\r', rest) {
                Some(i) => {
                    rest = &rest[i + 1..];
                    self.progress = Some(Progress::default());
                }
                None => return false,
            }
        }
    }
}

enum Step {
    Done,
    NeedMore(Progress),
    NoMatch,
}

impl Progress {
    fn advance(mut self, bytes: &[u8]) -> Step {
        for &byte in bytes {
            if usize::from(self.prefix) < PREFIX.len() {
                if byte != PREFIX[usize::from(self.prefix)] {
                    return Step::NoMatch;
                }
                self.prefix += 1;
            } else if self.done == 0 && !self.space && byte == b' ' {
                self.space = true;
            } else {
                if byte != DONE[usize::from(self.done)] {
                    return Step::NoMatch;
                }
                self.done += 1;
                if usize::from(self.done) == DONE.len() {
                    return Step::Done;
                }
            }
        }
        Step::NeedMore(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        task::Waker,
    };

    use llmgate_test_support::body::{Script, check_size_hints, scripts, scripts_of};
    use proptest::prelude::*;

    use super::*;

    /// A `RecordBody` over `script` that watches for its end as the layer would (by length when
    /// declared, else by `[DONE]` for SSE, else the end of the stream), optionally with the first
    /// frame read ahead; the flag says whether the record ran.
    fn record_body(
        script: &Script,
        sse: bool,
        read_ahead: bool,
    ) -> (RecordBody<llmgate_test_support::body::Scripted>, Arc<AtomicBool>) {
        let recorded = Arc::new(AtomicBool::new(false));
        let flag = recorded.clone();
        let start: StartRecord = Box::new(move || {
            Box::pin(async move {
                tokio::task::yield_now().await;
                flag.store(true, Ordering::SeqCst);
            })
        });
        let end = match (sse, script.declares_length) {
            (true, _) => EndWatch::Sse(DoneScanner::default()),
            (false, true) => EndWatch::Length(script.declared.unwrap_or_else(|| script.data_len())),
            (false, false) => EndWatch::EndOfStream,
        };
        let mut body = RecordBody::record_at_end(script.body(), end, start);
        if read_ahead {
            let mut cx = Context::from_waker(Waker::noop());
            while body.read_ahead(&mut cx).is_pending() {}
        }
        (body, recorded)
    }

    fn sse_stream() -> impl Strategy<Value = Script> {
        proptest::collection::vec("[a-z ]{0,12}", 0..6).prop_flat_map(|contents| {
            let mut text = String::new();
            for content in contents {
                text.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n"));
            }
            text.push_str("data: [DONE]\n\n");
            scripts_of(text.into_bytes())
        })
    }

    proptest! {
        /// Every frame split, early end and error, read ahead or not: the size hint stays
        /// consistent and the body gives out what the upstream sent.
        #[test]
        fn size_hint_is_consistent(script in scripts(160), read_ahead in any::<bool>()) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _entered = runtime.enter();
            let (body, _) = record_body(&script, false, read_ahead);
            let played = check_size_hints(body, &script);
            if script.ends_cleanly() {
                prop_assert_eq!(played.data, script.data());
            }
        }

        /// The same for SSE streams watched for `[DONE]`: recorded before `[DONE]` (or the end of
        /// the stream) is given out, never when the stream breaks before it.
        #[test]
        fn sse_size_hint_is_consistent(script in sse_stream(), read_ahead in any::<bool>()) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _entered = runtime.enter();
            let (body, recorded) = record_body(&script, true, read_ahead);
            let played = check_size_hints(body, &script);
            let done_given_out = memchr::memmem::find(&played.data, b"data: [DONE]").is_some();
            let recorded = recorded.load(Ordering::SeqCst);
            if done_given_out || !played.errored {
                // The `[DONE]` frame (or the end of the stream) waits for its record.
                prop_assert!(recorded);
            } else {
                prop_assert!(!recorded, "a stream that broke before [DONE] was recorded");
            }
            if script.ends_cleanly() {
                prop_assert_eq!(played.data, script.data());
            }
        }
    }

    fn feed_all(chunks: &[&str]) -> Option<usize> {
        let mut scanner = DoneScanner::default();
        chunks.iter().position(|c| scanner.feed(c.as_bytes()))
    }

    #[test]
    fn finds_done_lines() {
        assert_eq!(feed_all(&["data: {\"a\":1}\n\n", "data: [DONE]\n\n"]), Some(1));
        assert_eq!(feed_all(&["data:[DONE]\n\n"]), Some(0));
        assert_eq!(feed_all(&["data: {}\r\n\r\ndata: [DONE]\r\n\r\n"]), Some(0));
        // Split across frames, at every position.
        let text = "data: {\"x\":2}\n\ndata: [DONE]\n\n";
        for split in 1..text.len() {
            let (a, b) = text.split_at(split);
            let expect = if split >= text.find("[DONE]").unwrap() + 6 { 0 } else { 1 };
            assert_eq!(feed_all(&[a, b]), Some(expect), "split at {split}");
        }
    }

    #[test]
    fn ignores_lookalikes() {
        assert_eq!(feed_all(&["data: {\"content\":\"data: [DONE]\"}\n\n"]), None);
        assert_eq!(feed_all(&["data: [DON", "E\n"]), None);
        assert_eq!(feed_all(&["xdata: [DONE]\n"]), None);
        assert_eq!(feed_all(&["data:  [DONE]\n"]), None);
        assert_eq!(feed_all(&["data: {}\n\n"]), None);
    }
}
