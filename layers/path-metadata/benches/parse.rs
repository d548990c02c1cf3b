//! The cost of recognising a route: the pure parser on each chat spelling (the full rollout
//! path with and without `encoded_base_url`, plain `/v1/chat/completions`, a path that is no
//! route), and the whole `PathMetadata` service call on the longest one (parse, method check,
//! URI rewrite, extension insert).
//!
//! `cargo bench -p llmgate-path-metadata --bench parse`

use std::{convert::Infallible, hint::black_box};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, Uri};
use llmgate_core::ext::RouteMeta;
use llmgate_path_metadata::{CHAT_PATH, PathMetadataLayer, parse};
use tower::{Layer, Service, ServiceExt, service_fn};

const ROLLOUT: &str = "/v1/project_id/proj-7f3a/rollout_id/rollout-0193b2c4/invocation_id/inv-42/experiment_id/exp-gsm8k-2025-06/run_id/run-3/row_id/row-000123/chat/completions";
// The base URL is `https://api.fireworks.ai/inference/v1`, base64url as clients send it.
const BASE_URL: &str = "/v1/project_id/proj-7f3a/rollout_id/rollout-0193b2c4/invocation_id/inv-42/experiment_id/exp-gsm8k-2025-06/run_id/run-3/row_id/row-000123/encoded_base_url/aHR0cHM6Ly9hcGkuZmlyZXdvcmtzLmFpL2luZmVyZW5jZS92MQ/chat/completions";
const PLAIN: &str = "/v1/chat/completions";
const NOT_A_ROUTE: &str = "/v1/models";

fn bench(c: &mut Criterion) {
    // Check each path parses as the bench name says, so a table change cannot make it measure
    // the wrong branch.
    let rollout = parse(ROLLOUT).unwrap().unwrap();
    assert!(rollout.rollout.is_some() && rollout.encoded_base_url.is_none());
    assert!(parse(BASE_URL).unwrap().unwrap().encoded_base_url.is_some());
    assert!(parse(PLAIN).unwrap().unwrap().rollout.is_none());
    assert!(parse(NOT_A_ROUTE).unwrap().is_none());

    let mut group = c.benchmark_group("parse");
    for (name, path) in [
        ("rollout", ROLLOUT),
        ("rollout_encoded_base_url", BASE_URL),
        ("plain_v1", PLAIN),
        ("not_a_route", NOT_A_ROUTE),
    ] {
        group.bench_function(name, |b| b.iter(|| parse(black_box(path))));
    }
    group.finish();

    // The service on a request built from an already parsed `Uri` (the server parses it anyway);
    // the inner service is ready at once, so the future completes on its first poll.
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let svc = PathMetadataLayer::new().layer(service_fn(|req: Request<()>| async move {
        let routed = req.extensions().get::<RouteMeta>().is_some() && req.uri().path() == CHAT_PATH;
        Ok::<_, Infallible>(Response::new(routed))
    }));
    let uri: Uri = format!("{BASE_URL}?trace=1").parse().unwrap();
    let check = runtime.block_on(svc.clone().oneshot(Request::post(uri.clone()).body(()).unwrap())).unwrap();
    assert!(*check.body());
    c.bench_function("service call, rollout + encoded_base_url + query", |b| {
        b.iter(|| {
            let req = Request::post(uri.clone()).body(()).unwrap();
            let mut svc = svc.clone();
            runtime.block_on(async move { svc.ready().await.unwrap().call(req).await.unwrap() })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
