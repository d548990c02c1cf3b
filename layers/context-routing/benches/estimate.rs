//! The cost of the context-routing estimate: a small request (fast path, nothing tokenized) and
//! a 1 MiB prompt (tokenized with o200k_base; and the bytes estimate for a Gemini model).
//!
//! `cargo bench -p llmgate-context-routing -- --quick`

use std::{hint::black_box, sync::Arc};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use llmgate_context_routing::{ContextRoutingLayer, default_catalog, estimate};
use llmgate_core::{
    BoxError, GatewayBody, body,
    catalog::{Catalog, ModelSpec},
    ext::LlmRequest,
};
use serde_json::{Map, Value, json};
use tower::{Layer, Service, ServiceExt, service_fn};

/// Deterministic English-like text of about `bytes` bytes.
fn prose(bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "request",
        "gateway",
        "context",
        "window",
        "token",
        "of",
        "and",
        "to",
        "a",
        "in",
        "is",
        "that",
        "for",
        "routing",
        "fallback",
        "estimate",
        "with",
        "upstream",
        "response",
        "stream",
        "latency",
        "budget",
        "provider",
        "larger",
        "smaller",
        "chain",
        "catalogue",
        "price",
        "Kubernetes",
        "configuration",
        "2025",
        "error",
        "retry",
        "JSON",
    ];
    let mut out = String::with_capacity(bytes + 16);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut n = 0u32;
    while out.len() < bytes {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        out.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
        n += 1;
        out.push_str(match n % 17 {
            0 => ".\n",
            5 | 11 => ", ",
            _ => " ",
        });
    }
    out
}

fn request(model: &str, system: usize, user: usize) -> Map<String, Value> {
    match json!({
        "model": model,
        "max_tokens": 1024,
        "messages": [
            {"role": "system", "content": prose(system)},
            {"role": "user", "content": prose(user)},
        ],
    }) {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

fn spec(name: &str) -> ModelSpec {
    default_catalog().into_iter().find(|m| m.name == name).unwrap()
}

fn bench(c: &mut Criterion) {
    llmgate_context_routing::warm_up();
    let gpt4o = spec("gpt-4o");
    let gemini = spec("gemini/gemini-2.5-flash");

    let small = request("gpt-4o", 1024, 3 * 1024);
    let raw = serde_json::to_vec(&small).unwrap();
    assert!((4000..4300).contains(&raw.len()), "{}", raw.len());
    assert_eq!(estimate::estimate(&small, &gpt4o).method, estimate::Method::Bound);
    c.bench_function("estimate 4 KiB request, fast path (gpt-4o)", |b| {
        b.iter(|| estimate::estimate(black_box(&small), black_box(&gpt4o)))
    });

    let large = request("gpt-4o", 1024, 1024 * 1024 - 1024);
    let sampled = estimate::estimate(&large, &gpt4o);
    assert_eq!(sampled.method, estimate::Method::Sampled);
    // A window just over the exact count: the sample lands near it, so the text is counted.
    let near = ModelSpec { context_window: Some(sampled.tokens), ..gpt4o.clone() };
    assert_eq!(estimate::estimate(&large, &near).method, estimate::Method::Tokenizer);
    eprintln!("1 MiB prompt: about {} o200k tokens (sampled, + overheads)", sampled.tokens);
    let mut group = c.benchmark_group("1 MiB");
    group.sample_size(10);
    group.bench_function("estimate 1 MiB prompt, o200k_base sampled (gpt-4o, far over its window)", |b| {
        b.iter(|| estimate::estimate(black_box(&large), black_box(&gpt4o)))
    });
    group.bench_function("estimate 1 MiB prompt, o200k_base exact (a window near its count)", |b| {
        b.iter(|| estimate::estimate(black_box(&large), black_box(&near)))
    });
    group.bench_function("estimate 1 MiB prompt, bytes estimate (gemini)", |b| {
        b.iter(|| estimate::estimate(black_box(&large), black_box(&gemini)))
    });
    group.finish();

    // The whole layer on the small request: estimate, extensions, boxed future, parts clone.
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let catalog = Arc::new(Catalog::new(default_catalog()));
    let svc = ContextRoutingLayer::new(catalog)
        .layer(service_fn(|_req: Request<GatewayBody>| async { Ok::<_, BoxError>(Response::new(body::empty())) }));
    let raw = Bytes::from(raw);
    let llm = LlmRequest::new(raw.clone(), small.clone());
    c.bench_function("layer call, 4 KiB request (gpt-4o)", |b| {
        b.iter(|| {
            let mut req = Request::new(body::full(raw.clone()));
            req.extensions_mut().insert(llm.clone());
            let mut svc = svc.clone();
            runtime.block_on(async move { svc.ready().await.unwrap().call(req).await.unwrap() })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
