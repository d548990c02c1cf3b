//! `GET /metrics` after a scripted run.

use http::{Method, StatusCode};

use crate::support::*;

#[tokio::test]
async fn metrics_expose_requests_tokens_cost_fallbacks_and_records() {
    let mock = mock().await;
    let models = "models:\n  - {name: gpt-a, context_window: 100000, pricing: {input_per_1m: 1000000, output_per_1m: 1000000}, fallbacks: [gpt-b]}\n  - {name: gpt-b, context_window: 100000}\n";
    let gw = TestGateway::in_front_of(&mock, models).await;
    let rollout = "/rollout_id/r1/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1/chat/completions";
    assert_eq!(post_json(&gw.url(rollout), &[], &chat_body("gpt-a", false)).await.status, StatusCode::OK);
    let fail = [("x-mock-fail", "gpt-a=429:rate_limit_exceeded")];
    assert_eq!(
        post_json(&gw.url("/v1/chat/completions"), &fail, &chat_body("gpt-a", false)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        post_json(&gw.url("/v1/chat/completions"), &[], &chat_body("unlisted-model", true)).await.status,
        StatusCode::OK
    );
    assert_eq!(send(Method::GET, &gw.url("/v1/models"), &[], "").await.status, StatusCode::OK);

    let reply = send(Method::GET, &gw.url("/metrics"), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = reply.text();
    for line in [
        r#"llmgate_requests_total{route="chat",model="gpt-a",status="200",key="-"} 1"#,
        r#"llmgate_requests_total{route="chat",model="gpt-b",status="200",key="-"} 1"#,
        r#"llmgate_requests_total{route="chat",model="other",status="200",key="-"} 1"#,
        r#"llmgate_requests_total{route="catch_all",model="-",status="200",key="-"} 1"#,
        r#"llmgate_upstream_duration_seconds_count{upstream="mock",status="429"} 1"#,
        r#"llmgate_upstream_duration_seconds_count{upstream="mock",status="200"} 4"#,
        r#"llmgate_tokens_total{model="gpt-a",direction="input"} 3"#,
        r#"llmgate_tokens_total{model="gpt-a",direction="output"} 5"#,
        r#"llmgate_tokens_total{model="other",direction="output"} 5"#,
        r#"llmgate_cost_usd_total{model="gpt-a",fallback="none"} 8.0"#,
        r#"llmgate_chat_duration_seconds_count{fallback="rate_limit"} 1"#,
        r#"llmgate_fallbacks_total{type="rate_limit",reason="upstream_429",original_model="gpt-a",fallback_model="gpt-b"} 1"#,
        r#"llmgate_insertion_records_total{outcome="recorded"} 1"#,
        "llmgate_open_streams 0",
        "llmgate_in_flight_requests 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    assert!(text.contains("llmgate_request_duration_seconds_bucket{"), "{text}");
    assert!(text.contains("llmgate_time_to_first_byte_seconds_count 1"), "{text}");
    assert!(!text.contains("r1"), "no rollout ids in labels");
}

#[tokio::test]
async fn metrics_can_have_their_own_port_without_auth() {
    let mock = mock().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let extra = format!("auth: {{api_keys: [\"gateway-key\"]}}\nmetrics: {{listen: \"127.0.0.1:{port}\"}}\n");
    let gw = TestGateway::in_front_of(&mock, &extra).await;
    assert_eq!(send(Method::GET, &gw.url("/metrics"), &[], "").await.status, StatusCode::UNAUTHORIZED);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut reply = None;
    for _ in 0..200 {
        if let Ok(Ok(response)) = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            client().request(request(Method::GET, &url, &[], "")),
        )
        .await
        {
            reply = Some(response);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let reply = reply.expect("the metrics listener answers");
    assert_eq!(reply.status(), StatusCode::OK);
    let other = send(Method::GET, &format!("http://127.0.0.1:{port}/v1/models"), &[], "").await;
    assert_eq!(other.status, StatusCode::NOT_FOUND, "the metrics port serves nothing else");
    assert_eq!(mock.requests().len(), 0);
}

#[tokio::test]
async fn metrics_count_waits_and_failed_langfuse_exports() {
    let mock = mock().await;
    let (standin, _dir, secrets) = langfuse_with_two_projects().await;
    // Langfuse refuses the keys: every export fails (401 is never retried).
    standin.set_fault(llmgate_test_support::langfuse::Fault::Status(401));
    let extra = format!(
        "models:\n  - {{name: gpt-a, context_window: 100000}}\nrate_limit: {{max_wait_seconds: 2}}\n\
         langfuse: {{host: \"{}\", secrets_path: \"{}\", export: {{batch_delay_ms: 20}}}}\n",
        standin.url(),
        secrets.display()
    );
    let gw = TestGateway::in_front_of(&mock, &extra).await;
    // A 429 with `Retry-After: 1` on a model without fallbacks: the gateway waits, then retries.
    let wait = [("x-mock-status", "429"), ("x-mock-retry-after", "1")];
    let reply = post_json(&gw.url("/v1/chat/completions"), &wait, &chat_body("gpt-a", false)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "the mock answers 429 every time here");
    eventually("a failed export", || standin.state(|s| s.export_requests()) > 0).await;
    let mut text = String::new();
    for _ in 0..500 {
        text = send(Method::GET, &gw.url("/metrics"), &[], "").await.text();
        if text
            .lines()
            .any(|l| l.starts_with(r#"llmgate_langfuse_spans_total{outcome="failed"}"#) && !l.ends_with(" 0"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The waits the gateway made (one per 429 within `max_wait_seconds`) are the ones /stats counts.
    let stats = send(Method::GET, &gw.url("/stats"), &[], "").await.json();
    let waits = stats["rate_limit_waits"].as_u64().unwrap();
    assert!(waits >= 1, "{stats}");
    assert!(text.lines().any(|l| l == format!("llmgate_rate_limit_waits_total {waits}")), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with(r#"llmgate_langfuse_spans_total{outcome="failed"}"#) && !l.ends_with(" 0")),
        "{text}"
    );
}
