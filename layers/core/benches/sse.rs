//! The cost of finding usage in upstream responses:
//!
//! - the SSE scanner per frame: an OpenAI content chunk without usage, the same chunk with
//!   `"usage":null` (what OpenAI sends in every chunk when `stream_options.include_usage` is on),
//!   that chunk split over two frames (the carry-over path), and the final usage chunk with
//!   `data: [DONE]`;
//! - the whole tap (`usage::tap`) on a 103-frame stream and on a JSON completion, against the
//!   same body drained without it.
//!
//! `cargo bench -p llmgate-core --bench sse`

use std::{
    collections::VecDeque,
    convert::Infallible,
    hint::black_box,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::Response;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use llmgate_core::{
    GatewayBody, body,
    usage::{self, SseScanner, Usage},
};

const ROLE: &str = "data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n";
const CONTENT: &str = "data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" the\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";
const CONTENT_USAGE_NULL: &str = "data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" the\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n";
const FINAL_AND_DONE: &str = "data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[],\"usage\":{\"prompt_tokens\":1017,\"completion_tokens\":412,\"total_tokens\":1429,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\ndata: [DONE]\n\n";
const USAGE: Usage = Usage { input: 1017, output: 412, total: 1429 };
const CONTENT_FRAMES: usize = 100;

/// A response body that yields the given frames one by one, each ready at once.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn response(frames: &[Bytes], content_type: &'static str) -> Response<GatewayBody> {
    let mut response = Response::new(body::boxed(Frames(frames.iter().cloned().collect())));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

async fn drain(mut body: GatewayBody) {
    while let Some(frame) = body.frame().await {
        black_box(frame.unwrap());
    }
}

/// A scanner fed `frames` (then finished) found this usage and `[DONE]`: checked before timing.
fn scanned(frames: &[&[u8]]) -> (Option<Usage>, bool) {
    let mut scanner = SseScanner::default();
    frames.iter().for_each(|f| scanner.feed(f));
    scanner.finish();
    (scanner.usage(), scanner.saw_done())
}

fn scanner_benches(c: &mut Criterion) {
    let (head, tail) = CONTENT_USAGE_NULL.as_bytes().split_at(CONTENT_USAGE_NULL.len() / 2);
    assert_eq!(scanned(&[CONTENT.as_bytes(), CONTENT_USAGE_NULL.as_bytes(), head, tail]), (None, false));
    assert_eq!(scanned(&[head, tail, FINAL_AND_DONE.as_bytes()]), (Some(USAGE), true));

    let mut group = c.benchmark_group("sse scanner, per frame");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in [("content chunk", CONTENT), ("content chunk with \"usage\":null", CONTENT_USAGE_NULL)] {
        let mut scanner = SseScanner::default();
        group.bench_function(name, |b| b.iter(|| scanner.feed(black_box(frame.as_bytes()))));
    }
    let mut scanner = SseScanner::default();
    group.bench_function("content chunk with \"usage\":null, split over two frames", |b| {
        b.iter(|| {
            scanner.feed(black_box(head));
            scanner.feed(black_box(tail));
        })
    });
    let mut scanner = SseScanner::default();
    group.bench_function("final usage chunk + [DONE]", |b| {
        b.iter(|| scanner.feed(black_box(FINAL_AND_DONE.as_bytes())))
    });
    group.finish();
}

fn tap_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();

    let mut stream = vec![Bytes::from_static(ROLE.as_bytes())];
    stream.extend((0..CONTENT_FRAMES).map(|_| Bytes::from_static(CONTENT_USAGE_NULL.as_bytes())));
    stream.push(Bytes::from_static(FINAL_AND_DONE.as_bytes()));
    let completion = Bytes::from(
        serde_json::json!({
            "id": "chatcmpl-AbC123",
            "object": "chat.completion",
            "created": 1_718_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is 42. ".repeat(70),
                         "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1017, "completion_tokens": 412, "total_tokens": 1429,
                      "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}},
            "system_fingerprint": "fp_0ba0d124f1",
        })
        .to_string(),
    );
    let completion = [completion];

    for (name, frames, content_type) in [
        ("SSE stream, 103 frames", &stream[..], "text/event-stream"),
        ("JSON completion, 1.5 KiB", &completion[..], "application/json"),
    ] {
        // The tap reports the usage on this body: checked before timing.
        let found = Arc::new(Mutex::new(None));
        let mut tapped = response(frames, content_type);
        let seen = found.clone();
        usage::tap(&mut tapped, 0).subscribe(move |o| *seen.lock().unwrap() = o.usage);
        runtime.block_on(drain(tapped.into_body()));
        assert_eq!(*found.lock().unwrap(), Some(USAGE), "{name}");

        let mut group = c.benchmark_group(format!("usage tap/{name}"));
        group.throughput(Throughput::Elements(frames.len() as u64));
        group.bench_function("drained without tap", |b| {
            b.iter(|| runtime.block_on(drain(response(frames, content_type).into_body())))
        });
        group.bench_function("drained through tap", |b| {
            b.iter(|| {
                let mut response = response(frames, content_type);
                let outcome = usage::tap(&mut response, 0);
                runtime.block_on(drain(response.into_body()));
                outcome
            })
        });
        group.finish();
    }
}

criterion_group!(benches, scanner_benches, tap_benches);
criterion_main!(benches);
