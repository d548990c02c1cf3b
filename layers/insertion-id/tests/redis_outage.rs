//! Redis down at start and mid-run: requests are served, ids recorded once Redis is back.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use http::{Request, Response};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, body,
    ext::{RolloutIds, RouteKind, RouteMeta},
};
use llmgate_insertion_id::{InsertionIdLayer, InsertionStore, RedisStore};
use llmgate_test_support::redis::RedisServer;
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

fn request(rollout_id: &str) -> Request<GatewayBody> {
    let mut req = Request::new(body::full("{}"));
    req.extensions_mut().insert(RouteMeta {
        kind: RouteKind::ChatCompletions,
        project: None,
        rollout: Some(RolloutIds {
            rollout_id: rollout_id.into(),
            invocation_id: "i".into(),
            experiment_id: "e".into(),
            run_id: "u".into(),
            row_id: "w".into(),
        }),
        encoded_base_url: None,
    });
    req
}

async fn upstream(req: Request<GatewayBody>) -> Result<Response<GatewayBody>, BoxError> {
    let sse = req.uri().path() == "/sse";
    let mut response = Response::new(body::full(if sse { "data: {}\n\ndata: [DONE]\n\n" } else { "{}" }));
    let content_type = if sse { "text/event-stream" } else { "application/json" };
    response.headers_mut().insert("content-type", content_type.parse().unwrap());
    Ok(response)
}

/// Sends `n` requests (JSON and SSE alternating), reads each response to its end, returns the ids.
async fn send(layer: &InsertionIdLayer, rollout: &str, n: usize) -> Vec<String> {
    let svc = layer.layer(service_fn(upstream));
    let mut ids = Vec::new();
    for i in 0..n {
        let mut req = request(rollout);
        if i % 2 == 1 {
            *req.uri_mut() = "/sse".parse().unwrap();
        }
        let response = svc.clone().oneshot(req).await.unwrap();
        ids.push(response.headers()["x-insertion-id"].to_str().unwrap().to_owned());
        response.into_body().collect().await.unwrap();
    }
    ids
}

fn set(ids: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    ids.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_and_mid_run() {
    let mut server = RedisServer::start();
    server.kill();
    let store = Arc::new(RedisStore::single_node(server.url()).unwrap());
    let layer = InsertionIdLayer::new(store.clone())
        .record_timeout(Duration::from_millis(250))
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(200));

    // Down at start: every request is served.
    let mut ids = send(&layer, "r-outage", 4).await;
    let snapshot = layer.counters().snapshot();
    assert_eq!(snapshot.recorded, 0);
    assert_eq!(snapshot.retried, 4);

    // Back up: the queue drains.
    server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    assert!(layer.flush(Instant::now() + Duration::from_secs(30)).await, "{:?}", layer.counters().snapshot());
    assert_eq!(set(store.members("r-outage").await.unwrap()), set(ids.clone()));

    // Served normally, recorded in line.
    ids.extend(send(&layer, "r-outage", 2).await);
    assert_eq!(set(store.members("r-outage").await.unwrap()), set(ids.clone()));

    // Down mid-run (a crash loses the in-memory data: ids recorded so far are gone).
    server.kill();
    let during = send(&layer, "r-outage", 4).await;
    server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    assert!(layer.flush(Instant::now() + Duration::from_secs(30)).await, "{:?}", layer.counters().snapshot());
    let after = send(&layer, "r-outage", 2).await;
    let members = set(store.members("r-outage").await.unwrap());
    assert!(set(during.clone()).is_subset(&members), "every id sent during the outage is recorded");
    assert!(set(after.clone()).is_subset(&members));

    let snapshot = layer.counters().snapshot();
    assert_eq!(snapshot.recorded, 12);
    assert_eq!(snapshot.pending, 0);
    assert_eq!(snapshot.dropped, 0);
    assert!(snapshot.retried >= 8, "{snapshot:?}");
    drop(server);
}
