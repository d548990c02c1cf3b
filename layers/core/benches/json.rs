//! The cost of reading a chat body once and writing it once per attempt, for a typical body
//! (~2 KiB, a few messages) and a large one (~1 MiB, a long conversation):
//!
//! - `parse_chat_body` alone, and the `DecodeJson` service call (read behind the limit, parse,
//!   insert `LlmRequest`);
//! - `encode` with the edits a rollout request carries: a model swap (fallback) plus the
//!   `metadata` edit for a `litellm` upstream; and a model swap to an `openai` upstream, which
//!   also drops the client's `metadata.tags`; and the `EncodeJson` service call (litellm).
//!
//! `cargo bench -p llmgate-core --bench json`

use std::{hint::black_box, time::Duration};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::Body;
use llmgate_core::{
    BoxError, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, body,
    ext::{BodyEdits, EditScope, LlmRequest, UpstreamMode, UpstreamTarget},
    json::{encode, parse_chat_body},
};
use serde_json::json;
use tower::{Layer, Service, ServiceExt, service_fn};

/// Chat text with what makes JSON escaping work: quotes, newlines, a tab, non-ASCII.
const PARAGRAPH: &str = "The gateway reads the request once and writes it once per attempt. \
    A \"fallback\" attempt may go to another upstream, so the edits are kept apart.\n\
    Café-style prose with a tab\there and numbers like 3.14159 and 2025-06-01.\n";

fn text(bytes: usize) -> String {
    PARAGRAPH.chars().cycle().take(bytes).collect()
}

/// A chat body: a system prompt and `turns` user/assistant messages of `turn_bytes` each.
fn chat_body(system: usize, turns: usize, turn_bytes: usize) -> Bytes {
    let mut messages = vec![json!({"role": "system", "content": text(system)})];
    for turn in 0..turns {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text(turn_bytes)}));
    }
    let body = json!({
        "model": "accounts/fireworks/models/llama-v3p1-70b-instruct",
        "messages": messages,
        "temperature": 0.2,
        "max_tokens": 1024,
        "stream": false,
        "metadata": {"tags": ["team:eval", "dataset:gsm8k"], "session_id": "s-0193b2c4"},
    });
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

/// The edits a rollout request reaching a fallback model carries: the model swap (every
/// upstream) and the `metadata` the insertion-id layer sets for `litellm` upstreams.
fn rollout_edits() -> BodyEdits {
    let mut edits = BodyEdits::default();
    edits.set("model", "accounts/fireworks/models/llama-v3p1-8b-instruct".into(), EditScope::Always);
    let tags = [
        "team:eval",
        "dataset:gsm8k",
        "rollout_id:rollout-0193b2c4",
        "insertion_id:0193b2c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d",
        "invocation_id:inv-42",
        "experiment_id:exp-gsm8k-2025-06",
        "run_id:run-3",
        "row_id:row-000123",
    ];
    edits.set("metadata", json!({"tags": tags, "session_id": "s-0193b2c4"}), EditScope::Mode(UpstreamMode::LiteLlm));
    edits
}

fn target(mode: UpstreamMode) -> UpstreamTarget {
    UpstreamTarget { name: "fireworks".into(), base_url: "http://127.0.0.1:1".into(), mode, api_key: None }
}

fn echo() -> impl Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError, Future: Send> + Clone
{
    service_fn(|req: Request<GatewayBody>| async move { Ok::<_, BoxError>(Response::new(req.into_body())) })
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let edits = rollout_edits();
    let decode = DecodeJsonLayer::new().layer(echo());
    let encode_svc = EncodeJsonLayer::new().layer(echo());

    let typical = chat_body(300, 4, 380);
    let large = chat_body(4 * 1024, 64, 16 * 1024);
    assert!((1800..2400).contains(&typical.len()), "typical body is {} bytes", typical.len());
    assert!((1000 * 1024..1100 * 1024).contains(&large.len()), "large body is {} bytes", large.len());

    for (name, raw, samples, time) in
        [("typical 2 KiB", &typical, 100, Duration::from_secs(3)), ("large 1 MiB", &large, 20, Duration::from_secs(5))]
    {
        let request = LlmRequest::new(raw.clone(), parse_chat_body(raw).unwrap());
        // The edits must change the bytes, or `encode` would hand back the client's bytes.
        let litellm = encode(&request, Some(&edits), UpstreamMode::LiteLlm);
        let openai = encode(&request, Some(&edits), UpstreamMode::OpenAi);
        assert!(litellm != *raw && openai != *raw && openai.len() < litellm.len());

        let mut group = c.benchmark_group(format!("json/{name}"));
        group.throughput(Throughput::Bytes(raw.len() as u64)).sample_size(samples).measurement_time(time);
        group.bench_function("parse_chat_body", |b| b.iter(|| parse_chat_body(black_box(raw)).unwrap()));
        group.bench_function("DecodeJson call", |b| {
            b.iter(|| {
                let req = Request::new(body::full(raw.clone()));
                runtime.block_on(decode.clone().oneshot(req)).unwrap()
            })
        });
        group.bench_function("encode litellm: model + metadata", |b| {
            b.iter(|| encode(black_box(&request), Some(&edits), UpstreamMode::LiteLlm))
        });
        group.bench_function("encode openai: model, tags dropped", |b| {
            b.iter(|| encode(black_box(&request), Some(&edits), UpstreamMode::OpenAi))
        });
        group.bench_function("EncodeJson call (litellm)", |b| {
            b.iter_batched(
                || {
                    let mut req = Request::new(body::empty());
                    let ext = req.extensions_mut();
                    ext.insert(request.clone());
                    ext.insert(edits.clone());
                    ext.insert(target(UpstreamMode::LiteLlm));
                    req
                },
                // The response (holding the written body) is dropped inside the timing, as
                // `encode`'s output is above: holding a batch of 1 MiB bodies would time page
                // faults instead.
                |req| runtime.block_on(encode_svc.clone().oneshot(req)).unwrap().into_body().size_hint().exact(),
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
