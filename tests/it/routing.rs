//! Issue 5 through the reference proxy: context-length routing.

use http::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// Models of our own with tiny windows (smaller than every built-in catalogue model); only the
/// configured chains route.
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
async fn too_large_goes_to_the_first_fitting_model_of_the_chain_and_nowhere_else() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    // `tiny` has a chain: its first fitting model wins, even though `small` would fit too.
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &body("tiny", 400, false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(sent_model(&mock), "huge");
    // `small` has no chain: it stays `small` (the closest fit, `medium`, is nobody's choice).
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &body("small", 1000, false)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(sent_model(&mock), "small");
}

#[tokio::test]
async fn streaming_requests_are_routed_the_same_way() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &body("tiny", 400, true)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(sent_model(&mock), "huge");
}

#[tokio::test]
async fn nothing_in_the_chain_fits_is_a_400_and_nothing_goes_upstream() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, MODELS).await;
    let mut sent = body("medium", 100, false);
    sent["max_tokens"] = json!(50_000_000);
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "context_length_exceeded");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("'medium'") && message.contains("50000"), "{message}");
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

// === the built-in catalogue never reroutes (issue 15) ===

#[tokio::test]
async fn without_models_an_oversized_prompt_goes_upstream_with_gpt_4o_unchanged() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    // More than gpt-4o's built-in window of 128,000 (the requested output counts).
    let sent = json!({"model": "gpt-4o", "max_tokens": 200_000, "messages": [{"role": "user", "content": "hi"}]});
    let reply = post_json(&gw.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(mock.requests().last().unwrap().json(), sent, "forwarded unchanged: the provider decides");

    // The provider says it is too long: its error comes back, nothing is re-sent elsewhere.
    let fail = [("x-mock-fail", "gpt-4o=400:context_length_exceeded")];
    let reply = post_json(&gw.url("/v1/chat/completions"), &fail, &body("gpt-4o", 100, false)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["code"], "context_length_exceeded");
    let models: Vec<String> = mock.requests().iter().map(|r| r.json()["model"].as_str().unwrap().to_string()).collect();
    assert_eq!(models, ["gpt-4o", "gpt-4o"]);
}

#[test]
fn check_config_lists_the_catalogue_with_origins_and_active_fallbacks() {
    let dir = TempDir::new();
    let path = dir.0.join("llmgate.yaml");
    std::fs::write(
        &path,
        "models:\n  - {name: gpt-4o, context_window: 128000, fallbacks: [gpt-4o-mini]}\n  - {name: house-model, limits: {rpm: 5}}\n",
    )
    .unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_llmgate"))
            .arg("check-config")
            .args(args)
            .env_clear()
            .output()
            .expect("run check-config");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
        text
    };
    let line = |text: &str, model: &str| -> String {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{model} ")))
            .unwrap_or_else(|| panic!("no line for {model}:\n{text}"))
            .to_string()
    };

    let text = run(&[std::ffi::OsStr::new("--config"), path.as_os_str()]);
    let gpt_4o = line(&text, "gpt-4o");
    assert!(gpt_4o.contains("config, overrides built-in") && gpt_4o.contains("fallbacks: gpt-4o-mini"), "{gpt_4o}");
    let house = line(&text, "house-model");
    assert!(house.contains("[config]") && house.contains("rpm 5"), "{house}");
    let builtin = line(&text, "gpt-4.1");
    assert!(builtin.contains("[built-in]") && builtin.contains("window 1047576"), "{builtin}");
    assert!(!builtin.contains("fallbacks:"), "{builtin}");
    assert!(text.contains("fallbacks active: gpt-4o → gpt-4o-mini\n"), "{text}");

    // No config at all: the built-in entries alone, and no fallback anywhere.
    let text = run(&[]);
    assert!(line(&text, "gpt-4o").contains("[built-in]"), "{text}");
    assert!(text.contains("fallbacks active: none"), "{text}");
}
