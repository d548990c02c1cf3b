//! Issue 11, secrets: the proxy BINARY with debug and trace logging, API keys, server-side
//! upstream keys (one `openai`, one `litellm` upstream, so the Langfuse keys go into bodies) and
//! Langfuse export to the stand-in. After success, error, 401 and 404 traffic, no Langfuse
//! secret key, no upstream API key and no client bearer token may appear in any log line, error
//! body, `/stats`, `check-config` output or `Debug` string.

use std::{path::Path, process::Command};

use http::{Method, StatusCode};
use llmgate_test_support::langfuse::LangfuseStandIn;
use serde_json::json;

use crate::support::{child::ChildGateway, *};

const LF_PUBLIC: &str = "pk-lf-public-3d1c";
const LF_SECRET: &str = "sk-lf-SECRET-7f3a9e";
const OA_KEY: &str = "sk-upstream-OA-91c2b7";
const LL_KEY: &str = "sk-upstream-LL-55d1e0";
const DEAD_KEY: &str = "sk-upstream-DEAD-0a9f";
const CLIENT_TOKEN: &str = "gw-TOKEN-4b8e21";
const WRONG_TOKEN: &str = "gw-WRONG-TOKEN-c0ffee";
const REDIS_PASSWORD: &str = "redis-PASSWORD-77aa";

/// Every secret of the setup, and the Basic-auth form of the Langfuse key pair.
fn secrets() -> Vec<String> {
    let basic = base64_standard(format!("{LF_PUBLIC}:{LF_SECRET}").as_bytes());
    vec![
        LF_SECRET.into(),
        OA_KEY.into(),
        LL_KEY.into(),
        DEAD_KEY.into(),
        CLIENT_TOKEN.into(),
        WRONG_TOKEN.into(),
        REDIS_PASSWORD.into(),
        basic,
    ]
}

/// Standard base64 with padding (what HTTP Basic auth uses).
fn base64_standard(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        out.push_str(&"=".repeat(3 - chunk.len()));
    }
    out
}

/// Panics naming the first secret found in `text`.
fn assert_clean(what: &str, text: &str) {
    for secret in secrets() {
        if let Some(at) = text.find(&secret) {
            let line = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!("{what} leaks {secret:?}: {}", &text[line..end]);
        }
    }
}

fn config_yaml(mock_url: &str, dead: &str, langfuse: &str) -> String {
    format!(
        "upstreams:
  oa: {{url: \"{mock_url}\", mode: openai, api_key_env: OA_KEY}}
  ll: {{url: \"{mock_url}\", mode: litellm, api_key_env: LL_KEY}}
  dead: {{url: \"http://{dead}/v1\", mode: openai, api_key_env: DEAD_KEY}}
default_upstream: oa
models:
  - {{name: gpt-oa, upstream: oa}}
  - {{name: fireworks_ai/ll, upstream: ll}}
  - {{name: gpt-dead, upstream: dead}}
auth: {{api_keys: [\"{CLIENT_TOKEN}\"]}}
langfuse: {{host: \"{langfuse}\", secrets_path: \"{{DIR}}/secrets.yaml\", emit: all, export: {{batch_delay_ms: 20, timeout_ms: 1000}}}}
"
    )
}

fn secrets_file() -> String {
    format!("langfuse_keys:\n  p1: {{public_key: {LF_PUBLIC}, secret_key: {LF_SECRET}}}\ndefault_project_id: p1\n")
}

const ENV: [(&str, &str); 3] = [("OA_KEY", OA_KEY), ("LL_KEY", LL_KEY), ("DEAD_KEY", DEAD_KEY)];
const ROLLOUT: &str =
    "/v1/project_id/p1/rollout_id/r1/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1/chat/completions";

async fn traffic_leaks_nothing(level: &str) {
    let mock = mock().await;
    let standin = LangfuseStandIn::start().await;
    standin.add_project("p1", LF_PUBLIC, LF_SECRET);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let yaml = config_yaml(&mock.url(), &dead.to_string(), &standin.url());
    let mut env = ENV.to_vec();
    env.push(("LOG_LEVEL", level));
    let gw = ChildGateway::spawn(&yaml, &env, &[("secrets.yaml", &secrets_file())]).await;
    let auth = format!("Bearer {CLIENT_TOKEN}");
    let wrong = format!("Bearer {WRONG_TOKEN}");
    let ok = [("authorization", auth.as_str())];

    let mut error_bodies = Vec::new();
    // Successes on both modes, JSON and SSE.
    for model in ["gpt-oa", "fireworks_ai/ll"] {
        for stream in [false, true] {
            let reply = post_json(&gw.url(ROLLOUT), &ok, &chat_body(model, stream)).await;
            assert_eq!(reply.status, StatusCode::OK, "{model}: {}", reply.text());
        }
    }
    // The upstreams got their server-side keys (so the keys were really in play).
    let seen: Vec<String> = mock
        .requests()
        .iter()
        .filter_map(|r| r.headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string))
        .collect();
    assert!(seen.contains(&format!("Bearer {OA_KEY}")) && seen.contains(&format!("Bearer {LL_KEY}")), "{seen:?}");
    let litellm_body = mock.requests().into_iter().map(|r| r.json()).find(|b| b["model"] == "fireworks_ai/ll");
    assert_eq!(litellm_body.expect("a litellm body")["langfuse_secret_key"], LF_SECRET, "litellm mode carries the key");

    // Errors: upstream 500 and 429, unreachable upstream, 401s, 404, 400, 405, 403.
    type Failure<'a> = (Vec<(&'a str, &'a str)>, String, serde_json::Value);
    let failures: Vec<Failure<'_>> = vec![
        (vec![ok[0], ("x-mock-status", "500")], ROLLOUT.into(), chat_body("gpt-oa", false)),
        (
            vec![ok[0], ("x-mock-status", "429"), ("x-mock-retry-after", "0")],
            ROLLOUT.into(),
            chat_body("fireworks_ai/ll", false),
        ),
        (ok.to_vec(), ROLLOUT.into(), chat_body("gpt-dead", false)),
        (vec![], ROLLOUT.into(), chat_body("gpt-oa", false)),
        (vec![("authorization", wrong.as_str())], ROLLOUT.into(), chat_body("gpt-oa", false)),
        (vec![("authorization", wrong.as_str())], "/v1/models".into(), json!({})),
        (ok.to_vec(), "/v1/project_id/nope/chat/completions".into(), chat_body("gpt-oa", false)),
        (ok.to_vec(), ROLLOUT.into(), json!([1])),
        (
            ok.to_vec(),
            format!("{}/encoded_base_url/aHR0cDovLzEyNy4wLjAuMTox/chat/completions", &ROLLOUT[..ROLLOUT.len() - 17]),
            chat_body("gpt-oa", false),
        ),
    ];
    for (headers, path, body) in failures {
        let reply = post_json(&gw.url(&path), &headers, &body).await;
        assert!(!reply.status.is_success(), "{path} {headers:?}: {}", reply.status);
        error_bodies.push(format!("{} {path}: {}", reply.status, reply.text()));
    }
    let reply = send(Method::GET, &gw.url(ROLLOUT), &ok, "").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    error_bodies.push(reply.text());
    for body in &error_bodies {
        assert_clean("an error body", body);
    }

    // Langfuse export really happened (with the secret key in its Basic auth).
    within(standin.wait_for(|s| !s.observations("p1").is_empty())).await;

    // /stats and /metrics.
    for path in ["/stats", "/metrics"] {
        let reply = send(Method::GET, &gw.url(path), &ok, "").await;
        assert_clean(path, &reply.text());
    }

    // The logs, at this level, after a graceful shutdown (which flushes and logs at exit).
    gw.sigterm();
    let mut gw = gw;
    gw.wait_exit().await;
    let log = gw.log();
    let marker = level.to_ascii_uppercase();
    assert!(log.lines().filter(|l| l.contains(&marker)).count() > 5, "the binary really logged at {level}: {log}");
    assert_clean(&format!("the {level} log"), &log);
}

#[tokio::test]
async fn debug_logs_error_bodies_and_stats_leak_no_secret() {
    traffic_leaks_nothing("debug").await;
}

#[tokio::test]
async fn trace_logs_leak_no_secret() {
    traffic_leaks_nothing("trace").await;
}

#[tokio::test]
async fn check_config_and_debug_strings_leak_no_secret() {
    let dir = std::env::temp_dir().join(format!("llmgate-it-secrets-cc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secrets.yaml"), secrets_file()).unwrap();
    let yaml = format!(
        "{}redis: {{url: \"redis://:{REDIS_PASSWORD}@127.0.0.1:1\"}}\n",
        config_yaml("http://127.0.0.1:9/v1", "127.0.0.1:9", "http://127.0.0.1:9")
    )
    .replace("{DIR}", &dir.display().to_string());
    std::fs::write(dir.join("llmgate.yaml"), &yaml).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_llmgate"))
        .arg("check-config")
        .arg("--config")
        .arg(dir.join("llmgate.yaml"))
        .env_clear()
        .envs(ENV)
        .output()
        .expect("run check-config");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    assert_clean("check-config", &text);

    // The resolved config's Debug string.
    let lookup = |name: &str| ENV.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    let config = llmgate::config::Config::from_yaml(&yaml, Path::new("llmgate.yaml"), &lookup).expect("valid");
    assert_clean("Config's Debug", &format!("{config:?} {config:#?}"));
    // A config error that names an unset key variable names the variable, not a value.
    let error = llmgate::config::Config::from_yaml(&yaml, Path::new("llmgate.yaml"), &|_| None).unwrap_err();
    assert_clean("a config error", &error.to_string());
    let _ = std::fs::remove_dir_all(&dir);
}
