//! Issue 5 through the reference proxy: context-length routing.

use http::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// Three models of our own with tiny windows (smaller than every default catalogue model), so
/// that the catalogue's closest fit is one of them.
const MODELS: &str = r#"
models:
  - {name: tiny, context_window: 60, fallbacks: [huge]}
  - {name: small, context_window: 200}
  - {name: medium, context_window: 2000, fallbacks: [huge]}
  - {name: huge, context_window: 100000}
"#;

fn body(model: &str, prompt_bytes: usize, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "word ".repeat(prompt_bytes / 5)}]})
}

fn sent_model(mock: &llmgate::mock_upstream::MockUpstream) -> String {
    mock.requests().last().expect("a request reached the upstream").json()["model"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_request_that_fits_is_untouched() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    let sent = body("medium", 100, false);
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.requests().last().unwrap().json(), sent);
}

#[tokio::test]
async fn too_large_goes_to_the_first_fitting_model_of_the_chain_else_the_closest_fit() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    // `tiny` has a chain: its first fitting model wins, even though `small` would fit too.
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &body("tiny", 400, false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(sent_model(&mock), "huge");
    // `small` has no chain: the catalogue model with the smallest window that fits.
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &body("small", 1000, false)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(sent_model(&mock), "medium");
}

#[tokio::test]
async fn streaming_requests_are_routed_the_same_way() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &body("small", 1000, true)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(sent_model(&mock), "medium");
}

#[tokio::test]
async fn nothing_fits_is_a_400_and_nothing_goes_upstream() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    let mut sent = body("small", 100, false);
    sent["max_tokens"] = json!(50_000_000);
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "context_length_exceeded");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("'small'") && message.contains("50000"), "{message}");
    assert_eq!(mock.chat_requests(), 0);
}

#[tokio::test]
async fn an_unknown_model_passes_through_untouched() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    let sent = body("nobody-knows-me", 100_000, false);
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.requests().last().unwrap().json(), sent);
}

#[tokio::test]
async fn an_upstream_context_error_falls_back_once_to_a_larger_model() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    let fail = [("x-mock-fail", "medium=400:context_length_exceeded")];
    let reply = post_json(&gw.url("/v1/chat/completions"), &fail, &body("medium", 100, false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let models: Vec<String> = mock.requests().iter().map(|r| r.json()["model"].as_str().unwrap().to_string()).collect();
    assert_eq!(models, ["medium", "huge"]);
    // When the larger model fails the same way, the client gets the upstream's 400 as it was.
    let fail = [("x-mock-fail", "medium=400:context_length_exceeded,huge=400:context_length_exceeded")];
    let reply = post_json(&gw.url("/v1/chat/completions"), &fail, &body("medium", 100, false)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(mock.chat_requests(), 4, "one re-send per request, no more");
}
