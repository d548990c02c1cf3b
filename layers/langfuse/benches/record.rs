//! Per-request cost of recording: the two Langfuse layers around an in-memory upstream, against
//! the same stack without them.
//!
//! - `langfuse_root_and_generation` is the request path: what the layers do on the request's
//!   task (trace context, attempt info, the body tap, the one queue push). Requests run in
//!   chunks; between chunks, untimed, the exporter is flushed, so no request meets a full
//!   queue (which would time the cheap drop instead).
//! - `recorded_and_exported` times the chunks and their flushes: the request path plus the
//!   exporter's work (writing the spans, gzip; partly in parallel on the second core), per
//!   request. The exporter points at a closed port with no retries, so the send fails at once.
//!
//! The exporter runs on its own runtime thread, as it would on a multi-threaded server, and
//! memory comes from mimalloc, the gateway binary's allocator.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, body,
    catalog::{Catalog, ModelSpec, Pricing},
    ext::{InsertionId, LangfuseKeys, LlmRequest, ModelChoice, Project, RolloutTags, Secret},
};
use llmgate_langfuse::{ExporterConfig, LangfuseAttemptLayer, LangfuseClient, LangfuseExporter, LangfuseLayer};
use serde_json::{Value, json};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MODEL: &str = "openai/gpt-4o-mini";

fn request() -> Request<GatewayBody> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "x".repeat(2000)}],
        "temperature": 0.2,
        "user": "user-1",
        "metadata": {"tags": ["a", "b"], "session_id": "s1"},
    });
    let raw = Bytes::from(body.to_string());
    let Value::Object(map) = body else { unreachable!() };
    let mut req = Request::new(body::full(raw.clone()));
    let ext = req.extensions_mut();
    ext.insert(LlmRequest::new(raw, map));
    ext.insert(ModelChoice { requested: Arc::from(MODEL), current: Arc::from(MODEL), attempt: 1 });
    ext.insert(Project {
        id: Arc::from("p1"),
        langfuse: LangfuseKeys { public_key: Arc::from("pk-lf-1"), secret_key: Secret::new("sk-lf-1") },
    });
    let id = InsertionId(uuid::Uuid::now_v7());
    ext.insert(id);
    let tags: Vec<String> =
        ["rollout_id:r", "insertion_id:i", "invocation_id:v", "experiment_id:e", "run_id:u", "row_id:w"]
            .map(String::from)
            .into();
    ext.insert(RolloutTags(tags.into()));
    req
}

fn upstream()
-> impl Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError, Future: Send> + Clone {
    let reply = Bytes::from(
        json!({"id": "c1", "choices": [{"message": {"role": "assistant", "content": "y".repeat(1000)}}],
               "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}})
        .to_string(),
    );
    service_fn(move |_req: Request<GatewayBody>| {
        let reply = reply.clone();
        async move {
            let mut response = Response::new(body::full(reply));
            response.headers_mut().insert("content-type", "application/json".parse().unwrap());
            Ok::<_, BoxError>(response)
        }
    })
}

/// Requests per chunk: 2 spans each, well under the queue's 8192.
const CHUNK: u64 = 1000;

async fn one_request(svc: impl Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError>) {
    let response = svc.oneshot(request()).await.unwrap();
    black_box(response.into_body().collect().await.unwrap().to_bytes());
    // Let other tasks run, as real I/O would.
    tokio::task::yield_now().await;
}

/// Runs `iters` requests in chunks, flushing the exporter after each; times the requests, and
/// the flushes too when `with_export`.
async fn chunks<S>(svc: S, exporter: LangfuseExporter, iters: u64, with_export: bool) -> Duration
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError> + Clone,
{
    let mut timed = Duration::ZERO;
    for chunk in (0..iters).step_by(CHUNK as usize) {
        let start = Instant::now();
        for _ in chunk..iters.min(chunk + CHUNK) {
            one_request(svc.clone()).await;
        }
        let requests = start.elapsed();
        assert!(exporter.flush(tokio::time::Instant::now() + Duration::from_secs(60)).await, "flushed");
        timed += if with_export { start.elapsed() } else { requests };
    }
    timed
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let background = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let catalog = Arc::new(Catalog::new([ModelSpec {
        name: MODEL.into(),
        pricing: Some(Pricing { input_per_1m: 0.15, output_per_1m: 0.6 }),
        ..Default::default()
    }]));
    let recording = || {
        let exporter = background.block_on(async {
            let config = ExporterConfig::new("http://127.0.0.1:1")
                .max_queue_spans(8192)
                .max_retries(0)
                .schedule_delay(Duration::from_secs(3600));
            LangfuseExporter::spawn(config, LangfuseClient::http())
        });
        let svc = ServiceBuilder::new()
            .layer(LangfuseLayer::new(exporter.clone()))
            .layer(LangfuseAttemptLayer::new().catalog(catalog.clone()))
            .service(upstream());
        (exporter, svc)
    };
    let mut group = c.benchmark_group("record");
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("baseline_no_langfuse", |b| {
        let svc = upstream();
        b.to_async(&rt).iter(|| one_request(svc.clone()));
    });
    for (name, with_export) in [("langfuse_root_and_generation", false), ("recorded_and_exported", true)] {
        group.bench_function(name, |b| {
            let (exporter, svc) = recording();
            b.to_async(&rt).iter_custom(|iters| chunks(svc.clone(), exporter.clone(), iters, with_export));
            assert_eq!(exporter.snapshot().dropped, 0, "no request met a full queue");
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
