//! Per-request cost of insertion ids: minting an id with its six tags, recording it in the
//! in-process store and in Redis (one SADD/EXPIRE pipeline, one round trip to a real redis-server
//! on loopback, started by test-support), and the whole layer on a JSON completion (mint, tags,
//! `metadata` body edit, header, in-line record) against the same upstream without it.
//!
//! `cargo bench -p llmgate-insertion-id --bench record`

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, body,
    ext::{LlmRequest, RolloutIds, RouteKind, RouteMeta},
    json::parse_chat_body,
};
use llmgate_insertion_id::{
    INSERTION_ID_HEADER, InsertionIdLayer, InsertionStore, MemoryStore, RedisStore, rollout_tags,
};
use llmgate_test_support::redis::RedisServer;
use tower::{Layer, Service, ServiceExt, service_fn};
use uuid::Uuid;

/// Rollouts the records cycle through, so sets stay small as in real traffic.
const ROLLOUTS: usize = 1024;

fn rollout_ids(n: usize) -> RolloutIds {
    RolloutIds {
        rollout_id: format!("rollout-{n:06}"),
        invocation_id: "inv-42".into(),
        experiment_id: "exp-gsm8k-2025-06".into(),
        run_id: "run-3".into(),
        row_id: format!("row-{n:06}"),
    }
}

/// Records a fresh id (as every completion has) into the next rollout's set.
async fn record_fresh(store: &dyn InsertionStore, rollouts: &[String], next: &AtomicUsize) -> usize {
    let mut id = [0u8; 36];
    let id = Uuid::now_v7().hyphenated().encode_lower(&mut id);
    let rollout = next.fetch_add(1, Ordering::Relaxed) % rollouts.len();
    store.record(&rollouts[rollout], id).await.unwrap();
    rollout
}

fn upstream()
-> impl Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError, Future: Send> + Clone {
    let reply = Bytes::from(
        serde_json::json!({
            "id": "chatcmpl-AbC123",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is 42. ".repeat(50)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 512, "completion_tokens": 230, "total_tokens": 742},
        })
        .to_string(),
    );
    service_fn(move |_req: Request<GatewayBody>| {
        let mut response = Response::new(body::full(reply.clone()));
        response.headers_mut().insert(http::header::CONTENT_TYPE, "application/json".parse().unwrap());
        async move { Ok::<_, BoxError>(response) }
    })
}

/// A rollout chat request as `PathMetadata` and `DecodeJson` leave it.
fn request(meta: &RouteMeta, llm: &LlmRequest) -> Request<GatewayBody> {
    let mut req = Request::post("/chat/completions").body(body::full(llm.raw().clone())).unwrap();
    req.extensions_mut().insert(meta.clone());
    req.extensions_mut().insert(llm.clone());
    req
}

/// Sends one request through `svc` and drains the response.
async fn complete<S, B>(svc: S, req: Request<GatewayBody>) -> bool
where
    S: Service<Request<GatewayBody>, Response = Response<B>, Error = BoxError>,
    B: Body<Data = Bytes, Error: std::fmt::Debug>,
{
    let response = svc.oneshot(req).await.unwrap();
    let tagged = response.headers().contains_key(INSERTION_ID_HEADER);
    black_box(response.into_body().collect().await.unwrap());
    tagged
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rollouts: Vec<String> = (0..ROLLOUTS).map(|n| rollout_ids(n).rollout_id).collect();

    let ids = rollout_ids(7);
    c.bench_function("mint id (UUIDv7)", |b| b.iter(Uuid::now_v7));
    c.bench_function("mint id + six tags", |b| {
        b.iter(|| {
            let id = Uuid::now_v7().hyphenated().to_string();
            rollout_tags(black_box(&ids), &id)
        })
    });

    let mut group = c.benchmark_group("record fresh id");
    // A short TTL so the memory store's sweep keeps it bounded however many iterations run.
    let memory = MemoryStore::new().ttl(Duration::from_millis(100));
    let next = AtomicUsize::new(0);
    group.bench_function("memory", |b| b.to_async(&runtime).iter(|| record_fresh(&memory, &rollouts, &next)));

    let server = RedisServer::start();
    // The production constructor (lazy connection manager, 1 s timeouts); it needs a runtime.
    let redis = {
        let _runtime = runtime.enter();
        RedisStore::single_node(server.url()).unwrap().ttl(Duration::from_secs(60))
    };
    let rollout = runtime.block_on(record_fresh(&redis, &rollouts, &next));
    assert_eq!(runtime.block_on(redis.members(&rollouts[rollout])).unwrap().len(), 1);
    group.bench_function("redis (one pipeline round trip)", |b| {
        b.to_async(&runtime).iter(|| record_fresh(&redis, &rollouts, &next))
    });
    group.finish();

    let raw = Bytes::from_static(
        br#"{"model":"accounts/fireworks/models/llama-v3p1-70b-instruct","messages":[{"role":"system","content":"You are a careful math tutor."},{"role":"user","content":"Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"}],"temperature":0.2,"metadata":{"tags":["team:eval"],"session_id":"s-1"}}"#,
    );
    let llm = LlmRequest::new(raw.clone(), parse_chat_body(&raw).unwrap());
    let meta = RouteMeta {
        kind: RouteKind::ChatCompletions,
        project: Some("proj-7f3a".into()),
        rollout: Some(ids),
        encoded_base_url: None,
    };
    let memory: Arc<dyn InsertionStore> = Arc::new(MemoryStore::new().ttl(Duration::from_millis(100)));
    let redis: Arc<dyn InsertionStore> = Arc::new(redis);
    let mut group = c.benchmark_group("JSON completion");
    group.bench_function("upstream alone", |b| {
        let svc = upstream();
        b.to_async(&runtime).iter(|| complete(svc.clone(), request(&meta, &llm)))
    });
    for (name, store) in [("insertion-id layer, memory store", memory), ("insertion-id layer, redis store", redis)] {
        let svc = InsertionIdLayer::new(store).layer(upstream());
        assert!(runtime.block_on(complete(svc.clone(), request(&meta, &llm))), "{name}: the response is tagged");
        group.bench_function(name, |b| b.to_async(&runtime).iter(|| complete(svc.clone(), request(&meta, &llm))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
