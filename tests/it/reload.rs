//! Reload without a restart (issue 20): on SIGHUP, and when the secrets file changes, the
//! Langfuse keys and the gateway's API keys are re-read and swapped in; a request in flight keeps
//! the keys it started with; a file that does not validate leaves the keys in force, is logged
//! without values and counted. A real process, real signals, real files.

use std::{path::Path, time::Duration};

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{child::ChildGateway, *};

fn secrets(key: &str) -> String {
    format!("langfuse_keys:\n  p1: {{public_key: pk-lf-{key}, secret_key: sk-lf-{key}}}\ndefault_project_id: p1\n")
}

fn config(mock: &llmgate::mock_upstream::MockUpstream, api_key: &str) -> String {
    format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: litellm}}
langfuse: {{secrets_path: \"{{DIR}}/secrets.yaml\"}}
auth: {{api_keys: [{api_key}]}}
models:
  - {{name: gpt-a, fallbacks: [gpt-b]}}
  - {{name: gpt-b}}
",
        mock.url()
    )
}

/// Replaces `path` whole (a rename, as an editor or a Kubernetes secret volume does), so the
/// poll never reads a half-written file.
fn replace_file(path: &Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// Waits until the log has `n` lines containing `what`.
async fn logged(gw: &ChildGateway, what: &str, n: usize) {
    within(async {
        while gw.log().matches(what).count() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn chat(gw: &ChildGateway, api_key: &str, extra: &[(&str, &str)]) -> Reply {
    let bearer = format!("Bearer {api_key}");
    let mut headers = vec![("authorization", bearer.as_str())];
    headers.extend_from_slice(extra);
    post_json(&gw.url("/v1/chat/completions"), &headers, &chat_body("gpt-a", false)).await
}

/// The Langfuse public key of the last body the upstream got.
fn last_langfuse_key(mock: &llmgate::mock_upstream::MockUpstream) -> Value {
    mock.requests().last().expect("a request reached the upstream").json()["langfuse_public_key"].clone()
}

#[tokio::test]
async fn sighup_and_file_changes_swap_the_keys_in_and_a_bad_file_changes_nothing() {
    let mock = mock().await;
    let gw = ChildGateway::spawn(
        &config(&mock, "sk-gw-old"),
        &[("LOG_LEVEL", "info")],
        &[("secrets.yaml", &secrets("OLD"))],
    )
    .await;
    let (secrets_file, config_file) = (gw.dir.join("secrets.yaml"), gw.dir.join("llmgate.yaml"));
    assert_eq!(chat(&gw, "sk-gw-old", &[]).await.status, StatusCode::OK);
    assert_eq!(last_langfuse_key(&mock), "pk-lf-OLD");

    // In flight across the reload: gpt-a answers 429 after 1.5 s, then gpt-b is tried.
    let in_flight = {
        let url = gw.url("/v1/chat/completions");
        tokio::spawn(async move {
            let headers = [
                ("authorization", "Bearer sk-gw-old"),
                ("x-mock-delay-ms", "1500"),
                ("x-mock-fail", "gpt-a=429:rate_limit_exceeded"),
            ];
            post_json(&url, &headers, &chat_body("gpt-a", false)).await
        })
    };
    let before = mock.requests().len();
    eventually("the in-flight request reached the upstream", || mock.requests().len() > before).await;

    // SIGHUP: both files re-read.
    replace_file(&secrets_file, &secrets("NEW"));
    replace_file(&config_file, &std::fs::read_to_string(&config_file).unwrap().replace("sk-gw-old", "sk-gw-new"));
    gw.signal("HUP");
    logged(&gw, "secrets reloaded", 1).await;
    assert!(gw.log().contains("SIGHUP"), "{}", gw.log());
    assert!(!in_flight.is_finished(), "the reload came after the request it should have overlapped");

    let finished = within(in_flight).await.unwrap();
    assert_eq!(finished.status, StatusCode::OK, "{}", finished.text());
    let attempts: Vec<Value> = mock.requests()[before..].iter().map(|r| r.json()).collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!((&attempts[1]["model"], &attempts[1]["langfuse_public_key"]), (&json!("gpt-b"), &json!("pk-lf-OLD")));

    assert_eq!(chat(&gw, "sk-gw-old", &[]).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(chat(&gw, "sk-gw-new", &[]).await.status, StatusCode::OK);
    assert_eq!(last_langfuse_key(&mock), "pk-lf-NEW");

    // A secrets file that does not parse, seen by the poll (no signal): refused, nothing leaks.
    replace_file(&secrets_file, "langfuse_keys:\n  p1: {public_key: \"pk-lf-LEAK, secret_key: sk-lf-LEAK\n");
    logged(&gw, "secrets reload refused", 1).await;
    assert!(!gw.log().contains("LEAK"), "{}", gw.log());
    assert_eq!(chat(&gw, "sk-gw-new", &[]).await.status, StatusCode::OK);
    assert_eq!(last_langfuse_key(&mock), "pk-lf-NEW");

    // A valid secrets file, seen by the poll.
    replace_file(&secrets_file, &secrets("THIRD"));
    logged(&gw, "secrets reloaded", 2).await;
    assert_eq!(chat(&gw, "sk-gw-new", &[]).await.status, StatusCode::OK);
    assert_eq!(last_langfuse_key(&mock), "pk-lf-THIRD");

    // A config that would remove every gateway key: refused, the keys stay.
    replace_file(&config_file, &std::fs::read_to_string(&config_file).unwrap().replace("[sk-gw-new]", "[]"));
    gw.signal("HUP");
    logged(&gw, "secrets reload refused", 2).await;
    assert!(gw.log().contains("removing them all needs a restart"), "{}", gw.log());
    assert_eq!(chat(&gw, "", &[]).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(chat(&gw, "sk-gw-new", &[]).await.status, StatusCode::OK);
    assert_eq!(last_langfuse_key(&mock), "pk-lf-THIRD");

    let text = send(Method::GET, &gw.url("/metrics"), &[("authorization", "Bearer sk-gw-new")], "").await.text();
    assert_eq!(metric_in(&text, "llmgate_secrets_reloads_total", &[r#"outcome="ok""#]), 2, "{text}");
    assert_eq!(metric_in(&text, "llmgate_secrets_reloads_total", &[r#"outcome="error""#]), 2, "{text}");
}
