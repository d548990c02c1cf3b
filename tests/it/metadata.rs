//! Issue 3 through the reference proxy: path metadata, credentials, insertion ids.
//!
//! Every route spelling and its near-misses, the tag list and its order, the upstream bodies of
//! both modes, the Redis set and its TTL (real redis-server), recording only after a success,
//! Redis outages, the auth provider, the `encoded_base_url` allowlist and the chat rows of the
//! spec's error table (§13).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use llmgate::mock_upstream::MockUpstream;
use llmgate_test_support::redis::RedisServer;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const CHAT: &str = "/chat/completions";
const FIREWORKS: &str = "https://api.fireworks.ai/inference/v1";
const LANGFUSE_HOST: &str = "https://cloud.langfuse.com";
const SECRETS_YAML: &str = "langfuse_keys:
  proj-a: {public_key: pk-lf-a, secret_key: sk-lf-a}
  proj-b: {public_key: pk-lf-b, secret_key: sk-lf-b}
default_project_id: proj-a
";

// === Helpers ===

/// `/rollout_id/{rollout}/invocation_id/inv1/experiment_id/exp1/run_id/run1/row_id/row1`.
fn ids(rollout: &str) -> String {
    format!("/rollout_id/{rollout}/invocation_id/inv1/experiment_id/exp1/run_id/run1/row_id/row1")
}

/// The six tags of [`ids`] for `insertion_id`.
fn six_tags(rollout: &str, insertion_id: &str) -> Vec<String> {
    vec![
        format!("rollout_id:{rollout}"),
        format!("insertion_id:{insertion_id}"),
        "invocation_id:inv1".into(),
        "experiment_id:exp1".into(),
        "run_id:run1".into(),
        "row_id:row1".into(),
    ]
}

/// URL-safe base64 of `text`, with `=` padding when `padded` (as the Eval Protocol client sends it).
fn b64(text: &str, padded: bool) -> String {
    b64_bytes(text.as_bytes(), padded)
}

fn b64_bytes(bytes: &[u8], padded: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if padded {
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
    }
    out
}

/// The `x-insertion-id` header (panics when missing).
fn insertion_id(headers: &HeaderMap) -> String {
    headers.get("x-insertion-id").expect("an x-insertion-id header").to_str().unwrap().to_string()
}

/// A secrets file in its own temporary directory, removed on drop.
struct SecretsFile {
    dir: PathBuf,
}

impl SecretsFile {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("llmgate-it-metadata-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secrets.yaml"), SECRETS_YAML).unwrap();
        Self { dir }
    }

    fn path(&self) -> String {
        self.dir.join("secrets.yaml").display().to_string()
    }
}

impl Drop for SecretsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway in front of `mock` in `mode`, with the secrets file, a Langfuse host (export off:
/// nothing leaves the machine) and `extra` YAML.
async fn gateway(mock: &MockUpstream, mode: &str, secrets: &SecretsFile, extra: &str) -> TestGateway {
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: {mode}}}\n\
         langfuse: {{host: \"{LANGFUSE_HOST}\", secrets_path: \"{}\", emit: off}}\n{extra}",
        mock.url(),
        secrets.path()
    );
    TestGateway::start(&yaml, &[]).await
}

fn redis_yaml(server: &RedisServer) -> String {
    format!("redis: {{url: \"{}\"}}\n", server.url())
}

/// A direct connection to `server` (`None` while it is down).
fn redis_conn(server: &RedisServer) -> Option<redis::Connection> {
    redis::Client::open(server.url()).ok()?.get_connection_with_timeout(Duration::from_secs(2)).ok()
}

/// `SMEMBERS key` (`None` while Redis is down).
fn smembers(server: &RedisServer, key: &str) -> Option<BTreeSet<String>> {
    let members: Vec<String> = redis::cmd("SMEMBERS").arg(key).query(&mut redis_conn(server)?).ok()?;
    Some(members.into_iter().collect())
}

fn redis_int(server: &RedisServer, command: &str, key: &str) -> i64 {
    redis::cmd(command).arg(key).query(&mut redis_conn(server).expect("redis is up")).expect("redis answers")
}

fn set_of<S: ToString>(ids: &[S]) -> BTreeSet<String> {
    ids.iter().map(ToString::to_string).collect()
}

/// Sends a streamed chat request and reads it to its end; returns the id and the body.
async fn streamed(url: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let reply = send(Method::POST, url, &all, chat_body("gpt-test", true).to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    (insertion_id(&reply.headers), text)
}

/// A JSON chat request that must succeed; returns its insertion id.
async fn completed(url: &str) -> String {
    let reply = post_json(url, &[], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    insertion_id(&reply.headers)
}

fn error_message(reply: &Reply) -> String {
    reply.json()["error"]["message"].as_str().unwrap_or_else(|| panic!("an OpenAI error: {}", reply.text())).to_string()
}

// === Route spellings ===

#[tokio::test]
async fn every_chat_route_spelling_is_recognised() {
    let mock = mock().await;
    let secrets = SecretsFile::new();
    let gw = gateway(&mock, "litellm", &secrets, &format!("encoded_base_url: {{allow: [\"{FIREWORKS}\"]}}\n")).await;
    let ids = ids("r1");
    let padded = b64(FIREWORKS, true);
    let unpadded = b64(FIREWORKS, false);
    assert_ne!(padded, unpadded, "the test URL needs padding");
    // (path, project, rollout route, encoded base URL, query)
    let cases: Vec<(String, &str, bool, bool, &str)> = vec![
        (format!("{ids}{CHAT}"), "a", true, false, ""),
        (format!("/v1{ids}{CHAT}"), "a", true, false, ""),
        (format!("/project_id/proj-b{ids}{CHAT}"), "b", true, false, ""),
        (format!("/v1/project_id/proj-b{ids}{CHAT}"), "b", true, false, ""),
        (format!("{ids}/encoded_base_url/{padded}{CHAT}"), "a", true, true, ""),
        (format!("/v1{ids}/encoded_base_url/{padded}{CHAT}"), "a", true, true, ""),
        (format!("/project_id/proj-b{ids}/encoded_base_url/{padded}{CHAT}"), "b", true, true, ""),
        (format!("/v1/project_id/proj-b{ids}/encoded_base_url/{unpadded}{CHAT}"), "b", true, true, ""),
        (format!("/project_id/proj-b{CHAT}"), "b", false, false, ""),
        (format!("/v1/project_id/proj-b{CHAT}"), "b", false, false, ""),
        (CHAT.to_string(), "a", false, false, ""),
        (format!("/v1{CHAT}"), "a", false, false, ""),
        (format!("/v1/project_id/proj-a{ids}{CHAT}?trace=1"), "a", true, false, "?trace=1"),
    ];
    let client_body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    for (path, project, rollout, base_url, query) in cases {
        let reply = post_json(&gw.url(&path), &[], &client_body).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        let seen = mock.requests().pop().expect("the request reached the upstream");
        assert_eq!(seen.uri, format!("/v1/chat/completions{query}"), "{path}");

        let mut expected = client_body.clone();
        expected["langfuse_public_key"] = json!(format!("pk-lf-{project}"));
        expected["langfuse_secret_key"] = json!(format!("sk-lf-{project}"));
        expected["langfuse_host"] = json!(LANGFUSE_HOST);
        if base_url {
            expected["base_url"] = json!(FIREWORKS);
        }
        if rollout {
            let id = insertion_id(&reply.headers);
            expected["metadata"] = json!({"tags": six_tags("r1", &id)});
        } else {
            assert!(reply.headers.get("x-insertion-id").is_none(), "{path}: no rollout, no insertion id");
        }
        assert_eq!(seen.json(), expected, "{path}");
    }
    assert_eq!(mock.requests().len(), 13);
}

#[tokio::test]
async fn near_misses_go_to_the_catch_all_unchanged() {
    let mock = mock().await;
    let secrets = SecretsFile::new();
    let gw = gateway(&mock, "litellm", &secrets, &format!("encoded_base_url: {{allow: [\"{FIREWORKS}\"]}}\n")).await;
    let enc = b64(FIREWORKS, true);
    let ids = ids("r1");
    let near_misses = [
        // A missing id.
        "/rollout_id/r1/invocation_id/inv1/experiment_id/exp1/run_id/run1/chat/completions".to_string(),
        "/rollout_id/r1/chat/completions".to_string(),
        // A wrong order.
        "/invocation_id/inv1/rollout_id/r1/experiment_id/exp1/run_id/run1/row_id/row1/chat/completions".to_string(),
        format!("{ids}/project_id/proj-b{CHAT}"),
        format!("/project_id/proj-b/v1{CHAT}"),
        format!("/encoded_base_url/{enc}{ids}{CHAT}"),
        // `encoded_base_url` without the ids.
        format!("/encoded_base_url/{enc}{CHAT}"),
        format!("/project_id/proj-b/encoded_base_url/{enc}{CHAT}"),
        // Other spellings.
        format!("/v1/v1{CHAT}"),
        format!("/V1{CHAT}"),
        format!("/v1{CHAT}/"),
        format!("/v1{ids}{CHAT}/extra?q=1"),
        "/v1/chat/completion".to_string(),
    ];
    // Odd spacing: a re-serialised body would not be byte-identical.
    let raw = r#"{"model":   "fireworks_ai/x", "metadata": {"tags": ["pre"]},  "messages": []}"#;
    for path in &near_misses {
        let reply = send(
            Method::POST,
            &gw.url(path),
            &[("content-type", "application/json"), ("authorization", "Bearer sk-client")],
            raw,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        assert!(reply.headers.get("x-insertion-id").is_none(), "{path}");
        let seen = mock.requests().pop().expect("forwarded");
        let expected_uri = if path.starts_with("/v1/") { path.clone() } else { format!("/v1{path}") };
        assert_eq!(seen.uri, expected_uri, "forwarded verbatim");
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.body, raw.as_bytes(), "{path}: the body goes upstream byte for byte");
        assert_eq!(seen.headers["authorization"], "Bearer sk-client");
    }
    // A near-miss with another method is forwarded too (it is no chat route).
    let path = "/rollout_id/r1/invocation_id/inv1/chat/completions?x=1";
    let reply = send(Method::GET, &gw.url(path), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["uri"], format!("/v1{path}"));
}

// === Tags ===

#[tokio::test]
async fn litellm_tags_follow_the_client_tags_in_the_original_order() {
    let mock = mock().await;
    let secrets = SecretsFile::new();
    let gw = gateway(&mock, "litellm", &secrets, "").await;
    // Percent-encoded segments are decoded; a `:` inside a value is fine.
    let path =
        "/v1/rollout_id/r1/invocation_id/inv%3A1/experiment_id/exp1/run_id/run%201/row_id/row:1/chat/completions";
    let body = json!({
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"tags": ["pre", "team:x"], "foo": "bar", "nested": {"a": 1}},
    });
    let mut seen_ids = Vec::new();
    for stream in [false, true] {
        let mut body = body.clone();
        body["stream"] = json!(stream);
        let reply = post_json(&gw.url(path), &[], &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let id = insertion_id(&reply.headers);
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 7, "{id}");
        assert_eq!(id, uuid.hyphenated().to_string(), "lowercase, 36 characters");
        let sent = mock.requests().pop().unwrap().json();
        let expected_tags = json!([
            "pre",
            "team:x",
            "rollout_id:r1",
            format!("insertion_id:{id}"),
            "invocation_id:inv:1",
            "experiment_id:exp1",
            "run_id:run 1",
            "row_id:row:1",
        ]);
        assert_eq!(sent["metadata"]["tags"], expected_tags, "client tags first, then the six in order");
        assert_eq!(sent["metadata"]["foo"], "bar");
        assert_eq!(sent["metadata"]["nested"], json!({"a": 1}));
        assert_eq!(sent["metadata"].as_object().unwrap().len(), 3, "no other metadata keys");
        seen_ids.push(id);
    }
    assert_ne!(seen_ids[0], seen_ids[1], "one id per completion");

    // No client metadata: `metadata` is created with only the six tags.
    let reply = post_json(&gw.url(&format!("{}{CHAT}", ids("r2"))), &[], &chat_body("gpt-test", false)).await;
    let id = insertion_id(&reply.headers);
    assert_eq!(mock.requests().pop().unwrap().json()["metadata"], json!({"tags": six_tags("r2", &id)}));
}

// === Upstream bodies ===

#[tokio::test]
async fn litellm_body_is_the_spec_example() {
    let mock = mock().await;
    let secrets = SecretsFile::new();
    let gw = gateway(&mock, "litellm", &secrets, &format!("encoded_base_url: {{allow: [\"{FIREWORKS}\"]}}\n")).await;
    // Spec §3's example request, as the Eval Protocol client sends it.
    let path = format!("{}/encoded_base_url/{}{CHAT}", ids("r1"), b64(FIREWORKS, true));
    assert!(path.ends_with("/encoded_base_url/aHR0cHM6Ly9hcGkuZmlyZXdvcmtzLmFpL2luZmVyZW5jZS92MQ==/chat/completions"));
    let client = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "metadata": {"tags": ["pre"], "foo": "bar"}});
    let auth = [("authorization", "Bearer sk-client")];

    // Spec §5.1, a Fireworks model: `api_key` from the bearer token.
    let model = "fireworks_ai/accounts/fireworks/models/x";
    let reply = post_json(&gw.url(&path), &auth, &client(model)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let id = insertion_id(&reply.headers);
    let seen = mock.requests().pop().unwrap();
    let expected = json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"tags": ["pre", "rollout_id:r1", format!("insertion_id:{id}"),
                              "invocation_id:inv1", "experiment_id:exp1", "run_id:run1", "row_id:row1"],
                     "foo": "bar"},
        "base_url": FIREWORKS,
        "api_key": "sk-client",
        "langfuse_public_key": "pk-lf-a", "langfuse_secret_key": "sk-lf-a", "langfuse_host": LANGFUSE_HOST,
    });
    assert_eq!(seen.json(), expected);
    assert_eq!(seen.headers["authorization"], "Bearer sk-client", "the header is forwarded too");

    // `gpt-4o`: the same body without `api_key`.
    let reply = post_json(&gw.url(&path), &auth, &client("gpt-4o")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let id = insertion_id(&reply.headers);
    let mut expected = expected;
    expected["model"] = json!("gpt-4o");
    expected["metadata"]["tags"][2] = json!(format!("insertion_id:{id}"));
    expected.as_object_mut().unwrap().remove("api_key");
    assert_eq!(mock.requests().pop().unwrap().json(), expected);

    // Project-only route: no `metadata` key unless the client sent one, no tags, no id.
    let reply = post_json(
        &gw.url(&format!("/project_id/proj-b{CHAT}")),
        &auth,
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.get("x-insertion-id").is_none());
    assert_eq!(
        mock.requests().pop().unwrap().json(),
        json!({
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "api_key": "sk-client",
            "langfuse_public_key": "pk-lf-b", "langfuse_secret_key": "sk-lf-b", "langfuse_host": LANGFUSE_HOST,
        })
    );
}

#[tokio::test]
async fn openai_body_is_the_client_body_without_tags_and_the_base_url_picks_the_host() {
    let default = mock().await;
    let chosen = mock().await;
    let secrets = SecretsFile::new();
    let chosen_url = chosen.url();
    let gw = gateway(&default, "openai", &secrets, &format!("encoded_base_url: {{allow: [\"{chosen_url}\"]}}\n")).await;
    let model = "fireworks_ai/accounts/fireworks/models/x";
    let client = json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"tags": ["pre"], "foo": "bar"},
        "temperature": 0.5,
    });
    let mut expected = client.clone();
    expected["metadata"] = json!({"foo": "bar"});
    let auth = [("authorization", "Bearer sk-client")];

    // An allowed `encoded_base_url` is the upstream base URL of that request.
    let path = format!("/v1/project_id/proj-b{}/encoded_base_url/{}{CHAT}", ids("r1"), b64(&chosen_url, true));
    let reply = post_json(&gw.url(&path), &auth, &client).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    insertion_id(&reply.headers);
    assert_eq!(default.requests().len(), 0, "the configured upstream is not called");
    let seen = chosen.requests().pop().expect("the chosen host got the request");
    assert_eq!(seen.uri, "/v1/chat/completions");
    assert_eq!(seen.json(), expected, "client body minus metadata.tags; no tags, keys, api_key or base_url");
    assert_eq!(seen.headers["authorization"], "Bearer sk-client");

    // Without it: the configured upstream, the same body.
    let reply = post_json(&gw.url(&format!("{}{CHAT}", ids("r1"))), &auth, &client).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(default.requests().pop().unwrap().json(), expected);

    // A body without metadata goes as it came, on every kind of chat route.
    let plain = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "n": 1});
    for path in [format!("{}{CHAT}", ids("r1")), format!("/project_id/proj-a{CHAT}"), format!("/v1{CHAT}")] {
        let reply = post_json(&gw.url(&path), &auth, &plain).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(default.requests().pop().unwrap().json(), plain, "{path}");
    }
    // Only-tags metadata: nothing of it reaches the upstream.
    let only_tags = json!({"model": "gpt-test", "messages": [], "metadata": {"tags": ["a", "b"]}});
    let reply = post_json(&gw.url(&format!("{}{CHAT}", ids("r1"))), &auth, &only_tags).await;
    assert_eq!(reply.status, StatusCode::OK);
    let sent = default.requests().pop().unwrap().json();
    assert!(sent.pointer("/metadata/tags").is_none(), "{sent}");
    assert_eq!(sent["messages"], json!([]));
}

#[tokio::test]
async fn a_fallback_to_an_upstream_of_the_other_mode_gets_that_modes_body_and_the_same_tags() {
    let lite = mock().await;
    let oai = mock().await;
    let secrets = SecretsFile::new();
    let yaml = format!(
        "upstreams:\n  lite: {{url: \"{}\", mode: litellm}}\n  oai: {{url: \"{}\", mode: openai}}\n\
         default_upstream: lite\n\
         langfuse: {{host: \"{LANGFUSE_HOST}\", secrets_path: \"{}\", emit: off}}\n\
         models:\n\
         \x20 - {{name: alpha, upstream: lite, fallbacks: [beta]}}\n\
         \x20 - {{name: beta, upstream: oai}}\n\
         \x20 - {{name: gamma, upstream: oai, fallbacks: [\"fireworks_ai/delta\"]}}\n\
         \x20 - {{name: \"fireworks_ai/delta\", upstream: lite}}\n",
        lite.url(),
        oai.url(),
        secrets.path()
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let path = gw.url(&format!("{}{CHAT}", ids("rf")));
    let client = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "metadata": {"tags": ["pre"], "foo": "bar"}});
    let headers = |failing: &str| {
        [
            ("authorization", "Bearer sk-client"),
            (
                "x-mock-fail",
                if failing == "alpha" { "alpha=429:rate_limit_exceeded" } else { "gamma=429:rate_limit_exceeded" },
            ),
            ("x-mock-retry-after", "30"),
        ]
    };
    let litellm_body = |model: &str, id: &str, api_key: bool| {
        let mut body = client(model);
        body["metadata"]["tags"] =
            json!(["pre"].into_iter().map(String::from).chain(six_tags("rf", id)).collect::<Vec<_>>());
        body["langfuse_public_key"] = json!("pk-lf-a");
        body["langfuse_secret_key"] = json!("sk-lf-a");
        body["langfuse_host"] = json!(LANGFUSE_HOST);
        if api_key {
            body["api_key"] = json!("sk-client");
        }
        body
    };
    let openai_body = |model: &str| {
        let mut body = client(model);
        body["metadata"] = json!({"foo": "bar"});
        body
    };

    // litellm first, openai on fallback.
    let reply = post_json(&path, &headers("alpha"), &client("alpha")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let id = insertion_id(&reply.headers);
    assert_eq!(lite.requests().pop().expect("first attempt").json(), litellm_body("alpha", &id, false));
    assert_eq!(oai.requests().pop().expect("fallback attempt").json(), openai_body("beta"));

    // openai first, litellm on fallback (and a `fireworks_ai` model there: `api_key` too).
    let reply = post_json(&path, &headers("gamma"), &client("gamma")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let id = insertion_id(&reply.headers);
    assert_eq!(oai.requests().pop().expect("first attempt").json(), openai_body("gamma"));
    assert_eq!(lite.requests().pop().expect("fallback attempt").json(), litellm_body("fireworks_ai/delta", &id, true));
    assert_eq!((lite.requests().len(), oai.requests().len()), (2, 2), "one re-send per request");
}

// === Redis ===

#[tokio::test]
async fn the_redis_set_holds_exactly_the_returned_ids_with_a_day_of_ttl() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, &redis_yaml(&redis)).await;
    let url = gw.url(&format!("/v1{}{CHAT}", ids("rs-1")));
    let mut returned = Vec::new();
    for _ in 0..3 {
        returned.push(completed(&url).await);
    }
    for _ in 0..2 {
        returned.push(streamed(&url, &[("x-mock-chunks", "3")]).await.0);
    }
    // Another rollout, and routes without one, leave this set alone.
    let other = completed(&gw.url(&format!("{}{CHAT}", ids("rs-2")))).await;
    for path in ["/v1/chat/completions", "/project_id/p/chat/completions"] {
        let reply = post_json(&gw.url(path), &[], &chat_body("gpt-test", false)).await;
        assert!(reply.headers.get("x-insertion-id").is_none());
    }
    assert_eq!(set_of(&returned).len(), 5);
    eventually("all five ids in SMEMBERS rs-1", || smembers(&redis, "rs-1") == Some(set_of(&returned))).await;
    eventually("the other rollout's id", || smembers(&redis, "rs-2") == Some(set_of(&[&other]))).await;
    let ttl = redis_int(&redis, "TTL", "rs-1");
    assert!((86_000..=86_400).contains(&ttl), "TTL {ttl}");
    let kind: String = redis::cmd("TYPE").arg("rs-1").query(&mut redis_conn(&redis).unwrap()).unwrap();
    assert_eq!(kind, "set");
}

#[tokio::test]
async fn the_prefix_and_the_ttl_are_configurable() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let yaml = format!("{}insertion_id: {{prefix: \"ep:\", ttl_secs: 120}}\n", redis_yaml(&redis));
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let id = completed(&gw.url(&format!("{}{CHAT}", ids("rp")))).await;
    eventually("the id under the prefixed key", || smembers(&redis, "ep:rp") == Some(set_of(&[&id]))).await;
    let ttl = redis_int(&redis, "TTL", "ep:rp");
    assert!((100..=120).contains(&ttl), "TTL {ttl}");
    assert_eq!(redis_int(&redis, "EXISTS", "rp"), 0, "nothing under the bare key");
}

#[tokio::test]
async fn a_success_is_recorded_before_the_client_sees_the_end_of_it() {
    let redis = RedisServer::start();
    let mock = mock().await;
    // A generous record timeout: the record is part of the response, never left to the background.
    let yaml = format!("{}insertion_id: {{record_timeout_ms: 10000}}\n", redis_yaml(&redis));
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&format!("{}{CHAT}", ids("rb")));

    let json_id = completed(&url).await;
    assert_eq!(smembers(&redis, "rb"), Some(set_of(&[&json_id])), "recorded when the JSON response came");

    let req = request(
        Method::POST,
        &url,
        &[("content-type", "application/json"), ("x-mock-chunks", "3")],
        chat_body("gpt-test", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let sse_id = insertion_id(response.headers());
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(frame) = within(body.frame()).await {
        let Ok(data) = frame.unwrap().into_data() else { continue };
        let chunk = String::from_utf8_lossy(&data).into_owned();
        if chunk.contains("[DONE]") {
            // The final chunk is released only once the record is written.
            assert_eq!(smembers(&redis, "rb"), Some(set_of(&[&json_id, &sse_id])));
        }
        text.push_str(&chunk);
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn streams_are_recorded_only_when_they_complete() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let yaml = format!("{}insertion_id: {{record_timeout_ms: 10000}}\n", redis_yaml(&redis));
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&format!("{}{CHAT}", ids("rc")));

    // The client goes away mid-stream (the second chunk would come after ten minutes).
    let req = request(
        Method::POST,
        &url,
        &[("content-type", "application/json"), ("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "600000")],
        chat_body("gpt-test", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let dropped_id = insertion_id(response.headers());
    let mut body = response.into_body();
    let first = within(body.frame()).await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("tok0"));
    drop(body);
    eventually("the dropped stream ends as cancelled", || {
        gw.metric("llmgate_chat_responses_total", &[r#"end="cancelled""#]) == 1
    })
    .await;

    // The upstream cuts the stream after two chunks.
    let req = request(
        Method::POST,
        &url,
        &[
            ("content-type", "application/json"),
            ("x-mock-chunks", "5"),
            ("x-mock-chunk-delay-ms", "50"),
            ("x-mock-cut-after", "2"),
        ],
        chat_body("gpt-test", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let cut_id = insertion_id(response.headers());
    let received = within(response.into_body().collect()).await.map(|c| c.to_bytes());
    if let Ok(bytes) = &received {
        assert!(!String::from_utf8_lossy(bytes).contains("[DONE]"), "a cut stream must not look complete");
    }
    eventually("the cut stream ends as failed", || gw.metric("llmgate_chat_responses_total", &[r#"end="error""#]) == 1)
        .await;

    // A stream that completes is recorded; the two others never are.
    let (done_id, _) = streamed(&url, &[("x-mock-chunks", "3")]).await;
    assert_eq!(smembers(&redis, "rc"), Some(set_of(&[&done_id])));
    assert_ne!(dropped_id, cut_id);
    eventually("one completed stream", || gw.metric("llmgate_chat_responses_total", &[r#"end="complete""#]) == 1).await;
}

#[tokio::test]
async fn error_responses_are_not_recorded() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let yaml = format!("{}insertion_id: {{record_timeout_ms: 10000}}\n", redis_yaml(&redis));
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&format!("{}{CHAT}", ids("re")));
    for status in ["400", "401", "404", "422", "500", "502", "503"] {
        for stream in [false, true] {
            let reply = post_json(&url, &[("x-mock-status", status)], &chat_body("gpt-test", stream)).await;
            assert_eq!(reply.status.as_str(), status, "the upstream status passes through");
        }
    }
    assert_eq!(mock.chat_requests(), 14);
    let ok = completed(&url).await;
    assert_eq!(smembers(&redis, "re"), Some(set_of(&[ok])), "only the success");
}

#[tokio::test]
async fn redis_down_at_start_serves_requests_and_records_once_it_is_back() {
    let mut redis = RedisServer::start();
    redis.kill();
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, &redis_yaml(&redis)).await;
    let url = gw.url(&format!("{}{CHAT}", ids("rd")));
    let mut served = Vec::new();
    for _ in 0..3 {
        served.push(completed(&url).await);
        served.push(streamed(&url, &[("x-mock-chunks", "2")]).await.0);
    }
    redis.restart();
    eventually("every served id is in the set once Redis is back", || smembers(&redis, "rd") == Some(set_of(&served)))
        .await;
    let ttl = redis_int(&redis, "TTL", "rd");
    assert!((86_000..=86_400).contains(&ttl), "TTL {ttl}");
}

#[tokio::test]
async fn redis_killed_mid_run_serves_requests_and_records_once_it_is_back() {
    // Persistence on, so that what was recorded before the crash survives it.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, &redis_yaml(&redis)).await;
    let url = gw.url(&format!("{}{CHAT}", ids("rk")));
    let mut served = vec![completed(&url).await, streamed(&url, &[]).await.0];
    eventually("recorded before the crash", || smembers(&redis, "rk") == Some(set_of(&served))).await;

    redis.kill();
    for _ in 0..3 {
        served.push(completed(&url).await);
        served.push(streamed(&url, &[("x-mock-chunks", "2")]).await.0);
    }
    // Also a request of another rollout while Redis is down.
    let other = completed(&gw.url(&format!("{}{CHAT}", ids("rk-2")))).await;
    redis.restart();
    eventually("every served id is in the set once Redis is back", || smembers(&redis, "rk") == Some(set_of(&served)))
        .await;
    eventually("the other rollout too", || smembers(&redis, "rk-2") == Some(set_of(&[&other]))).await;
}

// === Auth ===

#[tokio::test]
async fn api_keys_guard_every_route_but_health_and_are_never_forwarded() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "auth: {api_keys: [\"gw-key-1\", \"gw-key-2\"]}\n").await;
    let chat_routes = [format!("{}{CHAT}", ids("ra")), format!("/v1/project_id/p{CHAT}"), format!("/v1{CHAT}")];
    let refused = [
        vec![],
        vec![("authorization", "Bearer gw-key-3")],
        vec![("authorization", "Bearer gw-key-1x")],
        vec![("authorization", "Bearer gw-key")],
        vec![("authorization", "gw-key-1")],
        vec![("authorization", "Basic gw-key-1")],
    ];
    for headers in &refused {
        for path in &chat_routes {
            let reply = post_json(&gw.url(path), headers, &chat_body("gpt-test", false)).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path} {headers:?}");
            assert_eq!(reply.json()["error"]["type"], "authentication_error");
            assert!(reply.headers.get("x-insertion-id").is_none());
        }
        for (method, path) in [
            (Method::GET, "/v1/models"),
            (Method::POST, "/v1/embeddings"),
            (Method::DELETE, "/v1/files/x"),
            (Method::GET, "/v1/traces?tags=rollout_id:ra"),
            (Method::GET, "/traces/pointwise"),
            (Method::GET, "/v1/project_id/p/traces"),
            (Method::GET, "/stats"),
        ] {
            let reply = send(method.clone(), &gw.url(path), headers, "{}").await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{method} {path} {headers:?}");
            assert!(reply.json().is_object(), "a JSON error");
        }
    }
    assert_eq!(mock.requests().len(), 0, "nothing refused reached the upstream");

    let reply = send(Method::GET, &gw.url("/health"), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK, "/health stays open");

    for key in ["Bearer gw-key-1", "bearer gw-key-2"] {
        let reply = post_json(&gw.url(&chat_routes[0]), &[("authorization", key)], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        insertion_id(&reply.headers);
        let seen = mock.requests().pop().unwrap();
        assert!(seen.headers.get("authorization").is_none(), "the gateway key is not forwarded");
        let reply = send(Method::GET, &gw.url("/v1/models"), &[("authorization", key)], "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.json()["headers"].get("authorization").is_none(), "not on the catch-all either");
    }

    // An upstream with a server-side key gets that key instead.
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai, api_key_env: MOCK_KEY}}\nauth: {{api_keys: [\"gw-key-1\"]}}\n",
        mock.url()
    );
    let gw = TestGateway::start(&yaml, &[("MOCK_KEY", "sk-server")]).await;
    let reply =
        post_json(&gw.url(&chat_routes[0]), &[("authorization", "Bearer gw-key-1")], &chat_body("gpt-test", false))
            .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.requests().pop().unwrap().headers["authorization"], "Bearer sk-server");
}

// === The encoded_base_url allowlist ===

#[tokio::test]
async fn an_empty_allowlist_refuses_every_base_url_with_a_how_to() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    for url in [FIREWORKS, &mock.url()] {
        let path = format!("/v1{}/encoded_base_url/{}{CHAT}", ids("r1"), b64(url, true));
        let reply = post_json(&gw.url(&path), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        assert_eq!(reply.json()["error"]["type"], "permission_error");
        let message = error_message(&reply);
        assert!(message.contains("encoded_base_url.allow"), "says how to allow it: {message}");
    }
    assert_eq!(mock.requests().len(), 0);
}

/// A server that answers every request with a redirect to `location` and counts requests.
async fn redirector(location: String) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let location = location.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let response = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn the_allowlist_matches_parsed_urls_and_refuses_internal_hosts() {
    let default = mock().await;
    let chosen = mock().await;
    let port = chosen.addr().port();
    let elsewhere = mock().await;
    let (redirect, redirect_hits) = redirector(format!("{}/chat/completions", elsewhere.url())).await;
    let allow = format!(
        "encoded_base_url: {{allow: [\"https://api.example.com/v1\", \"http://127.0.0.1:{port}/v1\", \"http://{redirect}/v1\"]}}\n"
    );
    let gw = TestGateway::in_front_of(&default, &allow).await;
    let path = |url: &str, padded: bool| gw.url(&format!("{}/encoded_base_url/{}{CHAT}", ids("r1"), b64(url, padded)));

    for url in [
        "file:///etc/passwd".to_string(),
        "gopher://api.example.com/v1".to_string(),
        format!("http://localhost:{port}/v1"),
        format!("http://127.0.0.2:{port}/v1"),
        format!("http://[::1]:{port}/v1"),
        format!("http://0.0.0.0:{port}/v1"),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "https://169.254.169.254/v1".to_string(),
        "https://api.example.com.evil.net/v1".to_string(),
        "https://api.example.com.evil.net".to_string(),
        "https://evil.net/api.example.com/v1".to_string(),
        "https://api.example.com@evil.net/v1".to_string(),
        "https://user@api.example.com/v1".to_string(),
        "https://api.example.com/v1evil".to_string(),
        "https://api.example.com/v2".to_string(),
        "https://api.example.com".to_string(),
        "https://api.example.com/v1/../admin".to_string(),
        "https://api.example.com/v1/%2e%2e/admin".to_string(),
        "http://api.example.com/v1".to_string(),
        "https://api.example.com:8443/v1".to_string(),
        format!("http://127.0.0.1:{port}/v2"),
        format!("https://127.0.0.1:{port}/v1"),
        format!("http://127.0.0.1:{}/v1", port.wrapping_add(1)),
    ] {
        let reply = post_json(&path(&url, true), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{url}: {}", reply.text());
        let message = error_message(&reply);
        assert!(message.contains("not allowed"), "{url}: {message}");
    }
    assert_eq!(default.requests().len() + chosen.requests().len() + elsewhere.requests().len(), 0);

    // Allowed: the listed prefix, padded or not, and paths below it.
    for (url, padded, uri) in [
        (chosen.url(), true, "/v1/chat/completions"),
        (chosen.url(), false, "/v1/chat/completions"),
        (format!("{}/", chosen.url()), true, "/v1/chat/completions"),
        (format!("{}/accounts/x", chosen.url()), true, "/v1/accounts/x/chat/completions"),
    ] {
        let reply = post_json(&path(&url, padded), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {}", reply.text());
        assert_eq!(chosen.requests().pop().expect("the allowed host").uri, uri);
    }
    assert_eq!(default.requests().len(), 0);

    // An allowed host that redirects elsewhere: the redirect is not followed.
    let reply = post_json(&path(&format!("http://{redirect}/v1"), true), &[], &chat_body("gpt-test", false)).await;
    assert_eq!(redirect_hits.load(Ordering::SeqCst), 1);
    assert_eq!(reply.status, StatusCode::TEMPORARY_REDIRECT, "passed on, not followed");
    assert_eq!(elsewhere.requests().len(), 0, "the redirect target is never called");
}

// === The error table (§13), chat rows ===

#[tokio::test]
async fn bad_encoded_base_url_is_a_400_with_the_original_message() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, &format!("encoded_base_url: {{allow: [\"{FIREWORKS}\"]}}\n")).await;
    for segment in [
        "!!!!".to_string(),
        "aHR0cHM6Ly9hcGkuZmlyZXdvcmtzLmFpL2luZmVyZW5jZS92MQ=*".to_string(),
        "a".to_string(),
        "aGk+".to_string(),
        "aGk=aGk=".to_string(),
        b64_bytes(&[0xff, 0xfe, 0xfd], true),
    ] {
        let path = format!("{}/encoded_base_url/{segment}{CHAT}", ids("r1"));
        let reply = post_json(&gw.url(&path), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{segment}: {}", reply.text());
        let message = error_message(&reply);
        assert!(message.starts_with("Invalid encoded_base_url: "), "{segment}: {message}");
    }
    assert_eq!(mock.requests().len(), 0);
}

#[tokio::test]
async fn malformed_path_segments_are_a_400_naming_the_segment() {
    let mock = mock().await;
    let secrets = SecretsFile::new();
    let gw = gateway(&mock, "litellm", &secrets, &format!("encoded_base_url: {{allow: [\"{FIREWORKS}\"]}}\n")).await;
    let names = ["project_id", "rollout_id", "invocation_id", "experiment_id", "run_id", "row_id", "encoded_base_url"];
    let good = |name: &str| match name {
        "project_id" => "proj-a".to_string(),
        "encoded_base_url" => b64(FIREWORKS, true),
        other => format!("{}1", &other[..3]),
    };
    let path_with = |bad_name: &str, bad: &str| {
        let mut path = String::from("/v1");
        for name in names {
            let value = if name == bad_name { bad.to_string() } else { good(name) };
            path.push_str(&format!("/{name}/{value}"));
        }
        path.push_str(CHAT);
        path
    };
    // The good path works.
    let reply = post_json(&gw.url(&path_with("", "")), &[], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let before = mock.requests().len();

    for name in names {
        let too_long = match name {
            "project_id" => 201,
            "encoded_base_url" => 4097,
            tag => 200 - tag.len(), // `{tag}:{value}` is then 201 characters
        };
        for bad in [
            String::new(),
            "a%2Fb".to_string(),
            "a%2fb".to_string(),
            "%00".to_string(),
            "a%0Ab".to_string(),
            "a%7Fb".to_string(),
            "%FF".to_string(),
            "%E2%82".to_string(),
            "%zz".to_string(),
            "%2E%2E".to_string(),
            "x".repeat(too_long),
        ] {
            let path = path_with(name, &bad);
            let reply = post_json(&gw.url(&path), &[], &chat_body("gpt-test", false)).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{name}={bad:?}: {}", reply.text());
            let message = error_message(&reply);
            assert!(message.contains(&format!("'{name}'")), "{name}={bad:?}: {message}");
        }
    }
    assert_eq!(mock.requests().len(), before, "nothing malformed reached the upstream");

    // The limit itself is fine: a 200-character tag.
    let value = "x".repeat(200 - "rollout_id:".len());
    let path = format!("{}{CHAT}", ids(&value));
    let reply = post_json(&gw.url(&path), &[], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let tags = mock.requests().pop().unwrap().json()["metadata"]["tags"].clone();
    assert_eq!(tags[0].as_str().unwrap().chars().count(), 200);
}

#[tokio::test]
async fn invalid_json_and_non_objects_are_a_400_and_oversized_bodies_a_413() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let yaml = format!("{}body_limit_bytes: 1024\n", redis_yaml(&redis));
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    for path in [format!("{}{CHAT}", ids("rj")), format!("/v1{CHAT}")] {
        for (body, needle) in [
            ("{\"model\": ".to_string(), "Invalid JSON"),
            ("not json".to_string(), "Invalid JSON"),
            ("[1]".to_string(), "must be a JSON object"),
            ("\"text\"".to_string(), "must be a JSON object"),
            ("42".to_string(), "must be a JSON object"),
            // Shapes the original answered with a 500 (§5 step 6).
            (r#"{"model": "m", "metadata": "x"}"#.to_string(), "'metadata' must be an object"),
            (r#"{"model": "m", "metadata": {"tags": "x"}}"#.to_string(), "'metadata.tags' must be a list"),
        ] {
            let reply = send(Method::POST, &gw.url(&path), &[("content-type", "application/json")], body.clone()).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path} {body}");
            assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
            let message = error_message(&reply);
            assert!(message.contains(needle), "{body}: {message}");
        }
        let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
        let reply = post_json(&gw.url(&path), &[], &big).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        assert_eq!(reply.json()["error"]["code"], "payload_too_large");
    }
    assert_eq!(mock.requests().len(), 0);
    assert_eq!(redis_int(&redis, "EXISTS", "rj"), 0, "nothing recorded");
}

#[tokio::test]
async fn an_unknown_project_is_a_404_naming_only_that_project() {
    let mock = mock().await;
    let secrets = SecretsFile::new();
    for mode in ["litellm", "openai"] {
        let gw = gateway(&mock, mode, &secrets, "").await;
        for path in [
            format!("/project_id/nope{CHAT}"),
            format!("/v1/project_id/nope{CHAT}"),
            format!("/project_id/nope{}{CHAT}", ids("r1")),
            format!("/v1/project_id/nope{}{CHAT}", ids("r1")),
        ] {
            let reply = post_json(&gw.url(&path), &[], &chat_body("gpt-test", false)).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{mode} {path}: {}", reply.text());
            assert_eq!(reply.json()["error"]["code"], "not_found");
            let message = error_message(&reply);
            assert!(message.contains("'nope'"), "{message}");
            let text = reply.text();
            for secret in ["proj-a", "proj-b", "pk-lf", "sk-lf"] {
                assert!(!text.contains(secret), "{secret} leaked: {text}");
            }
        }
        // The configured projects still work.
        let reply = post_json(&gw.url(&format!("/project_id/proj-b{CHAT}")), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(mock.requests().len(), 2, "only the two good requests reached the upstream");
}

#[tokio::test]
async fn upstream_unreachable_is_a_502_and_a_timeout_a_504_on_rollout_routes() {
    let redis = RedisServer::start();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for mode in ["openai", "litellm"] {
        let yaml = format!("upstreams:\n  dead: {{url: \"http://{closed}/v1\", mode: {mode}}}\n{}", redis_yaml(&redis));
        let gw = TestGateway::start(&yaml, &[]).await;
        for stream in [false, true] {
            let reply = post_json(&gw.url(&format!("{}{CHAT}", ids("ru"))), &[], &chat_body("m", stream)).await;
            assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{mode}");
            assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        }
    }
    assert_eq!(redis_int(&redis, "EXISTS", "ru"), 0);

    let mock = mock().await;
    let yaml = format!("request_timeout_secs: 0.3\n{}insertion_id: {{record_timeout_ms: 10000}}\n", redis_yaml(&redis));
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&format!("/v1{}{CHAT}", ids("rt")));
    for stream in [false, true] {
        let reply = post_json(&url, &[("x-mock-hang", "1")], &chat_body("m", stream)).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    }
    let ok = completed(&url).await;
    assert_eq!(smembers(&redis, "rt"), Some(set_of(&[ok])), "only the success is recorded");
}

#[tokio::test]
async fn other_methods_on_chat_routes_are_405_with_allow_post() {
    let mock = mock().await;
    let secrets = SecretsFile::new();
    let gw = gateway(&mock, "litellm", &secrets, &format!("encoded_base_url: {{allow: [\"{FIREWORKS}\"]}}\n")).await;
    let ids = ids("r1");
    let enc = b64(FIREWORKS, true);
    for path in [
        format!("{ids}{CHAT}"),
        format!("/v1/project_id/proj-b{ids}/encoded_base_url/{enc}{CHAT}"),
        format!("/project_id/proj-b{CHAT}"),
        CHAT.to_string(),
        format!("/v1{CHAT}"),
    ] {
        for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
            let reply = send(method.clone(), &gw.url(&path), &[("content-type", "application/json")], "{}").await;
            assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(reply.headers["allow"], "POST");
            assert_eq!(reply.json()["error"]["code"], "method_not_allowed");
            assert!(reply.headers.get("x-insertion-id").is_none());
        }
    }
    assert_eq!(mock.requests().len(), 0);
}
