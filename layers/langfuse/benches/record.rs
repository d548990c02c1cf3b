//! Per-request cost of recording: the two Langfuse layers around an in-memory upstream (span
//! building, JSON metadata, enqueueing), against the same stack without them. The exporter
//! points at a closed port with no retries, so batches are dropped quickly and memory stays
//! bounded; its drain task (prost encoding, gzip) runs on a separate runtime thread.

use std::{hint::black_box, sync::Arc, time::Duration};

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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // The exporter's drain task runs on its own thread, as it would on a multi-threaded server,
    // so the numbers are the request path's cost (span building and enqueueing).
    let background = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let catalog = Arc::new(Catalog::new([ModelSpec {
        name: MODEL.into(),
        pricing: Some(Pricing { input_per_1m: 0.15, output_per_1m: 0.6 }),
        ..Default::default()
    }]));
    let mut group = c.benchmark_group("record");
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("baseline_no_langfuse", |b| {
        let svc = upstream();
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                let response = svc.oneshot(request()).await.unwrap();
                black_box(response.into_body().collect().await.unwrap().to_bytes());
                // Let the background drain task run, as real I/O would.
                tokio::task::yield_now().await;
            }
        });
    });
    group.bench_function("langfuse_root_and_generation", |b| {
        let exporter = background.block_on(async {
            let config = ExporterConfig::new("http://127.0.0.1:1")
                .max_queue_spans(8192)
                .max_retries(0)
                .schedule_delay(Duration::from_secs(1));
            LangfuseExporter::spawn(config, LangfuseClient::http())
        });
        let svc = ServiceBuilder::new()
            .layer(LangfuseLayer::new(exporter.clone()))
            .layer(LangfuseAttemptLayer::new().catalog(catalog.clone()))
            .service(upstream());
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                let response = svc.oneshot(request()).await.unwrap();
                black_box(response.into_body().collect().await.unwrap().to_bytes());
                // Let the background drain task run, as real I/O would.
                tokio::task::yield_now().await;
            }
        });
        let snapshot = exporter.snapshot();
        assert!(snapshot.queue_depth < 8192, "the drain task keeps up: {snapshot:?}");
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
