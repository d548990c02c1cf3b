//! `/logs` and `/status` (issue 17): eval-protocol's rollout log writer and status readers,
//! in memory and on Redis, across two replicas, with their bounds, auth, projects and bad input.

use http::{Method, StatusCode};
use llmgate_test_support::redis::RedisServer;
use serde_json::{Value, json};

use crate::support::{Reply, TempDir, TestGateway, mock, post_json, send};

/// What eval-protocol's `FireworksTracingHttpHandler` posts for a record of `rollout_id`.
fn record(rollout_id: &str, message: &str, status: Option<Value>) -> Value {
    json!({
        "program": "eval_protocol",
        "status": status,
        "message": message,
        "tags": [format!("rollout_id:{rollout_id}"), "experiment_id:exp-1", "run_id:run-1"],
        "extras": {"logger_name": "rollout", "level": "INFO", "timestamp": "2026-12-05T08:00:00.000000Z", "step": message},
    })
}

fn code(code: i64, message: &str) -> Option<Value> {
    Some(json!({"code": code, "message": message, "details": [{"reason": message}]}))
}

async fn log(gw: &TestGateway, path: &str, body: &Value) -> Reply {
    post_json(&gw.url(path), &[], body).await
}

async fn get(gw: &TestGateway, path: &str) -> Reply {
    send(Method::GET, &gw.url(path), &[], "").await
}

fn messages(reply: &Reply) -> Vec<String> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let entries = reply.json()["entries"].as_array().cloned().unwrap_or_default();
    entries.iter().map(|e| e["message"].as_str().unwrap_or_default().to_string()).collect()
}

/// The protocol as eval-protocol's processor and writer use it, on one gateway.
async fn round_trip(extra_yaml: &str) {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, extra_yaml).await;

    // Before any log: a status of null, an empty log.
    let reply = get(&gw, "/v1/status?rollout_id=r1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"rollout_id": "r1", "status": null, "extras": null}));
    assert_eq!(messages(&get(&gw, "/logs?tags=rollout_id:r1").await), Vec::<String>::new());

    // RUNNING, a plain log, then FINISHED: the status follows the newest status-bearing entry.
    assert_eq!(log(&gw, "/logs", &record("r1", "started", code(101, "running"))).await.status, StatusCode::OK);
    assert_eq!(get(&gw, "/v1/status?rollout_id=r1").await.json()["status"]["code"], 101);
    let reply = log(&gw, "/v1/logs", &record("r1", "step 1", None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["rollout_ids"], json!(["r1"]));
    assert_eq!(get(&gw, "/status?rollout_id=r1").await.json()["status"]["code"], 101);
    assert_eq!(log(&gw, "/logs", &record("r1", "ended", code(100, "Rollout finished"))).await.status, StatusCode::OK);
    let status = get(&gw, "/v1/status?rollout_id=r1").await.json();
    assert_eq!(status["rollout_id"], "r1");
    assert_eq!(
        status["status"],
        json!({"code": 100, "message": "Rollout finished", "details": [{"reason": "Rollout finished"}]})
    );
    assert_eq!(status["extras"]["step"], "ended");

    // What the processor reads once the status ended: newest first, every field it uses.
    let reply = get(&gw, "/logs?tags=rollout_id%3Ar1&limit=100&hours_back=24&program=eval_protocol").await;
    assert_eq!(messages(&reply), ["ended", "step 1", "started"]);
    let newest = &reply.json()["entries"][0];
    assert_eq!(newest["severity"], "INFO");
    assert_eq!(newest["tags"], json!(["rollout_id:r1", "experiment_id:exp-1", "run_id:run-1"]));
    assert_eq!(newest["status"]["code"], 100);
    assert_eq!(newest["extras"]["logger_name"], "rollout");
    assert!(newest["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{newest}");
    assert_eq!(reply.json()["evicted"], 0);

    // Filters: every tag, the program, the limit.
    assert_eq!(messages(&get(&gw, "/v1/logs?tags=rollout_id:r1&tags=run_id:run-1&limit=2").await), ["ended", "step 1"]);
    assert!(messages(&get(&gw, "/logs?tags=rollout_id:r1&tags=run_id:other").await).is_empty());
    assert!(messages(&get(&gw, "/logs?tags=rollout_id:r1&program=other").await).is_empty());

    // A groupwise record is seen under each of its rollouts.
    let mut groupwise = record("g1", "group ended", code(100, "done"));
    groupwise["tags"] = json!(["rollout_id:g1", "experiment_id:exp-1", "rollout_id:g2", "rollout_id:g3"]);
    assert_eq!(log(&gw, "/logs", &groupwise).await.json()["rollout_ids"], json!(["g1", "g2", "g3"]));
    for rollout in ["g1", "g2", "g3"] {
        assert_eq!(get(&gw, &format!("/status?rollout_id={rollout}")).await.json()["status"]["code"], 100);
        assert_eq!(messages(&get(&gw, &format!("/logs?tags=rollout_id:{rollout}")).await), ["group ended"]);
    }

    // A status code eval-protocol does not know is kept as sent.
    log(&gw, "/logs", &record("r2", "odd", code(777, "custom"))).await;
    assert_eq!(get(&gw, "/status?rollout_id=r2").await.json()["status"]["code"], 777);

    assert!(mock.requests().is_empty(), "none of it reached the upstream: {:?}", mock.requests().len());
    assert_eq!(gw.metric("llmgate_rollout_log_entries_total", &[r#"outcome="written""#]), 5);
    assert_eq!(gw.metric("llmgate_rollout_status_polls_total", &[r#"outcome="none""#]), 1);
    assert_eq!(gw.metric("llmgate_rollout_status_polls_total", &[r#"outcome="running""#]), 2);
    assert_eq!(gw.metric("llmgate_requests_total", &[r#"route="logs""#]), 13);
}

#[tokio::test]
async fn logs_and_status_round_trip_in_memory() {
    round_trip("").await;
}

#[tokio::test]
async fn logs_and_status_round_trip_on_redis() {
    let redis = RedisServer::start();
    round_trip(&format!("redis: {{url: \"{}\"}}\n", redis.url())).await;
}

#[tokio::test]
async fn two_replicas_on_one_redis_serve_each_others_logs() {
    let redis = RedisServer::start();
    let yaml = format!("redis: {{url: \"{}\"}}\n", redis.url());
    let mock = mock().await;
    let (a, b) = (TestGateway::in_front_of(&mock, &yaml).await, TestGateway::in_front_of(&mock, &yaml).await);
    log(&a, "/logs", &record("r", "started", code(101, "running"))).await;
    assert_eq!(get(&b, "/v1/status?rollout_id=r").await.json()["status"]["code"], 101);
    log(&b, "/logs", &record("r", "ended", code(13, "boom"))).await;
    assert_eq!(get(&a, "/v1/status?rollout_id=r").await.json()["status"]["code"], 13);
    assert_eq!(messages(&get(&a, "/logs?tags=rollout_id:r").await), ["ended", "started"]);
}

#[tokio::test]
async fn the_bound_evicts_the_oldest_entries_but_never_the_latest_status() {
    for store in ["memory", "redis"] {
        let redis = RedisServer::start();
        let redis_yaml =
            if store == "redis" { format!("redis: {{url: \"{}\"}}\n", redis.url()) } else { String::new() };
        let yaml =
            format!("body_limit_bytes: 4096\nrollout_logs: {{max_entries: 3, max_entry_bytes: 1024}}\n{redis_yaml}");
        let mock = mock().await;
        let gw = TestGateway::in_front_of(&mock, &yaml).await;
        log(&gw, "/logs", &record("r", "finished", code(100, "done"))).await;
        for i in 1..=5 {
            log(&gw, "/logs", &record("r", &format!("after {i}"), None)).await;
        }
        let reply = get(&gw, "/logs?tags=rollout_id:r").await;
        assert_eq!(messages(&reply), ["after 5", "after 4", "after 3", "finished"], "{store}");
        assert_eq!(reply.json()["evicted"], 3, "{store}");
        assert_eq!(get(&gw, "/status?rollout_id=r").await.json()["status"]["code"], 100, "{store}");
        assert_eq!(gw.metric("llmgate_rollout_log_entries_total", &[r#"outcome="evicted""#]), 3, "{store}");

        // One entry past its bound: 400; a body past the limit: 413. Neither is stored.
        let big = record("r", &"x".repeat(1100), None);
        let reply = log(&gw, "/logs", &big).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{store}");
        assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("max_entry_bytes")), "{}", reply.text());
        let huge = record("r", &"x".repeat(5000), None);
        let reply = log(&gw, "/logs", &huge).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{store}");
        assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("4096")), "{}", reply.text());
        assert_eq!(messages(&get(&gw, "/logs?tags=rollout_id:r&limit=1").await), ["after 5"]);
        assert_eq!(gw.metric("llmgate_rollout_log_entries_total", &[r#"outcome="rejected""#]), 2, "{store}");
    }
}

#[tokio::test]
async fn bad_input_gets_a_400_with_a_detail_and_stores_nothing() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    let cases: &[(&str, &str)] = &[
        ("not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (r#"{"message": "no tags"}"#, "rollout_id:<id>"),
        (r#"{"tags": ["experiment_id:e"]}"#, "rollout_id:<id>"),
        (r#"{"tags": "rollout_id:r"}"#, "'tags' must be a list of strings"),
        (r#"{"tags": ["rollout_id:r"], "message": 1}"#, "'message' must be a string"),
        (r#"{"tags": ["rollout_id:r"], "status": {"code": "100"}}"#, "'status.code' must be an integer"),
        (r#"{"tags": ["rollout_id:r"], "extras": [1]}"#, "'extras' must be an object"),
    ];
    for (body, expected) in cases {
        let reply = send(Method::POST, &gw.url("/logs"), &[("content-type", "application/json")], *body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        let detail = reply.json()["detail"].as_str().unwrap_or_default().to_string();
        assert!(detail.contains(expected), "{body}: {detail}");
    }
    for (path, expected) in [
        ("/logs", "rollout_id:<id>"),
        ("/logs?tags=run_id:u", "rollout_id:<id>"),
        ("/logs?tags=rollout_id:r&limit=none", "'limit'"),
        ("/logs?tags=rollout_id:r&hours_back=-1", "'hours_back'"),
        ("/status", "'rollout_id'"),
        ("/v1/status?rollout_id=", "'rollout_id'"),
    ] {
        let reply = get(&gw, path).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains(expected)), "{path}: {}", reply.text());
    }
    for (method, path, allow) in [(Method::PUT, "/logs", "GET, POST"), (Method::POST, "/v1/status", "GET")] {
        let reply = send(method.clone(), &gw.url(path), &[], "{}").await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(reply.headers["allow"], allow);
        assert_eq!(reply.json()["detail"], "Method Not Allowed", "{method} {path}");
    }
    assert_eq!(get(&gw, "/status?rollout_id=r").await.json()["status"], Value::Null);
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn the_gateway_keys_guard_the_routes_and_projects_keep_their_own_logs() {
    let dir = TempDir::new();
    let secrets = dir.0.join("secrets.yaml");
    std::fs::write(
        &secrets,
        "langfuse_keys:\n  p1: {public_key: pk-1, secret_key: sk-1}\n  p2: {public_key: pk-2, secret_key: sk-2}\ndefault_project_id: p1\n",
    )
    .unwrap();
    let yaml = format!("auth: {{api_keys: [\"gw-key\"]}}\nlangfuse: {{secrets_path: \"{}\"}}\n", secrets.display());
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let key = [("authorization", "Bearer gw-key"), ("content-type", "application/json")];

    for (method, path) in [
        (Method::POST, "/logs"),
        (Method::POST, "/v1/project_id/p2/logs"),
        (Method::GET, "/logs?tags=rollout_id:r"),
        (Method::GET, "/v1/status?rollout_id=r"),
        (Method::GET, "/project_id/p2/status?rollout_id=r"),
    ] {
        for headers in [vec![], vec![("authorization", "Bearer wrong")]] {
            let reply = send(method.clone(), &gw.url(path), &headers, record("r", "m", None).to_string()).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{method} {path} {headers:?}");
            assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("API key")), "{}", reply.text());
        }
    }
    assert_eq!(get(&gw, "/status?rollout_id=r").await.status, StatusCode::UNAUTHORIZED);

    // p2's log is p2's; the default project (p1) is also the scope of paths without a project.
    let reply = post_json(&gw.url("/project_id/p2/logs"), &key, &record("r", "p2 ended", code(100, "p2"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = post_json(&gw.url("/logs"), &key, &record("r", "default ended", code(13, "p1"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let status = |path: &str| {
        let url = gw.url(path);
        async move { send(Method::GET, &url, &key, "").await.json()["status"]["message"].clone() }
    };
    assert_eq!(status("/v1/project_id/p2/status?rollout_id=r").await, "p2");
    assert_eq!(status("/v1/status?rollout_id=r").await, "p1");
    assert_eq!(status("/project_id/p1/status?rollout_id=r").await, "p1");
    assert_eq!(status("/project_id/p3/status?rollout_id=r").await, Value::Null);
    let reply = send(Method::GET, &gw.url("/project_id/p2/logs?tags=rollout_id:r"), &key, "").await;
    assert_eq!(messages(&reply), ["p2 ended"]);
    assert!(mock.requests().is_empty(), "the gateway key and the logs stay in the gateway");
}
