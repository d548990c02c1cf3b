//! Scripted response bodies and a checker for the `size_hint` contract of any body built on them.
//!
//! [`Scripted`] yields a script's frames (data, a pause, an error, trailers, an early end) and
//! is itself honest about its size: an exact hint when the script declares its length (as a
//! `content-length` body does), else at least what has not been given out yet.
//! [`check_size_hints`] drives a body to its end and checks, before every poll and at the end,
//! that the hint is consistent: `lower ≤ upper`, never below what is still to come, never
//! above it when an upper bound is given, and exact when the source's length was known and the
//! body ends cleanly. [`scripts`] is the proptest strategy: every frame split, early ends and
//! errors.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use proptest::prelude::*;

/// The error a [`Scripted`] body ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError;

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted body error")
    }
}

impl std::error::Error for ScriptError {}

/// One step of a script.
#[derive(Debug, Clone)]
pub enum Step {
    /// A data frame.
    Data(Bytes),
    /// `Pending` once (the waker is woken at once).
    Pause,
    /// An error: the body ends with it.
    Error,
    /// A trailers frame.
    Trailers,
}

/// A body script: its steps, and whether it declares its length (a `content-length`).
#[derive(Debug, Clone)]
pub struct Script {
    pub steps: Vec<Step>,
    /// Declares the sum of its data frames as an exact size hint. A script that errors or ends
    /// early then yields less than it declared, as a cut `content-length` body does.
    pub declares_length: bool,
    /// The length declared; by default the sum of the data frames.
    pub declared: Option<u64>,
}

impl Script {
    /// A script of the given data frames, length declared.
    pub fn of<I: IntoIterator<Item = T>, T: Into<Bytes>>(frames: I) -> Self {
        let steps = frames.into_iter().map(|f| Step::Data(f.into())).collect();
        Self { steps, declares_length: true, declared: None }
    }

    /// Whether it ends cleanly (no error, and no fewer bytes than it declared).
    pub fn ends_cleanly(&self) -> bool {
        !self.steps.iter().any(|s| matches!(s, Step::Error))
            && self.declared.is_none_or(|declared| declared == self.data_len())
    }

    /// The bytes of its data frames.
    pub fn data_len(&self) -> u64 {
        self.steps.iter().map(|s| if let Step::Data(d) = s { d.len() as u64 } else { 0 }).sum()
    }

    /// Its data frames joined.
    pub fn data(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for step in &self.steps {
            if let Step::Data(d) = step {
                out.extend_from_slice(d);
            }
        }
        out
    }

    /// The body that plays it.
    pub fn body(&self) -> Scripted {
        let declared = self.declares_length.then(|| self.declared.unwrap_or_else(|| self.data_len()));
        Scripted { steps: self.steps.iter().cloned().collect(), declared_left: declared }
    }
}

/// The body that plays a [`Script`].
#[derive(Debug)]
pub struct Scripted {
    steps: VecDeque<Step>,
    /// Declared bytes not yet given out.
    declared_left: Option<u64>,
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = ScriptError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ScriptError>>> {
        let this = &mut *self;
        match this.steps.pop_front() {
            None => Poll::Ready(None),
            Some(Step::Pause) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Error) => {
                this.steps.clear();
                this.declared_left = Some(0);
                Poll::Ready(Some(Err(ScriptError)))
            }
            Some(Step::Trailers) => Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::new())))),
            Some(Step::Data(data)) => {
                if let Some(left) = this.declared_left.as_mut() {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared_left {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::new(),
        }
    }
}

/// What [`check_size_hints`] saw.
#[derive(Debug, Default)]
pub struct Played {
    /// The data the body gave out.
    pub data: Vec<u8>,
    /// Whether it ended with an error.
    pub errored: bool,
    /// Trailers frames seen.
    pub trailers: usize,
}

/// Drives `body`, built over `source`'s body, to its end and checks its `size_hint` before every
/// poll: `lower ≤ upper` always, and when the source ends cleanly, against what the body
/// actually gives out afterwards (exact when the source declared its length). Panics (a test
/// failure) on a broken rule, with the step it broke at.
pub fn check_size_hints<B>(body: B, source: &Script) -> Played
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    let mut hints: Vec<(u64, SizeHint)> = Vec::new();
    let mut played = Played::default();
    let exact = source.declares_length;
    // Every step is at most two polls (a pause, and the body's own pauses, e.g. a record).
    let max_polls = 4 * source.steps.len() + 16;
    let mut ended = false;
    for _ in 0..max_polls {
        let hint = body.size_hint();
        assert!(hint.upper().is_none_or(|upper| hint.lower() <= upper), "lower > upper: {hint:?}");
        hints.push((played.data.len() as u64, hint));
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Pending => {}
            Poll::Ready(None) => {
                ended = true;
                break;
            }
            Poll::Ready(Some(Err(_))) => {
                played.errored = true;
                ended = true;
                break;
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => played.data.extend_from_slice(&data),
                Err(frame) => {
                    assert!(frame.is_trailers(), "a frame that is neither data nor trailers");
                    played.trailers += 1;
                }
            },
        }
    }
    assert!(ended, "the body did not end within {max_polls} polls");
    let total = played.data.len() as u64;
    if source.ends_cleanly() && !played.errored {
        let end = body.size_hint();
        assert!(end.lower() == 0, "a finished body still promises {} bytes", end.lower());
        for (given, hint) in &hints {
            let to_come = total - given;
            assert!(hint.lower() <= to_come, "hint {hint:?} after {given} bytes, but only {to_come} came");
            if let Some(upper) = hint.upper() {
                assert!(upper >= to_come, "hint {hint:?} after {given} bytes, but {to_come} came");
            }
            if exact {
                assert_eq!(hint.exact(), Some(to_come), "inexact hint after {given} bytes of a known length");
            }
        }
    }
    played
}

/// Splits `data` into frames at the given cut points (sorted, deduplicated, within bounds).
pub fn split_at(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut frames = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([data.len()]) {
        if cut > start {
            frames.push(Bytes::copy_from_slice(&data[start..cut]));
            start = cut;
        }
    }
    frames
}

/// A script playing `data` in every frame split, with pauses, optional trailers, an optional
/// error or early end (a declared length that is not all delivered), with or without a
/// declared length.
pub fn scripts_of(data: Vec<u8>) -> impl Strategy<Value = Script> {
    let len = data.len();
    (
        proptest::collection::vec(0..=len, 0..8),
        proptest::collection::vec(any::<bool>(), 0..8),
        any::<bool>(),
        prop_oneof![3 => Just(None), 1 => (0..=len).prop_map(Some)],
        prop_oneof![3 => Just(false), 1 => Just(true)],
        any::<bool>(),
    )
        .prop_map(move |(cuts, pauses, declares_length, cut_short, trailers, error_at_cut)| {
            let frames = split_at(&data, &cuts);
            let mut steps = Vec::new();
            let mut delivered = 0;
            for (i, frame) in frames.into_iter().enumerate() {
                if cut_short.is_some_and(|at| delivered >= at) {
                    break;
                }
                if pauses.get(i).copied().unwrap_or(false) {
                    steps.push(Step::Pause);
                }
                delivered += frame.len();
                steps.push(Step::Data(frame));
            }
            let cut = cut_short.is_some() && delivered < len;
            if cut && error_at_cut {
                steps.push(Step::Error);
            } else if trailers && !cut {
                steps.push(Step::Trailers);
            }
            let declared = (declares_length && cut).then_some(len as u64);
            Script { steps, declares_length, declared }
        })
}

/// [`scripts_of`] over arbitrary bytes of up to `max_len`.
pub fn scripts(max_len: usize) -> impl Strategy<Value = Script> {
    proptest::collection::vec(any::<u8>(), 0..=max_len).prop_flat_map(scripts_of)
}
