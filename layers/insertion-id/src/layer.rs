//! [`InsertionIdLayer`] and the [`InsertionId`] service.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body::Body;
use llmgate_core::ext::{
    BodyEdits, EditScope, InsertionId as InsertionIdExt, LlmRequest, RolloutIds, RolloutTags, RouteMeta, UpstreamMode,
};
use pin_project_lite::pin_project;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

use crate::{
    body::{DoneScanner, EndWatch, RecordBody, RecordFuture, StartRecord},
    recorder::{Counters, DEFAULT_QUEUE_CAPACITY, Recorder, RetryPolicy},
    store::{Insertion, InsertionStore},
};

/// The response header that carries the insertion id.
pub const INSERTION_ID_HEADER: &str = "x-insertion-id";
/// The default time a response waits for its record before going on without it.
pub const DEFAULT_RECORD_TIMEOUT: Duration = Duration::from_millis(250);

// === impl InsertionIdLayer ===

/// Mints, tags and records insertion ids on rollout routes. See the [crate docs](crate).
#[derive(Clone)]
pub struct InsertionIdLayer {
    recorder: Arc<Recorder>,
    record_timeout: Duration,
    retry: RetryPolicy,
}

impl InsertionIdLayer {
    /// A layer recording into `store`, with a retry queue of 10 000 ids.
    ///
    /// Every service made from this layer (and its clones) shares the store, the retry queue and
    /// the [`Counters`]. The retry worker starts on the first retry, on the current Tokio runtime.
    pub fn new(store: Arc<dyn InsertionStore>) -> Self {
        Self::with_queue_capacity(store, DEFAULT_QUEUE_CAPACITY)
    }

    /// A layer recording into `store`, with a retry queue of `capacity` ids.
    pub fn with_queue_capacity(store: Arc<dyn InsertionStore>, capacity: usize) -> Self {
        Self {
            recorder: Arc::new(Recorder::new(store, capacity)),
            record_timeout: DEFAULT_RECORD_TIMEOUT,
            retry: RetryPolicy::default(),
        }
    }

    /// How long a response waits for its record (default 250 ms) before it goes on and the
    /// record is retried in the background.
    pub fn record_timeout(mut self, timeout: Duration) -> Self {
        self.record_timeout = timeout;
        self
    }

    /// The first and the largest delay between background retries (default 100 ms and 30 s;
    /// doubled after each failure). Takes effect if set before the first retry.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry.min = min;
        self.retry.max = max.max(min);
        self
    }

    /// How long one background attempt may take (default 5 s).
    pub fn retry_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.retry.attempt_timeout = timeout;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn InsertionStore> {
        self.recorder.store()
    }

    /// The counters (`recorded`, `retried`, `failed`, `dropped`, `pending`).
    pub fn counters(&self) -> Arc<Counters> {
        self.recorder.counters().clone()
    }

    /// For graceful shutdown: waits until every id in the retry queue is written, or until
    /// `deadline`. Returns `true` when nothing is left pending.
    pub async fn flush(&self, deadline: Instant) -> bool {
        self.recorder.flush(deadline).await
    }
}

impl fmt::Debug for InsertionIdLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InsertionIdLayer")
            .field("record_timeout", &self.record_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for InsertionIdLayer {
    type Service = InsertionId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InsertionId { inner, recorder: self.recorder.clone(), record_timeout: self.record_timeout, retry: self.retry }
    }
}

// === impl InsertionId ===

/// The service made by [`InsertionIdLayer`].
#[derive(Clone)]
pub struct InsertionId<S> {
    inner: S,
    recorder: Arc<Recorder>,
    record_timeout: Duration,
    retry: RetryPolicy,
}

impl<S: fmt::Debug> fmt::Debug for InsertionId<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InsertionId")
            .field("inner", &self.inner)
            .field("record_timeout", &self.record_timeout)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for InsertionId<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Unpin,
{
    type Response = Response<RecordBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let rollout = req.extensions().get::<RouteMeta>().and_then(|meta| meta.rollout.as_ref());
        let Some(ids) = rollout else {
            return ResponseFuture { inner: self.inner.call(req), state: FutureState::Pass };
        };
        let id = Uuid::now_v7();
        let insertion_id = id.hyphenated().to_string();
        let tags = rollout_tags(ids, &insertion_id);
        let rollout_id: Arc<str> = Arc::from(ids.rollout_id.as_str());
        let metadata = req.extensions().get::<LlmRequest>().map(|request| litellm_metadata(request, &tags));

        let extensions = req.extensions_mut();
        extensions.insert(InsertionIdExt(id));
        extensions.insert(RolloutTags(Arc::from(tags)));
        if let Some(metadata) = metadata {
            let mode = EditScope::Mode(UpstreamMode::LiteLlm);
            match extensions.get_mut::<BodyEdits>() {
                Some(edits) => edits.set("metadata", metadata, mode),
                None => {
                    let mut edits = BodyEdits::default();
                    edits.set("metadata", metadata, mode);
                    extensions.insert(edits);
                }
            }
        }

        let record = Record {
            recorder: self.recorder.clone(),
            insertion: Insertion { rollout_id, insertion_id: Arc::from(insertion_id) },
            timeout: self.record_timeout,
            retry: self.retry,
        };
        ResponseFuture { inner: self.inner.call(req), state: FutureState::Rollout { record: Some(record) } }
    }
}

/// The six rollout tags, in the original gateway's order.
pub fn rollout_tags(ids: &RolloutIds, insertion_id: &str) -> Vec<String> {
    vec![
        format!("rollout_id:{}", ids.rollout_id),
        format!("insertion_id:{insertion_id}"),
        format!("invocation_id:{}", ids.invocation_id),
        format!("experiment_id:{}", ids.experiment_id),
        format!("run_id:{}", ids.run_id),
        format!("row_id:{}", ids.row_id),
    ]
}

/// The client's `metadata` with `tags` = the client's tags followed by `tags` (the `litellm`
/// body); other keys and their order are kept.
pub fn litellm_metadata(request: &LlmRequest, tags: &[String]) -> Value {
    let mut metadata = request.json().get("metadata").and_then(Value::as_object).cloned().unwrap_or_else(Map::new);
    let mut all = match metadata.get_mut("tags").map(Value::take) {
        Some(Value::Array(client)) => client,
        _ => Vec::with_capacity(tags.len()),
    };
    all.extend(tags.iter().cloned().map(Value::String));
    metadata.insert("tags".to_owned(), Value::Array(all));
    Value::Object(metadata)
}

/// What a rollout response needs to record its id.
struct Record {
    recorder: Arc<Recorder>,
    insertion: Insertion,
    timeout: Duration,
    retry: RetryPolicy,
}

impl Record {
    fn future(self) -> RecordFuture {
        Box::pin(self.recorder.record(self.insertion, self.timeout, self.retry))
    }
}

// === impl ResponseFuture ===

pin_project! {
    /// The response future of [`InsertionId`].
    pub struct ResponseFuture<F, B: Body> {
        #[pin]
        inner: F,
        state: FutureState<B>,
    }
}

// The future is allocated once with its largest state; boxing the head would add an allocation.
#[allow(clippy::large_enum_variant)]
enum FutureState<B: Body> {
    /// Not a rollout request, or done.
    Pass,
    /// Waiting for the inner response of a rollout request.
    Rollout { record: Option<Record> },
    /// A 2xx that is not a stream: its head waits for the first frame of its body (and, when
    /// that frame completes the body, for the record), so that head and body leave in one write.
    ReadAhead { head: Option<http::response::Parts>, body: RecordBody<B> },
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes> + Unpin,
{
    type Output = Result<Response<RecordBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let FutureState::ReadAhead { head, body } = this.state {
                ready!(body.read_ahead(cx));
                let head = head.take();
                let FutureState::ReadAhead { body, .. } = std::mem::replace(this.state, FutureState::Pass) else {
                    unreachable!("matched above")
                };
                return match head {
                    Some(head) => Poll::Ready(Ok(Response::from_parts(head, body))),
                    None => Poll::Pending, // polled after completion
                };
            }
            let response = ready!(this.inner.as_mut().poll(cx));
            let record = match this.state {
                FutureState::Rollout { record } => record.take(),
                _ => None,
            };
            let mut response = response?;
            let Some(record) = record else {
                return Poll::Ready(Ok(response.map(RecordBody::pass)));
            };
            if let Ok(value) = HeaderValue::from_str(&record.insertion.insertion_id) {
                response.headers_mut().insert(INSERTION_ID_HEADER, value);
            }
            if !response.status().is_success() {
                return Poll::Ready(Ok(response.map(RecordBody::pass)));
            }
            // The frame that completes the body waits for the record, so a client never holds a
            // whole completion whose id is not stored, and a body that breaks is never recorded.
            let end = end_watch(&response);
            let streamed = matches!(end, EndWatch::Sse(_));
            let start: StartRecord = Box::new(move || record.future());
            let response = response.map(|body| RecordBody::record_at_end(body, end, start));
            if streamed {
                // A stream's head goes out at once.
                return Poll::Ready(Ok(response));
            }
            let (head, body) = response.into_parts();
            *this.state = FutureState::ReadAhead { head: Some(head), body };
        }
    }
}

fn end_watch<B: Body>(response: &Response<B>) -> EndWatch {
    let headers = response.headers();
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if content_type.trim_start().get(..17).is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream")) {
        return EndWatch::Sse(DoneScanner::default());
    }
    // Engines drop `content-length` and derive it from the body's exact size.
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    match length.or_else(|| response.body().size_hint().exact()) {
        Some(length) => EndWatch::Length(length),
        None => EndWatch::EndOfStream,
    }
}
