//! The layer around `service_fn` upstreams: tagging, the body edit, the header, and recording
//! exactly when the completion succeeded.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, body,
    ext::{BodyEdits, InsertionId, LlmRequest, RolloutIds, RolloutTags, RouteKind, RouteMeta, UpstreamMode},
    json::{encode, parse_chat_body},
};
use llmgate_insertion_id::{Insertion, InsertionIdLayer, InsertionStore, MemoryStore, StoreFuture};
use tokio::sync::{Semaphore, watch};
use tower::{Layer, Service, ServiceExt, service_fn};
use uuid::Uuid;

// === helpers ===

fn rollout_meta(rollout_id: &str) -> RouteMeta {
    RouteMeta {
        kind: RouteKind::ChatCompletions,
        project: None,
        rollout: Some(RolloutIds {
            rollout_id: rollout_id.into(),
            invocation_id: "inv1".into(),
            experiment_id: "exp1".into(),
            run_id: "run1".into(),
            row_id: "row1".into(),
        }),
        encoded_base_url: None,
    }
}

fn chat_request(rollout_id: Option<&str>, body: &'static str) -> Request<GatewayBody> {
    let mut req = Request::post("/chat/completions").body(body::full(body)).unwrap();
    let json = parse_chat_body(body.as_bytes()).unwrap();
    req.extensions_mut().insert(LlmRequest::new(Bytes::from_static(body.as_bytes()), json));
    match rollout_id {
        Some(r) => req.extensions_mut().insert(rollout_meta(r)),
        None => req.extensions_mut().insert(RouteMeta { rollout: None, ..rollout_meta("x") }),
    };
    req
}

/// A body of scripted frames (an `Err` entry ends it with an error).
struct Script {
    frames: VecDeque<Result<&'static str, &'static str>>,
}

impl Body for Script {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.frames.pop_front().map(|f| match f {
            Ok(data) => Ok(Frame::data(Bytes::from_static(data.as_bytes()))),
            Err(error) => Err(error.into()),
        }))
    }
}

fn response(status: u16, content_type: &str, frames: Vec<Result<&'static str, &'static str>>) -> Response<GatewayBody> {
    let mut response = Response::new(body::boxed(Script { frames: frames.into() }));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response.headers_mut().insert("content-type", content_type.parse().unwrap());
    response
}

const SSE: &[Result<&str, &str>] = &[
    Ok("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"),
    Ok("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n"),
    Ok("data: [DONE]\n\n"),
];

/// A store whose writes wait for a permit (the test opens the gate), over a `MemoryStore`.
struct GatedStore {
    inner: MemoryStore,
    gate: Semaphore,
    calls: watch::Sender<u32>,
}

impl Default for GatedStore {
    fn default() -> Self {
        Self { inner: MemoryStore::new(), gate: Semaphore::new(0), calls: watch::channel(0).0 }
    }
}

impl GatedStore {
    fn open(&self, n: usize) {
        self.gate.add_permits(n);
    }
    fn calls(&self) -> u32 {
        *self.calls.borrow()
    }
    /// Waits until the writer task has called the store `n` times.
    async fn called(&self, n: u32) {
        self.calls.subscribe().wait_for(|calls| *calls >= n).await.unwrap();
    }
}

impl InsertionStore for GatedStore {
    fn record_all<'a>(&'a self, insertions: &'a [Insertion]) -> StoreFuture<'a, ()> {
        self.calls.send_modify(|calls| *calls += 1);
        Box::pin(async move {
            self.gate.acquire().await?.forget();
            self.inner.record_all(insertions).await
        })
    }
    fn members<'a>(&'a self, rollout_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.inner.members(rollout_id)
    }
}

fn id_of<B>(response: &Response<B>) -> String {
    response.headers()["x-insertion-id"].to_str().unwrap().to_owned()
}

/// Polls a future once.
async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

// === request side ===

#[tokio::test]
async fn tags_extension_and_litellm_body_edit() {
    let store = Arc::new(MemoryStore::new());
    let seen = Arc::new(Mutex::new(None));
    let captured = seen.clone();
    let svc = InsertionIdLayer::new(store).layer(service_fn(move |req: Request<GatewayBody>| {
        *captured.lock().unwrap() = Some(req.extensions().clone());
        async { Ok::<_, BoxError>(response(200, "application/json", vec![Ok("{}")])) }
    }));
    let body = r#"{"model":"m","metadata":{"tags":["pre",7],"foo":"bar"},"messages":[]}"#;
    let res = svc.oneshot(chat_request(Some("r1"), body)).await.unwrap();
    let id = id_of(&res);
    let uuid = Uuid::parse_str(&id).unwrap();
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(id, uuid.hyphenated().to_string(), "lowercase, dashed");

    let ext = seen.lock().unwrap().take().unwrap();
    assert_eq!(ext.get::<InsertionId>().unwrap().0, uuid);
    let tags = ext.get::<RolloutTags>().unwrap();
    let expected = [
        "rollout_id:r1".to_owned(),
        format!("insertion_id:{id}"),
        "invocation_id:inv1".into(),
        "experiment_id:exp1".into(),
        "run_id:run1".into(),
        "row_id:row1".into(),
    ];
    assert_eq!(&tags.0[..], &expected[..]);

    // The bytes EncodeJson sends in each mode.
    let llm = ext.get::<LlmRequest>().unwrap();
    let edits = ext.get::<BodyEdits>();
    let litellm = encode(llm, edits, UpstreamMode::LiteLlm);
    let want = format!(
        r#"{{"model":"m","metadata":{{"tags":["pre",7,"rollout_id:r1","insertion_id:{id}","invocation_id:inv1","experiment_id:exp1","run_id:run1","row_id:row1"],"foo":"bar"}},"messages":[]}}"#
    );
    assert_eq!(std::str::from_utf8(&litellm).unwrap(), want);
    let openai = encode(llm, edits, UpstreamMode::OpenAi);
    assert_eq!(std::str::from_utf8(&openai).unwrap(), r#"{"model":"m","metadata":{"foo":"bar"},"messages":[]}"#);
}

#[tokio::test]
async fn metadata_and_tags_are_created_when_absent() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let captured = seen.clone();
    let svc =
        InsertionIdLayer::new(Arc::new(MemoryStore::new())).layer(service_fn(move |req: Request<GatewayBody>| {
            captured.lock().unwrap().push(req.extensions().clone());
            async { Ok::<_, BoxError>(response(200, "application/json", vec![Ok("{}")])) }
        }));
    // Earlier edits of other layers are kept.
    let mut req = chat_request(Some("r1"), r#"{"model":"m"}"#);
    let mut edits = BodyEdits::default();
    edits.set("model", "other".into(), llmgate_core::ext::EditScope::Always);
    req.extensions_mut().insert(edits);
    let a = svc.clone().oneshot(req).await.unwrap();
    let b = svc.oneshot(chat_request(Some("r1"), r#"{"model":"m","metadata":{"k":1}}"#)).await.unwrap();
    let (ida, idb) = (id_of(&a), id_of(&b));
    assert_ne!(ida, idb);

    let seen = seen.lock().unwrap();
    let tags = |id: &str| {
        format!(
            r#"["rollout_id:r1","insertion_id:{id}","invocation_id:inv1","experiment_id:exp1","run_id:run1","row_id:row1"]"#
        )
    };
    let enc = |i: usize, mode| {
        let ext = &seen[i];
        String::from_utf8(encode(ext.get::<LlmRequest>().unwrap(), ext.get::<BodyEdits>(), mode).to_vec()).unwrap()
    };
    assert_eq!(enc(0, UpstreamMode::LiteLlm), format!(r#"{{"model":"other","metadata":{{"tags":{}}}}}"#, tags(&ida)));
    assert_eq!(enc(0, UpstreamMode::OpenAi), r#"{"model":"other"}"#);
    assert_eq!(enc(1, UpstreamMode::LiteLlm), format!(r#"{{"model":"m","metadata":{{"k":1,"tags":{}}}}}"#, tags(&idb)));
    assert_eq!(enc(1, UpstreamMode::OpenAi), r#"{"model":"m","metadata":{"k":1}}"#);
}

#[tokio::test]
async fn requests_without_rollout_pass_untouched() {
    let store = Arc::new(MemoryStore::new());
    let layer = InsertionIdLayer::new(store.clone());
    let svc = layer.layer(service_fn(|req: Request<GatewayBody>| async move {
        assert!(req.extensions().get::<InsertionId>().is_none());
        assert!(req.extensions().get::<RolloutTags>().is_none());
        assert!(req.extensions().get::<BodyEdits>().is_none());
        Ok::<_, BoxError>(response(200, "application/json", vec![Ok("{}")]))
    }));
    let res = svc.clone().oneshot(chat_request(None, r#"{"model":"m"}"#)).await.unwrap();
    assert!(res.headers().get("x-insertion-id").is_none());
    // No RouteMeta at all.
    let res = svc.oneshot(Request::new(body::full("{}"))).await.unwrap();
    assert!(res.headers().get("x-insertion-id").is_none());
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "{}");
    assert_eq!(layer.counters().snapshot().recorded, 0);
}

// === recording ===

fn layer_with(
    store: Arc<dyn InsertionStore>,
    upstream: fn() -> Response<GatewayBody>,
) -> (
    InsertionIdLayer,
    impl Service<Request<GatewayBody>, Response = Response<llmgate_insertion_id::RecordBody<GatewayBody>>, Error = BoxError>
    + Clone,
) {
    let layer = InsertionIdLayer::new(store).record_timeout(Duration::from_secs(3600));
    let svc = layer.layer(service_fn(move |_req: Request<GatewayBody>| async move { Ok::<_, BoxError>(upstream()) }));
    (layer, svc)
}

#[tokio::test]
async fn json_2xx_is_recorded_before_its_last_frame_is_released() {
    let store = Arc::new(GatedStore::default());
    let (layer, svc) =
        layer_with(store.clone(), || response(201, "application/json", vec![Ok(r#"{"id":"#), Ok(r#""x"}"#)]));
    // The head goes out at once; nothing is recorded yet.
    let res = svc.oneshot(chat_request(Some("r-json"), r#"{"model":"m"}"#)).await.unwrap();
    let id = id_of(&res);
    assert_eq!(store.calls(), 0);
    let mut body = res.into_body();
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), r#"{"id":"#);
    // Without a content-length, the end of the stream waits for the record.
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), r#""x"}"#);
    let mut end = Box::pin(body.frame());
    assert!(poll_once(&mut end).await.is_pending());
    store.called(1).await;
    assert!(store.members("r-json").await.unwrap().is_empty());
    store.open(1);
    assert!(end.await.is_none());
    assert_eq!(store.members("r-json").await.unwrap(), [id]);
    let counters = layer.counters().snapshot();
    assert_eq!((counters.recorded, counters.retried, counters.failed), (1, 0, 0));
}

#[tokio::test]
async fn json_with_content_length_holds_the_frame_that_completes_it() {
    let store = Arc::new(GatedStore::default());
    let (_, svc) = layer_with(store.clone(), || {
        let mut r = response(200, "application/json", vec![Ok(r#"{"id":"#), Ok(r#""x"}"#), Ok("")]);
        r.headers_mut().insert("content-length", "10".parse().unwrap());
        r
    });
    let res = svc.oneshot(chat_request(Some("r-len"), "{}")).await.unwrap();
    let id = id_of(&res);
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    // The frame with the last byte is held (a client counting bytes would be done with it).
    let mut last = Box::pin(body.frame());
    assert!(poll_once(&mut last).await.is_pending());
    store.open(1);
    assert_eq!(last.await.unwrap().unwrap().into_data().unwrap(), r#""x"}"#);
    assert_eq!(store.members("r-len").await.unwrap(), [id]);
}

#[tokio::test]
async fn json_cut_short_or_dropped_is_not_recorded() {
    let store = Arc::new(MemoryStore::new());
    let (layer, svc) = layer_with(store.clone(), || {
        let mut r = response(200, "application/json", vec![Ok(r#"{"id":"#), Err("upstream reset")]);
        r.headers_mut().insert("content-length", "100".parse().unwrap());
        r
    });
    let res = svc.clone().oneshot(chat_request(Some("r-cut"), "{}")).await.unwrap();
    assert!(res.into_body().collect().await.is_err());
    // A client that goes away before the end.
    let res = svc.oneshot(chat_request(Some("r-cut"), "{}")).await.unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    tokio::task::yield_now().await;
    assert!(store.members("r-cut").await.unwrap().is_empty());
    assert_eq!(layer.counters().snapshot(), Default::default());
}

#[tokio::test]
async fn errors_are_never_recorded() {
    for status in [400, 404, 429, 500, 503] {
        let store = Arc::new(MemoryStore::new());
        let layer = InsertionIdLayer::new(store.clone());
        let svc = layer.layer(service_fn(move |_req: Request<GatewayBody>| async move {
            Ok::<_, BoxError>(response(status, "application/json", vec![Ok(r#"{"error":{}}"#)]))
        }));
        let res = svc.oneshot(chat_request(Some("r-err"), r#"{"model":"m"}"#)).await.unwrap();
        assert_eq!(res.status().as_u16(), status);
        Uuid::parse_str(&id_of(&res)).unwrap();
        res.into_body().collect().await.unwrap();
        assert!(store.members("r-err").await.unwrap().is_empty(), "{status}");
        assert_eq!(layer.counters().snapshot().recorded, 0);
    }
    // An SSE content type on an error status is not recorded either.
    let store = Arc::new(MemoryStore::new());
    let (_, svc) = layer_with(store.clone(), || response(500, "text/event-stream", SSE.to_vec()));
    let res = svc.oneshot(chat_request(Some("r-err"), "{}")).await.unwrap();
    res.into_body().collect().await.unwrap();
    assert!(store.members("r-err").await.unwrap().is_empty());
}

#[tokio::test]
async fn sse_is_recorded_before_the_done_frame_is_released() {
    let store = Arc::new(GatedStore::default());
    let (layer, svc) = layer_with(store.clone(), || response(200, "text/event-stream; charset=utf-8", SSE.to_vec()));
    let res = svc.oneshot(chat_request(Some("r-sse"), r#"{"model":"m","stream":true}"#)).await.unwrap();
    let id = id_of(&res);
    assert_eq!(store.calls(), 0, "nothing recorded before the stream ends");
    let mut body = res.into_body();
    // Frames before [DONE] pass straight through.
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), SSE[0].unwrap());
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), SSE[1].unwrap());
    assert_eq!(store.calls(), 0);
    // The [DONE] frame waits for the record.
    let mut done = Box::pin(body.frame());
    assert!(poll_once(&mut done).await.is_pending());
    store.called(1).await;
    store.open(1);
    let frame = done.await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(frame, "data: [DONE]\n\n");
    // When the client holds [DONE], the id is in the store.
    assert_eq!(store.members("r-sse").await.unwrap(), [id]);
    assert!(body.frame().await.is_none());
    assert_eq!(layer.counters().snapshot().recorded, 1);
}

#[tokio::test]
async fn sse_without_done_is_recorded_at_its_end() {
    let store = Arc::new(GatedStore::default());
    let (_, svc) = layer_with(store.clone(), || {
        response(
            200,
            "text/event-stream",
            vec![Ok("event: message_start\ndata: {}\n\n"), Ok("data: {\"stop\":true}\n\n")],
        )
    });
    let res = svc.oneshot(chat_request(Some("r-end"), "{}")).await.unwrap();
    let id = id_of(&res);
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    body.frame().await.unwrap().unwrap();
    let mut end = Box::pin(body.frame());
    assert!(poll_once(&mut end).await.is_pending(), "the end of stream waits for the record");
    store.open(1);
    assert!(end.await.is_none());
    assert_eq!(store.members("r-end").await.unwrap(), [id]);
}

#[tokio::test]
async fn sse_single_full_body_is_recorded() {
    // A body that says it is at its end after one frame: that frame is held.
    let store = Arc::new(MemoryStore::new());
    let (_, svc) = layer_with(store.clone(), || {
        let mut r = Response::new(body::full("data: {}\n\ndata: [DONE]\n\n"));
        r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        r
    });
    let res = svc.oneshot(chat_request(Some("r-full"), "{}")).await.unwrap();
    let id = id_of(&res);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, "data: {}\n\ndata: [DONE]\n\n");
    assert_eq!(store.members("r-full").await.unwrap(), [id]);
}

#[tokio::test]
async fn erroring_sse_stream_is_not_recorded() {
    let store = Arc::new(MemoryStore::new());
    let (layer, svc) = layer_with(store.clone(), || {
        response(200, "text/event-stream", vec![Ok("data: {}\n\n"), Err("upstream reset")])
    });
    let res = svc.oneshot(chat_request(Some("r-cut"), "{}")).await.unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    assert!(body.frame().await.unwrap().is_err());
    assert!(store.members("r-cut").await.unwrap().is_empty());
    assert_eq!(layer.counters().snapshot(), Default::default());
}

#[tokio::test]
async fn dropped_sse_stream_is_not_recorded() {
    let store = Arc::new(MemoryStore::new());
    let (layer, svc) = layer_with(store.clone(), || response(200, "text/event-stream", SSE.to_vec()));
    let res = svc.oneshot(chat_request(Some("r-gone"), "{}")).await.unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body); // the client went away
    tokio::task::yield_now().await;
    assert!(store.members("r-gone").await.unwrap().is_empty());
    assert_eq!(layer.counters().snapshot(), Default::default());
}

// === slow or failing store ===

#[tokio::test(start_paused = true)]
async fn slow_store_times_out_then_records_in_the_background() {
    let store = Arc::new(GatedStore::default());
    let layer = InsertionIdLayer::new(store.clone())
        .record_timeout(Duration::from_millis(250))
        .retry_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let svc = layer.layer(service_fn(|_req: Request<GatewayBody>| async {
        Ok::<_, BoxError>(response(200, "application/json", vec![Ok("{}")]))
    }));
    // The store never answers in time: the response completes anyway (the paused clock jumps
    // the 250 ms).
    let res = svc.clone().oneshot(chat_request(Some("r-slow"), "{}")).await.unwrap();
    let id = id_of(&res);
    res.into_body().collect().await.unwrap();
    let sse = layer.layer(service_fn(|_req: Request<GatewayBody>| async {
        Ok::<_, BoxError>(response(200, "text/event-stream", SSE.to_vec()))
    }));
    let res = sse.oneshot(chat_request(Some("r-slow"), "{}")).await.unwrap();
    let id2 = id_of(&res);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes().len(),
        SSE.iter().map(|f| f.unwrap().len()).sum::<usize>()
    );

    let snapshot = layer.counters().snapshot();
    assert_eq!((snapshot.recorded, snapshot.retried, snapshot.pending), (0, 2, 2));
    assert!(snapshot.failed >= 2);
    // Nothing until the store comes back; then the queue drains.
    assert!(!layer.flush(tokio::time::Instant::now() + Duration::from_secs(10)).await);
    assert!(store.members("r-slow").await.unwrap().is_empty());
    store.open(2);
    assert!(layer.flush(tokio::time::Instant::now() + Duration::from_secs(3600)).await);
    let mut members = store.members("r-slow").await.unwrap();
    members.sort();
    let mut want = vec![id, id2];
    want.sort();
    assert_eq!(members, want);
    let snapshot = layer.counters().snapshot();
    assert_eq!((snapshot.recorded, snapshot.pending, snapshot.dropped), (2, 0, 0));
}

/// A store that fails `n` times, then works.
struct Flaky {
    inner: MemoryStore,
    failures: Mutex<u32>,
}

impl InsertionStore for Flaky {
    fn record_all<'a>(&'a self, insertions: &'a [Insertion]) -> StoreFuture<'a, ()> {
        let mut failures = self.failures.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Box::pin(async { Err("connection refused".into()) });
        }
        self.inner.record_all(insertions)
    }
    fn members<'a>(&'a self, rollout_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.inner.members(rollout_id)
    }
}

#[tokio::test(start_paused = true)]
async fn failing_store_is_retried_with_backoff_until_success() {
    let store = Arc::new(Flaky { inner: MemoryStore::new(), failures: Mutex::new(6) });
    let layer = InsertionIdLayer::new(store.clone());
    let svc = layer.layer(service_fn(|_req: Request<GatewayBody>| async {
        Ok::<_, BoxError>(response(200, "application/json", vec![Ok("{}")]))
    }));
    let res = svc.oneshot(chat_request(Some("r-flaky"), "{}")).await.unwrap();
    let id = id_of(&res);
    res.into_body().collect().await.unwrap();
    assert!(store.members("r-flaky").await.unwrap().is_empty());
    assert!(layer.flush(tokio::time::Instant::now() + Duration::from_secs(3600)).await);
    assert_eq!(store.members("r-flaky").await.unwrap(), [id]);
    let snapshot = layer.counters().snapshot();
    assert_eq!(snapshot.recorded, 1);
    assert_eq!(snapshot.retried, 1);
    assert_eq!(snapshot.failed, 6);
    assert_eq!(snapshot.pending, 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_counted_not_silent() {
    let store = Arc::new(GatedStore::default());
    let layer = InsertionIdLayer::with_queue_capacity(store.clone(), 1).record_timeout(Duration::from_millis(10));
    let svc = layer.layer(service_fn(|_req: Request<GatewayBody>| async {
        Ok::<_, BoxError>(response(200, "application/json", vec![Ok("{}")]))
    }));
    for _ in 0..4 {
        let res = svc.clone().oneshot(chat_request(Some("r-full-q"), "{}")).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
    let snapshot = layer.counters().snapshot();
    // One id is in the worker's hands, one in the queue; the others could not be queued.
    assert_eq!(snapshot.retried + snapshot.dropped, 4);
    assert!(snapshot.dropped >= 1, "{snapshot:?}");
    assert_eq!(snapshot.pending, snapshot.retried);
}
