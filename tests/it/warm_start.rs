//! Warm start (issue 20): the tokenizers that the configured fallback chains need load in the
//! background at start, `GET /ready` says when they have (503 before, 200 after, no auth), and
//! `/health` answers throughout. Each gateway is a fresh process, so nothing is loaded before it
//! starts and `llmgate_tokenizer_load_waits_total` shows whether a request waited for a load.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;

use crate::support::{child::ChildGateway, *};

/// `gpt-4o-tiny` is counted by o200k (its name's family) and fits 60 tokens.
fn config(mock: &llmgate::mock_upstream::MockUpstream, fallbacks: &str) -> String {
    format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai}}\nmodels:\n  - {{name: gpt-4o-tiny, context_window: 60, fallbacks: [{fallbacks}]}}\n",
        mock.url()
    )
}

fn chat(words: usize) -> serde_json::Value {
    json!({"model": "gpt-4o-tiny", "messages": [{"role": "user", "content": "word ".repeat(words)}]})
}

async fn load_waits(gw: &ChildGateway) -> u64 {
    let text = send(Method::GET, &gw.url("/metrics"), &[], "").await.text();
    metric_in(&text, "llmgate_tokenizer_load_waits_total", &[])
}

/// Polls `GET /ready` until 200; every answer before is a 503 saying it is warming up.
async fn wait_ready(gw: &ChildGateway) {
    within(async {
        loop {
            let reply = send(Method::GET, &gw.url("/ready"), &[], "").await;
            match reply.status {
                StatusCode::OK => return assert_eq!(reply.json(), json!({"status": "ready"})),
                StatusCode::SERVICE_UNAVAILABLE => assert_eq!(reply.json(), json!({"status": "warming_up"})),
                other => panic!("GET /ready: {other} {}", reply.text()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn once_ready_the_first_request_over_the_window_waits_for_no_tokenizer() {
    let mock = mock().await;
    // `spawn` returns once `/health` answers 200: it does not wait for the warm-up.
    let gw = ChildGateway::spawn(&config(&mock, "gpt-4o"), &[("LOG_LEVEL", "info")], &[]).await;
    wait_ready(&gw).await;

    // Over gpt-4o-tiny's window: tokenized, and routed along the chain.
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &chat(100)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "gpt-4o", "{}", reply.text());
    let text = send(Method::GET, &gw.url("/metrics"), &[], "").await.text();
    assert_eq!(metric_in(&text, "llmgate_context_estimates_total", &[r#"outcome="tokenized""#]), 1, "{text}");
    assert_eq!(load_waits(&gw).await, 0, "the request waited for a tokenizer load");
    assert_eq!(send(Method::GET, &gw.url("/ready"), &[], "").await.status, StatusCode::OK);
}

/// The control: without a chain nothing loads at start (ready at once), a request that fits by
/// its byte bound loads nothing either, and the first one over the window waits for its load.
#[tokio::test]
async fn without_fallbacks_nothing_loads_at_start() {
    let mock = mock().await;
    let gw = ChildGateway::spawn(&config(&mock, ""), &[("LOG_LEVEL", "info")], &[]).await;
    let ready = send(Method::GET, &gw.url("/ready"), &[], "").await;
    assert_eq!((ready.status, ready.json()), (StatusCode::OK, json!({"status": "ready"})));

    let fits = post_json(&gw.url("/v1/chat/completions"), &[], &chat(2)).await;
    assert_eq!(fits.status, StatusCode::OK, "{}", fits.text());
    assert_eq!(load_waits(&gw).await, 0);

    let over = post_json(&gw.url("/v1/chat/completions"), &[], &chat(100)).await;
    assert_eq!((over.status, over.json()["model"].clone()), (StatusCode::OK, json!("gpt-4o-tiny")), "{}", over.text());
    assert_eq!(load_waits(&gw).await, 1, "the tokenizer was loaded before the first request needed it");
    assert!(!gw.log().contains("warming up"), "{}", gw.log());
}

/// `/ready` and `/health` answer without the gateway's key; everything else wants it.
#[tokio::test]
async fn ready_needs_no_key() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "auth: {api_keys: [sk-gw-1]}\n").await;
    for (path, status) in
        [("/ready", StatusCode::OK), ("/health", StatusCode::OK), ("/metrics", StatusCode::UNAUTHORIZED)]
    {
        assert_eq!(send(Method::GET, &gw.url(path), &[], "").await.status, status, "{path}");
    }
    assert_eq!(gw.metric("llmgate_requests_total", &[r#"route="ready""#]), 1);
}
