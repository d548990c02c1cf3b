//! The streaming proxy: passthrough, SSE without buffering, usage once, errors, catch-all,
//! graceful shutdown.

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn health_answers_like_the_original() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    let reply = send(Method::GET, &gw.url("/health"), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"status": "healthy", "service": "metadata-proxy"}));
    assert_eq!(mock.requests().len(), 0);
}

#[tokio::test]
async fn json_passthrough_reports_usage_once() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    for path in ["/v1/chat/completions", "/chat/completions"] {
        let body = chat_body("gpt-test", false);
        let reply = post_json(&gw.url(path), &[("authorization", "Bearer sk-client")], &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["usage"]["total_tokens"], 8);
        assert_eq!(reply.headers.get_all("date").iter().count(), 1);
        let seen = mock.requests().pop().unwrap();
        assert_eq!(seen.uri, "/v1/chat/completions");
        assert_eq!(seen.json(), body, "the client's body goes upstream unchanged");
        assert_eq!(seen.headers["authorization"], "Bearer sk-client");
    }
    eventually("two usage reports", || gw.metric("llmgate_chat_responses_total", &[]) == 2).await;
    assert_eq!(gw.metric("llmgate_tokens_total", &[r#"direction="input""#]), 2 * 3);
    assert_eq!(gw.metric("llmgate_tokens_total", &[r#"direction="output""#]), 2 * 5);
}

#[tokio::test]
async fn sse_reaches_the_client_before_the_upstream_finishes() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    // The second chunk comes after ten minutes: a buffering proxy would hang here.
    let req = request(
        Method::POST,
        &gw.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-chunks", "2"), ("x-mock-chunk-delay-ms", "600000")],
        chat_body("gpt-test", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().get("content-length").is_none());
    let mut body = response.into_body();
    let first = within(body.frame()).await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("tok0"));
    // The client goes away mid-stream: the outcome fires once, as cancelled.
    drop(body);
    eventually("a cancelled outcome", || gw.metric("llmgate_chat_responses_total", &[r#"end="cancelled""#]) == 1).await;
    assert_eq!(gw.metric("llmgate_chat_responses_total", &[]), 1);
}

#[tokio::test]
async fn sse_usage_is_reported_once_from_the_final_chunk() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    let reply =
        post_json(&gw.url("/v1/chat/completions"), &[("x-mock-chunks", "4")], &chat_body("gpt-test", true)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.text();
    assert!(text.contains("tok3") && text.ends_with("data: [DONE]\n\n"), "{text}");
    eventually("one usage report", || gw.metric("llmgate_chat_responses_total", &[]) == 1).await;
    assert_eq!(gw.metric("llmgate_tokens_total", &[r#"direction="output""#]), 4);
    assert_eq!(gw.metric("llmgate_chat_responses_total", &[r#"end="complete""#]), 1);
}

#[tokio::test]
async fn upstream_down_is_a_502_json_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let yaml = format!("upstreams:\n  dead: {{url: \"http://{closed}/v1\"}}\n");
    let gw = TestGateway::start(&yaml, &[]).await;
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &chat_body("m", false)).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    let reply = send(Method::GET, &gw.url("/v1/models"), &[], "").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
}

/// A stream whose upstream falls silent past `request_timeout_secs` ends with an error: the client
/// is never left hanging (the mock waits 30 s before its second chunk; the suite's guard is 20 s).
#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_after_the_timeout() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "request_timeout_secs: 0.3\n").await;
    let req = request(
        Method::POST,
        &gw.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-chunk-delay-ms", "30000")],
        chat_body("m", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let ended_with_error = within(async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
                Err(_) => return true,
            }
        }
        false
    })
    .await;
    assert!(ended_with_error, "the stream ended cleanly: {}", String::from_utf8_lossy(&received));
    assert!(String::from_utf8_lossy(&received).contains("tok0"), "the first chunk came through");
}

#[tokio::test]
async fn upstream_timeout_is_a_504_json_error() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "request_timeout_secs: 0.3\n").await;
    let reply = post_json(&gw.url("/v1/chat/completions"), &[("x-mock-hang", "1")], &chat_body("m", false)).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn oversized_body_is_413_and_never_reaches_the_upstream() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "body_limit_bytes: 1024\n").await;
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &big).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["error"]["code"], "payload_too_large");
    assert_eq!(mock.chat_requests(), 0);
}

#[tokio::test]
async fn malformed_json_is_a_clear_400() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    for (body, needle) in [("{\"model\": ", "Invalid JSON"), ("[1]", "must be a JSON object"), ("", "empty")] {
        let reply =
            send(Method::POST, &gw.url("/v1/chat/completions"), &[("content-type", "application/json")], body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{message}");
    }
    assert_eq!(mock.requests().len(), 0);
}

#[tokio::test]
async fn catch_all_keeps_method_path_query_and_body() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    for method in [Method::PUT, Method::DELETE, Method::PATCH, Method::POST, Method::OPTIONS] {
        let reply =
            send(method.clone(), &gw.url("/v1/files/abc?purpose=x&n=2"), &[("x-custom", "1")], "raw bytes").await;
        assert_eq!(reply.status, StatusCode::OK, "{method}");
        let echo = reply.json();
        assert_eq!(echo["method"], method.as_str());
        assert_eq!(echo["path"], "/v1/files/abc");
        assert_eq!(echo["query"], "purpose=x&n=2");
        assert_eq!(echo["body"], "raw bytes");
        assert_eq!(echo["headers"]["x-custom"], "1");
    }
    // A base without a path prefix gets the client's path as is.
    let yaml = format!("upstreams:\n  bare: {{url: \"http://{}\"}}\n", mock.addr());
    let gw = TestGateway::start(&yaml, &[]).await;
    let reply = send(Method::GET, &gw.url("/v1/models?limit=3"), &[], "").await;
    assert_eq!(reply.json()["uri"], "/v1/models?limit=3");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_stream_finish() {
    let mock = mock().await;
    let mut gw = TestGateway::in_front_of(&mock, "").await;
    let req = request(
        Method::POST,
        &gw.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-chunks", "5"), ("x-mock-chunk-delay-ms", "100")],
        chat_body("gpt-test", true).to_string(),
    );
    let response = open(req).await;
    let mut body = response.into_body();
    let first = within(body.frame()).await.unwrap().unwrap();
    assert!(first.is_data());
    let serving = gw.begin_shutdown();
    let rest = within(body.collect()).await.expect("the stream finishes").to_bytes();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    within(serving).await.expect("server task ends after the drain");
}
