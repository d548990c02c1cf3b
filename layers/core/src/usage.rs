//! The pass-through response body that reports usage exactly once.
//!
//! [`UsageTap`] wraps an upstream response body and hands every frame on as it arrives: nothing
//! is held back, so SSE streams reach the client frame by frame. While the frames pass it
//!
//! - scans SSE (`text/event-stream`) lines for a `usage` object (OpenAI's final chunk, or
//!   Anthropic-style `message_start`/`message_delta` usage, last value winning), and
//! - keeps a bounded copy of a JSON body to read its `usage` at the end, and of any body when a
//!   consumer asked for one (Langfuse's output), and
//! - when a copy was asked for, assembles an SSE stream's deltas into one assistant message
//!   ([`AssembledMessage`]: role, content, tool calls), bounded by the copy's size. Each `data:`
//!   line is then parsed once, into borrowed fields; without a copy nothing is parsed but the
//!   usage chunk.
//!
//! The [`Outcome`] fires exactly once, on whichever comes first: end of stream (also when
//! `is_end_stream()` turns true after a frame), an error, or drop (the client went away).
//!
//! The first layer that wants the outcome installs the tap with [`tap`]; layers further out
//! find the [`UsageOutcome`] in the response extensions and subscribe to the same one (and may
//! raise the size of the copy, as long as the body has not started to flow).
//!
//! ```
//! use http::Response;
//! use http_body_util::BodyExt;
//! use llmgate_core::{body, usage};
//! use std::sync::{atomic::{AtomicU64, Ordering}, Arc};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut response = Response::new(body::full(r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#));
//! response.headers_mut().insert("content-type", "application/json".parse().unwrap());
//! let outcome = usage::tap(&mut response, 0);
//! let total = Arc::new(AtomicU64::new(0));
//! let seen = total.clone();
//! outcome.subscribe(move |o| seen.store(o.usage.map_or(0, |u| u.total), Ordering::SeqCst));
//! response.into_body().collect().await.unwrap();
//! assert_eq!(total.load(Ordering::SeqCst), 7);
//! # }
//! ```

use std::{
    borrow::Cow,
    fmt,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http::{Response, header};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use pin_project_lite::pin_project;
use serde_json::Value;
use tokio::time::Instant;

use crate::{BoxError, GatewayBody};

/// How much of a JSON body is kept to read its `usage`.
pub const JSON_USAGE_LIMIT: usize = 1024 * 1024;
/// The longest SSE line carried over between frames; longer lines are skipped.
pub const SSE_LINE_LIMIT: usize = 64 * 1024;

/// Token usage as Langfuse wants it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
    /// Total tokens.
    pub total: u64,
}

impl Usage {
    /// Reads an OpenAI (`prompt_tokens`/`completion_tokens`) or Anthropic
    /// (`input_tokens`/`output_tokens`) usage object.
    pub fn from_json(usage: &Value) -> Option<Usage> {
        let object = usage.as_object()?;
        let count = |keys: &[&str]| keys.iter().find_map(|k| object.get(*k).and_then(Value::as_u64));
        let input = count(&["prompt_tokens", "input_tokens"]);
        let output = count(&["completion_tokens", "output_tokens"]);
        if input.is_none() && output.is_none() {
            return None;
        }
        let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
        let total = count(&["total_tokens"]).unwrap_or(input + output);
        Some(Usage { input, output, total })
    }

    /// Merges a later usage report into this one: known counts win.
    fn merge(self, later: Usage, later_has_input: bool) -> Usage {
        let input = if later_has_input { later.input } else { self.input };
        let output = later.output.max(if later_has_input { 0 } else { self.output });
        Usage { input, output, total: later.total.max(input + output) }
    }
}

// === SseScanner ===

/// Finds `usage` in SSE `data:` lines as the frames pass, carrying unfinished lines over, and
/// (when [`SseScanner::assemble`] was called) assembles the deltas into one message.
#[derive(Debug, Default)]
pub struct SseScanner {
    partial: Vec<u8>,
    skipping_long_line: bool,
    usage: Option<Usage>,
    done: bool,
    assembler: Option<AssembledMessage>,
}

impl SseScanner {
    /// Assembles the stream's message from here on, keeping at most `limit` bytes of its texts.
    pub fn assemble(&mut self, limit: usize) {
        self.assembler.get_or_insert_with(|| AssembledMessage::bounded(limit));
    }

    /// The message assembled so far (`None` unless asked for, or before the first delta).
    pub fn assembled(&self) -> Option<&AssembledMessage> {
        self.assembler.as_ref().filter(|a| a.seen)
    }

    /// Feeds one frame.
    pub fn feed(&mut self, chunk: &[u8]) {
        let Some(last_newline) = memchr::memrchr(b'\n', chunk) else {
            self.carry(chunk);
            return;
        };
        let (complete, rest) = chunk.split_at(last_newline + 1);
        let mut lines = complete;
        if !self.partial.is_empty() || self.skipping_long_line {
            let end = memchr::memchr(b'\n', lines).map_or(lines.len(), |i| i + 1);
            let (head, tail) = lines.split_at(end);
            if !self.skipping_long_line {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.scan(&line);
                line.clear();
                self.partial = line;
            }
            self.skipping_long_line = false;
            lines = tail;
        }
        self.scan(lines);
        self.carry(rest);
    }

    /// Ends the stream: a last line without a newline still counts.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() && !self.skipping_long_line {
            let line = std::mem::take(&mut self.partial);
            self.scan(&line);
        }
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether `data: [DONE]` was seen.
    pub fn saw_done(&self) -> bool {
        self.done
    }

    fn carry(&mut self, rest: &[u8]) {
        if self.skipping_long_line || rest.is_empty() {
            return;
        }
        if self.partial.len() + rest.len() > SSE_LINE_LIMIT {
            self.partial.clear();
            self.skipping_long_line = true;
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    /// Scans complete lines. The cheap substring checks come before any JSON parse.
    fn scan(&mut self, lines: &[u8]) {
        // `"usage":null` (in every chunk when usage is on) is ruled out here, before any split.
        let has_usage = usage_object_follows(lines);
        let has_done = DONE.find(lines).is_some();
        if !has_usage && !has_done && self.assembler.is_none() {
            return;
        }
        for line in lines.split(|b| *b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                self.done = true;
                continue;
            }
            if let Some(assembler) = self.assembler.as_mut() {
                assembler.feed(data);
            }
            if has_usage && usage_object_follows(data) {
                self.read_usage(data);
            }
        }
    }

    fn read_usage(&mut self, data: &[u8]) {
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        let usage = chunk.get("usage").or_else(|| chunk.get("message").and_then(|m| m.get("usage")));
        let Some(usage) = usage else { return };
        let Some(found) = Usage::from_json(usage) else {
            return;
        };
        let has_input = usage.get("prompt_tokens").or_else(|| usage.get("input_tokens")).is_some();
        self.usage = Some(match self.usage {
            Some(earlier) => earlier.merge(found, has_input),
            None => found,
        });
    }
}

// Built once: a searcher per call cost more than the scan of a typical chunk.
static USAGE: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static DONE: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"[DONE]"));

/// Whether `"usage"` in this line is followed by an object (not `null`, as OpenAI sends in
/// every chunk when usage is on).
fn usage_object_follows(data: &[u8]) -> bool {
    USAGE.find_iter(data).any(|at| {
        let rest = data[at + 7..].trim_ascii_start();
        rest.strip_prefix(b":").is_some_and(|v| v.trim_ascii_start().starts_with(b"{"))
    })
}

// === AssembledMessage ===

/// The assistant message of a stream: `choices[0]`'s deltas joined, texts bounded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssembledMessage {
    /// `delta.role` (OpenAI sends it in the first chunk).
    pub role: Option<String>,
    /// `delta.content` joined; `None` when no chunk carried content.
    pub content: Option<String>,
    /// `delta.tool_calls` merged by their `index`.
    pub tool_calls: Vec<AssembledToolCall>,
    /// The last non-null `finish_reason`.
    pub finish_reason: Option<String>,
    /// Bytes of text (content and tool-call arguments) the stream carried.
    pub text_bytes: u64,
    /// Bytes of text kept (at most the limit).
    pub kept_bytes: u64,
    limit: usize,
    seen: bool,
}

/// One tool call of an [`AssembledMessage`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AssembledToolCall {
    /// `id`.
    pub id: Option<String>,
    /// `type` (`function`).
    pub kind: Option<String>,
    /// `function.name`.
    pub name: Option<String>,
    /// `function.arguments` joined.
    pub arguments: String,
}

impl AssembledMessage {
    fn bounded(limit: usize) -> Self {
        Self { limit, ..Self::default() }
    }

    /// Whether texts were cut to the limit.
    pub fn truncated(&self) -> bool {
        self.kept_bytes < self.text_bytes
    }

    /// Feeds the JSON of one `data:` line; lines that are not chunks are skipped.
    fn feed(&mut self, data: &[u8]) {
        // Borrowed: a chunk's strings are copied only into the message.
        #[derive(serde::Deserialize)]
        struct Chunk<'a> {
            #[serde(borrow, default)]
            choices: Vec<Choice<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct Choice<'a> {
            #[serde(default)]
            index: u64,
            #[serde(borrow, default)]
            delta: Option<Delta<'a>>,
            #[serde(borrow, default)]
            finish_reason: Option<Cow<'a, str>>,
        }
        #[derive(serde::Deserialize)]
        struct Delta<'a> {
            #[serde(borrow, default)]
            role: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            content: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            tool_calls: Option<Vec<ToolCallDelta<'a>>>,
        }
        #[derive(serde::Deserialize)]
        struct ToolCallDelta<'a> {
            #[serde(default)]
            index: usize,
            #[serde(borrow, default)]
            id: Option<Cow<'a, str>>,
            #[serde(borrow, default, rename = "type")]
            kind: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            function: Option<FunctionDelta<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct FunctionDelta<'a> {
            #[serde(borrow, default)]
            name: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            arguments: Option<Cow<'a, str>>,
        }

        let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else {
            return;
        };
        let Some(choice) = chunk.choices.into_iter().find(|c| c.index == 0) else {
            return;
        };
        self.seen = true;
        if let Some(reason) = choice.finish_reason {
            self.finish_reason = Some(reason.into_owned());
        }
        let Some(delta) = choice.delta else { return };
        if let Some(role) = delta.role {
            self.role = Some(role.into_owned());
        }
        if let Some(text) = delta.content {
            let mut content = self.content.take().unwrap_or_default();
            self.push(&mut content, &text);
            self.content = Some(content);
        }
        // A tool call index far past the calls seen is not a real stream: ignored.
        for call in delta.tool_calls.into_iter().flatten() {
            if call.index > self.tool_calls.len() {
                continue;
            }
            if call.index == self.tool_calls.len() {
                self.tool_calls.push(AssembledToolCall::default());
            }
            let mut entry = std::mem::take(&mut self.tool_calls[call.index]);
            if let Some(id) = call.id {
                entry.id = Some(id.into_owned());
            }
            if let Some(kind) = call.kind {
                entry.kind = Some(kind.into_owned());
            }
            if let Some(function) = call.function {
                if let Some(name) = function.name {
                    entry.name = Some(name.into_owned());
                }
                if let Some(arguments) = function.arguments {
                    self.push(&mut entry.arguments, &arguments);
                }
            }
            self.tool_calls[call.index] = entry;
        }
    }

    /// The message of a non-streamed completion's `choices[0].message`, texts bounded by
    /// `limit`; `None` when there is none.
    pub fn from_completion(choices: &Value, limit: usize) -> Option<Self> {
        let choice = choices.as_array()?.iter().find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)?;
        let message = choice.get("message")?;
        fn text(v: &Value) -> Cow<'_, str> {
            match v {
                Value::String(s) => Cow::Borrowed(s.as_str()),
                other => Cow::Owned(other.to_string()),
            }
        }
        let mut assembled = Self::bounded(limit);
        assembled.seen = true;
        assembled.role = message.get("role").and_then(Value::as_str).map(str::to_owned);
        assembled.finish_reason = choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned);
        if let Some(content) = message.get("content").filter(|c| !c.is_null()) {
            let mut kept = String::new();
            assembled.push(&mut kept, &text(content));
            assembled.content = Some(kept);
        }
        for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let function = call.get("function");
            let field =
                |v: Option<&Value>, key: &str| v.and_then(|v| v.get(key)).and_then(Value::as_str).map(str::to_owned);
            let mut entry = AssembledToolCall {
                id: field(Some(call), "id"),
                kind: field(Some(call), "type"),
                name: field(function, "name"),
                arguments: String::new(),
            };
            if let Some(arguments) = function.and_then(|f| f.get("arguments")) {
                assembled.push(&mut entry.arguments, &text(arguments));
            }
            assembled.tool_calls.push(entry);
        }
        Some(assembled)
    }

    /// Appends what fits of `text` within the limit (cut at a character boundary).
    fn push(&mut self, target: &mut String, text: &str) {
        self.text_bytes += text.len() as u64;
        let room = self.limit.saturating_sub(self.kept_bytes as usize);
        let mut end = text.len().min(room);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        target.push_str(&text[..end]);
        self.kept_bytes += end as u64;
    }
}

// === Outcome ===

/// How a response body ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The upstream finished the body.
    Complete,
    /// The body failed (upstream reset, timeout, malformed framing).
    Error(String),
    /// The body was dropped before its end: the client went away.
    Cancelled,
}

/// What a response body turned out to be, reported once.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The usage found, if any.
    pub usage: Option<Usage>,
    /// How the body ended.
    pub end: StreamEnd,
    /// Whether the body was SSE.
    pub sse: bool,
    /// Bytes passed to the client.
    pub bytes: u64,
    /// When the first data frame passed (time to first byte for streams).
    pub first_frame_at: Option<Instant>,
    /// When the outcome fired.
    pub ended_at: Instant,
    /// A bounded copy of the body, when one was asked for.
    pub captured: Bytes,
    /// Whether `captured` is cut short.
    pub truncated: bool,
    /// An SSE stream's assembled message, when a copy was asked for.
    pub assembled: Option<AssembledMessage>,
}

type Callback = Box<dyn FnOnce(&Arc<Outcome>) + Send>;

enum State {
    Pending(Vec<Callback>),
    Done(Arc<Outcome>),
}

/// Response extension: a subscription to the tap's [`Outcome`].
#[derive(Clone)]
pub struct UsageOutcome {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// The largest copy any subscriber asked for, read by the tap as frames pass.
    capture: AtomicUsize,
}

impl fmt::Debug for UsageOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UsageOutcome")
    }
}

impl UsageOutcome {
    fn new(capture: usize) -> Self {
        Self { shared: Arc::new(Shared { state: Mutex::new(State::Pending(Vec::new())), capture: capture.into() }) }
    }

    /// Asks for a copy of at least `bytes` (for the frames that have not passed yet).
    pub fn capture_at_least(&self, bytes: usize) {
        self.shared.capture.fetch_max(bytes, Ordering::Relaxed);
    }

    fn capture(&self) -> usize {
        self.shared.capture.load(Ordering::Relaxed)
    }

    /// Calls `f` once with the outcome: now if it is known, else when it fires. `f` runs on the
    /// task that polls or drops the body, so it must not block (hand work off with `try_send`).
    pub fn subscribe(&self, f: impl FnOnce(&Arc<Outcome>) + Send + 'static) {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            State::Pending(callbacks) => callbacks.push(Box::new(f)),
            State::Done(outcome) => {
                let outcome = outcome.clone();
                drop(state);
                f(&outcome);
            }
        }
    }

    /// Waits for the outcome.
    pub async fn wait(&self) -> Arc<Outcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.subscribe(move |o| {
            let _ = tx.send(o.clone());
        });
        match rx.await {
            Ok(outcome) => outcome,
            // The sender lives until the callback runs, and callbacks always run.
            Err(_) => std::future::pending().await,
        }
    }

    fn fire(&self, outcome: Outcome) {
        let outcome = Arc::new(outcome);
        let callbacks = {
            let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *state, State::Done(outcome.clone())) {
                State::Pending(callbacks) => callbacks,
                State::Done(first) => {
                    *state = State::Done(first);
                    return;
                }
            }
        };
        for callback in callbacks {
            callback(&outcome);
        }
    }
}

/// Installs the tap on `response` unless a layer further in already did, and returns the
/// subscription. `capture` asks for a bounded copy of the body (0 for none); a JSON body is
/// always kept up to [`JSON_USAGE_LIMIT`] to read its usage.
pub fn tap(response: &mut Response<GatewayBody>, capture: usize) -> UsageOutcome {
    if let Some(existing) = response.extensions().get::<UsageOutcome>() {
        existing.capture_at_least(capture);
        return existing.clone();
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes());
    let kind = match content_type {
        Some(ct) if ct.starts_with(b"text/event-stream") => Kind::Sse(SseScanner::default()),
        Some(ct) if memmem::find(ct, b"json").is_some() => Kind::Json,
        _ => Kind::Other,
    };
    let outcome = UsageOutcome::new(capture);
    let body = std::mem::replace(response.body_mut(), crate::body::empty());
    let tapped = UsageTap::new(body, kind, outcome.clone());
    *response.body_mut() = tapped.boxed();
    response.extensions_mut().insert(outcome.clone());
    outcome
}

// === UsageTap ===

enum Kind {
    Sse(SseScanner),
    Json,
    Other,
}

pin_project! {
    /// The pass-through body installed by [`tap`].
    pub struct UsageTap<B> {
        #[pin]
        inner: B,
        kind: Kind,
        captured: Vec<u8>,
        truncated: bool,
        bytes: u64,
        first_frame_at: Option<Instant>,
        outcome: Option<UsageOutcome>,
    }

    impl<B> PinnedDrop for UsageTap<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(outcome) = this.outcome.take() {
                let capture = outcome.capture();
                let report = report(this.kind, capture, this.captured, *this.truncated, *this.bytes, *this.first_frame_at, StreamEnd::Cancelled);
                outcome.fire(report);
            }
        }
    }
}

impl<B: Body<Data = Bytes>> UsageTap<B> {
    fn new(inner: B, kind: Kind, outcome: UsageOutcome) -> Self {
        let empty = inner.is_end_stream();
        let mut tap = Self {
            inner,
            kind,
            captured: Vec::new(),
            truncated: false,
            bytes: 0,
            first_frame_at: None,
            outcome: Some(outcome),
        };
        if empty && let Some(outcome) = tap.outcome.take() {
            let capture = outcome.capture();
            outcome.fire(report(&mut tap.kind, capture, &mut tap.captured, false, 0, None, StreamEnd::Complete));
        }
        tap
    }

    fn boxed(self) -> GatewayBody
    where
        B: Send + 'static,
        B::Error: Into<BoxError>,
    {
        crate::body::boxed(self)
    }
}

fn report(
    kind: &mut Kind,
    capture: usize,
    captured: &mut Vec<u8>,
    truncated: bool,
    bytes: u64,
    first_frame_at: Option<Instant>,
    end: StreamEnd,
) -> Outcome {
    let (usage, sse, assembled) = match kind {
        Kind::Sse(scanner) => {
            scanner.finish();
            (scanner.usage(), true, scanner.assembled().cloned())
        }
        Kind::Json if !truncated && end == StreamEnd::Complete => {
            let (usage, message) = json_summary(captured, capture);
            (usage, false, message)
        }
        _ => (None, false, None),
    };
    Outcome {
        usage,
        end,
        sse,
        bytes,
        first_frame_at,
        ended_at: Instant::now(),
        captured: Bytes::from(std::mem::take(captured)),
        truncated,
        assembled,
    }
}

/// A JSON body's usage and, when a copy was asked for (`capture` > 0), its assistant message:
/// one parse for both.
fn json_summary(body: &[u8], capture: usize) -> (Option<Usage>, Option<AssembledMessage>) {
    #[derive(serde::Deserialize)]
    struct UsageOnly {
        usage: Option<Value>,
    }
    #[derive(serde::Deserialize)]
    struct Completion {
        usage: Option<Value>,
        choices: Option<Value>,
    }
    if capture == 0 {
        let parsed: Option<UsageOnly> = serde_json::from_slice(body).ok();
        return (parsed.and_then(|p| Usage::from_json(&p.usage?)), None);
    }
    let Ok(parsed) = serde_json::from_slice::<Completion>(body) else {
        return (None, None);
    };
    let usage = parsed.usage.as_ref().and_then(Usage::from_json);
    (usage, parsed.choices.as_ref().and_then(|c| AssembledMessage::from_completion(c, capture)))
}

impl<B> Body for UsageTap<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(polled) => polled.map(|r| r.map_err(Into::<BoxError>::into)),
        };
        let end = match &polled {
            None => Some(StreamEnd::Complete),
            Some(Err(error)) => Some(StreamEnd::Error(error.to_string())),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.first_frame_at.get_or_insert_with(Instant::now);
                    *this.bytes += data.remaining() as u64;
                    let capture = this.outcome.as_ref().map_or(0, UsageOutcome::capture);
                    let limit = match this.kind {
                        Kind::Sse(scanner) => {
                            if capture > 0 {
                                scanner.assemble(capture);
                            }
                            scanner.feed(data);
                            capture
                        }
                        Kind::Json => capture.max(JSON_USAGE_LIMIT),
                        Kind::Other => capture,
                    };
                    let room = limit.saturating_sub(this.captured.len());
                    if data.len() > room {
                        *this.truncated = true;
                    }
                    this.captured.extend_from_slice(&data[..data.len().min(room)]);
                }
                this.inner.is_end_stream().then_some(StreamEnd::Complete)
            }
        };
        if let Some(end) = end
            && let Some(outcome) = this.outcome.take()
        {
            let capture = outcome.capture();
            outcome.fire(report(
                this.kind,
                capture,
                this.captured,
                *this.truncated,
                *this.bytes,
                *this.first_frame_at,
                end,
            ));
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&str]) -> SseScanner {
        let mut scanner = SseScanner::default();
        for chunk in chunks {
            scanner.feed(chunk.as_bytes());
        }
        scanner.finish();
        scanner
    }

    const FINAL: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n";

    #[test]
    fn finds_usage_in_final_chunk() {
        let s = scan(&["data: {\"choices\":[{}],\"usage\":null}\n\n", FINAL, "data: [DONE]\n\n"]);
        assert_eq!(s.usage(), Some(Usage { input: 5, output: 7, total: 12 }));
        assert!(s.saw_done());
    }

    #[test]
    fn finds_usage_split_across_frames_at_every_byte() {
        for at in 0..FINAL.len() {
            let s = scan(&[&FINAL[..at], &FINAL[at..]]);
            assert_eq!(s.usage().map(|u| u.total), Some(12), "split at {at}");
        }
    }

    #[test]
    fn anthropic_style_usage_is_merged() {
        let s = scan(&[
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n",
        ]);
        assert_eq!(s.usage(), Some(Usage { input: 9, output: 15, total: 24 }));
    }

    #[test]
    fn overlong_lines_are_skipped_not_buffered() {
        let long = "x".repeat(SSE_LINE_LIMIT + 10);
        let s = scan(&["data: ", &long, &long, "\n", FINAL]);
        assert_eq!(s.usage().map(|u| u.total), Some(12));
        assert!(s.partial.is_empty());
    }
}
