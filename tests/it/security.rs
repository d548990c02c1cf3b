//! Project isolation (issue 21): gateway keys bound to projects on every route, hashed and
//! plain keys, the identity service (fails closed), the audit line and the metrics by key name.

use std::time::Duration;

use http::{Method, StatusCode};
use llmgate_credentials::KeyDigest;
use serde_json::{Value, json};

use crate::support::{
    TestGateway, chat_body, child::ChildGateway, eventually, langfuse_with_two_projects, mock, post_json, send,
};

const TEAM_A: &str = "sk-team-a-plain";
const TEAM_B: &str = "sk-team-b-hashed";
const OPS: &str = "sk-ops-every-project";
const STRANGER: &str = "sk-nobody";

/// `team-a` (plain key) holds p2 only; `team-b` (hashed) holds p1, the default; `ops`
/// (`auth.api_keys`, hashed) holds every project. Langfuse has p1 and p2.
fn auth_yaml() -> String {
    format!(
        "auth:\n  api_keys: [\"sha256:{ops}\"]\n  keys:\n    - {{name: team-a, key: \"{TEAM_A}\", projects: [p2]}}\n    - {{name: team-b, key_sha256: \"{b}\", projects: [p1]}}\n",
        ops = KeyDigest::of(OPS).to_hex(),
        b = KeyDigest::of(TEAM_B).to_hex(),
    )
}

fn bearer(key: &str) -> [(&'static str, String); 1] {
    [("authorization", format!("Bearer {key}"))]
}

async fn call(gw: &TestGateway, method: Method, path: &str, key: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let auth = key.map(bearer);
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some([(name, value)]) = &auth {
        headers.push((name, value.as_str()));
    }
    let body = if method == Method::GET { String::new() } else { body.to_string() };
    let reply = send(method, &gw.url(path), &headers, body).await;
    let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, json)
}

/// A gateway with the keys of [`auth_yaml`] in front of the mock, exporting to the Langfuse
/// stand-in's projects p1 (the default) and p2.
struct Isolated {
    lf: llmgate_test_support::langfuse::LangfuseStandIn,
    mock: llmgate::mock_upstream::MockUpstream,
    gw: TestGateway,
    _dir: crate::support::TempDir,
}

impl Isolated {
    async fn start() -> Self {
        let (lf, dir, secrets) = langfuse_with_two_projects().await;
        let mock = mock().await;
        let yaml = format!(
            "{}langfuse: {{host: \"{}\", secrets_path: \"{}\", export: {{batch_delay_ms: 20}}}}\n",
            auth_yaml(),
            lf.url(),
            secrets.display()
        );
        let gw = TestGateway::in_front_of(&mock, &yaml).await;
        Self { lf, mock, gw, _dir: dir }
    }
}

fn log_record(rollout: &str, code: i64) -> Value {
    json!({"program": "eval_protocol", "message": "m", "tags": [format!("rollout_id:{rollout}")], "status": {"code": code}})
}

#[tokio::test]
async fn every_route_refuses_another_projects_data() {
    let Isolated { lf, mock, gw, _dir } = Isolated::start().await;
    let chat = chat_body("gpt-4o-mini", false);
    let none = json!({});
    let forbidden = |(status, body): (StatusCode, Value), what: &str| {
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
        let message = body.to_string();
        assert!(message.contains("may not use project") || message.contains("every project"), "{what}: {message}");
        // Neither another project's keys nor whether it exists.
        for secret in ["pk-lf-1", "sk-lf-1", "pk-lf-2", "sk-lf-2", "not found"] {
            assert!(!message.contains(secret), "{what}: {message}");
        }
    };

    // Every route × a project the key does not hold: 403, with a plain and a hashed key.
    for (key, other) in [(TEAM_A, "p1"), (TEAM_B, "p2")] {
        let routes = [
            (Method::POST, format!("/project_id/{other}/chat/completions"), chat.clone()),
            (
                Method::POST,
                format!(
                    "/v1/project_id/{other}/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/w/chat/completions"
                ),
                chat.clone(),
            ),
            (Method::GET, format!("/v1/project_id/{other}/traces?tags=rollout_id:r"), none.clone()),
            (Method::GET, format!("/traces?project_id={other}&tags=rollout_id:r"), none.clone()),
            (Method::GET, format!("/project_id/{other}/traces/pointwise?tags=rollout_id:r"), none.clone()),
            (Method::POST, format!("/project_id/{other}/logs"), log_record("r", 100)),
            (Method::GET, format!("/v1/project_id/{other}/logs?tags=rollout_id:r"), none.clone()),
            (Method::GET, format!("/v1/project_id/{other}/status?rollout_id=r"), none.clone()),
            (Method::GET, "/stats".into(), none.clone()),
            (Method::GET, "/metrics".into(), none.clone()),
        ];
        for (method, path, body) in routes {
            forbidden(call(&gw, method.clone(), &path, Some(key), &body).await, &format!("{key} {method} {path}"));
        }
    }
    assert!(mock.requests().is_empty(), "nothing refused reached the upstream");

    // An unknown key, or none, is a 401 everywhere (the catch-all too).
    for path in ["/chat/completions", "/project_id/p1/chat/completions", "/v1/models"] {
        for key in [Some(STRANGER), None] {
            assert_eq!(call(&gw, Method::POST, path, key, &chat).await.0, StatusCode::UNAUTHORIZED, "{path} {key:?}");
        }
    }

    // The right project, named or implied: team-a's completions land in p2's Langfuse, team-b's
    // (p1, the default) in p1's.
    let (status, _) = call(&gw, Method::POST, "/chat/completions", Some(TEAM_A), &chat).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&gw, Method::POST, "/project_id/p2/chat/completions", Some(TEAM_A), &chat).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&gw, Method::POST, "/chat/completions", Some(TEAM_B), &chat).await;
    assert_eq!(status, StatusCode::OK);
    eventually("team-a's two traces in p2 and team-b's one in p1", || {
        let state = lf.lock();
        let roots = |p: &str| state.observations(p).iter().filter(|o| o.is_root()).count();
        roots("p2") == 2 && roots("p1") == 1
    })
    .await;

    // Rollout logs: team-a's (no project: p2) are p2's; team-b sees none of them.
    assert_eq!(call(&gw, Method::POST, "/logs", Some(TEAM_A), &log_record("shared-id", 100)).await.0, StatusCode::OK);
    let (status, body) = call(&gw, Method::GET, "/project_id/p2/status?rollout_id=shared-id", Some(OPS), &none).await;
    assert_eq!((status, body["status"]["code"].clone()), (StatusCode::OK, json!(100)));
    let (status, body) = call(&gw, Method::GET, "/status?rollout_id=shared-id", Some(TEAM_B), &none).await;
    assert_eq!((status, body["status"].clone()), (StatusCode::OK, Value::Null), "team-b reads p1's log only");

    // Traces without a project read the key's project (a 404 "no ids" here, not a 403).
    let (status, body) = call(&gw, Method::GET, "/traces?tags=rollout_id:none", Some(TEAM_A), &none).await;
    assert_ne!(status, StatusCode::FORBIDDEN, "{body}");

    // Keys for every project see everything; the catch-all takes any valid key.
    assert_eq!(call(&gw, Method::GET, "/stats", Some(OPS), &none).await.0, StatusCode::OK);
    assert_eq!(call(&gw, Method::GET, "/project_id/p1/status?rollout_id=x", Some(OPS), &none).await.0, StatusCode::OK);
    assert_eq!(call(&gw, Method::GET, "/v1/models", Some(TEAM_A), &none).await.0, StatusCode::OK);

    // Metrics by key name, never the key.
    assert_eq!(gw.metric("llmgate_requests_total", &[r#"key="team-a""#, r#"route="chat""#]), 2);
    assert_eq!(gw.metric("llmgate_auth_refusals_total", &[r#"key="team-a""#, r#"reason="project""#]), 10);
    assert_eq!(gw.metric("llmgate_auth_refusals_total", &[r#"key="unknown""#, r#"reason="invalid_key""#]), 3);
    assert_eq!(gw.metric("llmgate_auth_refusals_total", &[r#"key="unknown""#, r#"reason="missing_key""#]), 3);
    let text = gw.metrics.render();
    for key in [TEAM_A, TEAM_B, OPS, STRANGER] {
        assert!(!text.contains(key), "{key} in /metrics");
    }
}

#[tokio::test]
async fn a_key_with_several_projects_must_name_one_unless_it_holds_the_default() {
    let (_lf, _dir, secrets) = langfuse_with_two_projects().await;
    let mock = mock().await;
    let yaml = format!(
        "auth:\n  keys:\n    - {{name: pair, key: sk-pair, projects: [p2, p3]}}\n    - {{name: with-default, key: sk-def, projects: [p1, p2]}}\nlangfuse: {{secrets_path: \"{}\"}}\n",
        secrets.display()
    );
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let chat = chat_body("gpt-4o-mini", false);
    let (status, body) = call(&gw, Method::POST, "/chat/completions", Some("sk-pair"), &chat).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.to_string().contains("name one in the path"), "{body}");
    assert_eq!(
        call(&gw, Method::POST, "/project_id/p2/chat/completions", Some("sk-pair"), &chat).await.0,
        StatusCode::OK
    );
    assert_eq!(call(&gw, Method::POST, "/chat/completions", Some("sk-def"), &chat).await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_config_refuses_unclear_keys() {
    let digest = KeyDigest::of("k").to_hex();
    for (yaml, expected) in [
        ("auth: {keys: [{name: a, projects: [p]}]}".to_string(), "exactly one of `key` and `key_sha256`"),
        (format!("auth: {{keys: [{{name: a, key: k, key_sha256: \"{digest}\", projects: [p]}}]}}"), "exactly one"),
        ("auth: {keys: [{name: a, key: k}]}".to_string(), "auth.keys[0].projects"),
        ("auth: {keys: [{name: a, key: k, projects: []}]}".to_string(), "auth.keys[0].projects"),
        ("auth: {keys: [{name: a, key_sha256: \"abc\", projects: [p]}]}".to_string(), "64 hex digits"),
        ("auth: {api_keys: [\"sha256:xyz\"]}".to_string(), "auth.api_keys[0]"),
        (
            "auth: {keys: [{name: a, key: k, projects: [p]}, {name: a, key: l, projects: [p]}]}".to_string(),
            "names two keys",
        ),
        ("auth: {api_keys: [k], keys: [{name: a, key: k, projects: [p]}]}".to_string(), "the same key"),
        ("auth: {external: {url: \"not a url\"}}".to_string(), "auth.external.url"),
    ] {
        let error = llmgate::config::Config::from_yaml(&yaml, std::path::Path::new("t.yaml"), &|_| None).unwrap_err();
        assert!(error.0.contains(expected), "{yaml}: {}", error.0);
        assert!(!error.0.contains(&digest), "{}", error.0);
    }
}

#[tokio::test]
async fn hash_key_prints_the_digest_of_standard_input() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llmgate"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"test\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[tokio::test]
async fn a_refused_request_leaves_one_audit_line_without_the_key() {
    let mock = mock().await;
    let yaml = format!("upstreams:\n  mock: {{url: \"{}\", mode: openai}}\n{}", mock.url(), auth_yaml());
    let gw = ChildGateway::spawn(&yaml, &[("LOG_FORMAT", "json")], &[]).await;
    let reply = post_json(
        &gw.url("/project_id/p1/chat/completions"),
        &[("authorization", &format!("Bearer {TEAM_A}"))],
        &chat_body("m", false),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = post_json(
        &gw.url("/chat/completions"),
        &[("authorization", &format!("Bearer {STRANGER}"))],
        &chat_body("m", false),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    eventually("two audit lines", || gw.log().matches("request refused").count() == 2).await;
    let log = gw.log();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("request refused")).collect();
    assert!(audit[0].contains("team-a") && audit[0].contains("project") && audit[0].contains("403"), "{}", audit[0]);
    assert!(
        audit[1].contains("unknown") && audit[1].contains("invalid_key") && audit[1].contains("401"),
        "{}",
        audit[1]
    );
    for key in [TEAM_A, STRANGER] {
        assert!(!log.contains(key), "the log holds a key");
    }
}

// === the identity service ===

/// An identity service on a real socket: `Bearer good-*` → team `ext` holding p2, `Bearer all`
/// → every project, `Bearer slow` answers after 2 s, anything else 401.
async fn identity_service() -> std::net::SocketAddr {
    use axum::{Json, Router, http::HeaderMap, routing::get};
    async fn verify(headers: HeaderMap) -> Result<Json<Value>, StatusCode> {
        let token = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        match token {
            "Bearer good-team" => Ok(Json(json!({"name": "ext-team", "projects": ["p2"]}))),
            "Bearer all" => Ok(Json(json!({"name": "ext-ops", "projects": ["*"]}))),
            "Bearer slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(Json(json!({"name": "late", "projects": ["*"]})))
            }
            _ => Err(StatusCode::UNAUTHORIZED),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().route("/verify", get(verify))).await });
    addr
}

#[tokio::test]
async fn the_identity_service_decides_and_never_opens_the_door() {
    let identity = identity_service().await;
    let (_lf, _dir, secrets) = langfuse_with_two_projects().await;
    let mock = mock().await;
    let yaml = format!(
        "{}  external: {{url: \"http://{identity}/verify\", timeout_ms: 300, cache_secs: 60}}\nlangfuse: {{secrets_path: \"{}\"}}\n",
        auth_yaml(),
        secrets.display()
    );
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let chat = chat_body("gpt-4o-mini", false);
    // Static keys first, then the service.
    assert_eq!(call(&gw, Method::POST, "/project_id/p2/chat/completions", Some(TEAM_A), &chat).await.0, StatusCode::OK);
    assert_eq!(
        call(&gw, Method::POST, "/project_id/p2/chat/completions", Some("good-team"), &chat).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&gw, Method::POST, "/project_id/p1/chat/completions", Some("good-team"), &chat).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(call(&gw, Method::GET, "/stats", Some("all"), &json!({})).await.0, StatusCode::OK);
    assert_eq!(call(&gw, Method::POST, "/chat/completions", Some("bad"), &chat).await.0, StatusCode::UNAUTHORIZED);
    // Past the timeout: 503, nothing forwarded.
    let before = mock.requests().len();
    let (status, body) = call(&gw, Method::POST, "/chat/completions", Some("slow"), &chat).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(mock.requests().len(), before);
    assert_eq!(gw.metric("llmgate_requests_total", &[r#"key="external""#, r#"route="chat""#]), 1);
    assert_eq!(gw.metric("llmgate_auth_refusals_total", &[r#"reason="unavailable""#]), 1);
}

#[tokio::test]
async fn an_identity_service_that_is_down_is_a_503() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mock = mock().await;
    let yaml = format!("auth: {{external: {{url: \"http://127.0.0.1:{port}/verify\", timeout_ms: 500}}}}\n");
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    for path in ["/chat/completions", "/v1/models", "/logs?tags=rollout_id:r"] {
        let (status, body) = call(&gw, Method::GET, path, Some("anything"), &json!({})).await;
        let expected =
            if path == "/chat/completions" { StatusCode::METHOD_NOT_ALLOWED } else { StatusCode::SERVICE_UNAVAILABLE };
        assert_eq!(status, expected, "{path}: {body}");
    }
    let (status, _) = call(&gw, Method::POST, "/chat/completions", Some("anything"), &chat_body("m", false)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(mock.requests().is_empty());
}

// === per-key limits ===

#[tokio::test]
async fn a_keys_own_limit_holds_across_two_replicas_and_every_model() {
    let redis = llmgate_test_support::redis::RedisServer::start();
    let mock = mock().await;
    let yaml = format!(
        "auth:\n  keys:\n    - {{name: capped, key: sk-capped, projects: [\"*\"], limits: {{rpm: 3}}}}\n    - {{name: free, key: sk-free, projects: [\"*\"]}}\nredis: {{url: \"{}\"}}\n",
        redis.url()
    );
    let (a, b) = (TestGateway::in_front_of(&mock, &yaml).await, TestGateway::in_front_of(&mock, &yaml).await);
    // Three requests, on two replicas and two models, spend the key's minute.
    for (gw, model) in [(&a, "gpt-4o-mini"), (&b, "gpt-4o"), (&a, "some-other-model")] {
        let (status, body) =
            call(gw, Method::POST, "/chat/completions", Some("sk-capped"), &chat_body(model, false)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let reply = send(
        Method::POST,
        &b.url("/chat/completions"),
        &[("authorization", "Bearer sk-capped"), ("content-type", "application/json")],
        chat_body("gpt-4o", false).to_string(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert!(reply.headers.contains_key("retry-after"));
    let message = reply.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("API key 'capped'"), "{message}");
    assert!(!message.contains("sk-capped"), "{message}");
    assert_eq!(mock.chat_requests(), 3, "the refused request reached no upstream");
    // Another key is not held back by it.
    let (status, _) = call(&a, Method::POST, "/chat/completions", Some("sk-free"), &chat_body("gpt-4o", false)).await;
    assert_eq!(status, StatusCode::OK);
}

/// The routes of a project, under `/project_id/{p}` or with no project in the path.
fn project_routes(project: Option<&str>) -> Vec<(Method, String, Value)> {
    let p = project.map(|p| format!("/project_id/{p}")).unwrap_or_default();
    let ids = "rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/w";
    vec![
        (Method::POST, format!("{p}/chat/completions"), chat_body("gpt-4o-mini", false)),
        (Method::POST, format!("/v1{p}/{ids}/chat/completions"), chat_body("gpt-4o-mini", true)),
        (Method::GET, format!("/v1{p}/traces?tags=rollout_id:r&max_retries=0"), json!({})),
        (Method::GET, format!("{p}/traces/pointwise?tags=rollout_id:r&max_retries=0"), json!({})),
        (Method::POST, format!("{p}/logs"), log_record("r", 100)),
        (Method::GET, format!("/v1{p}/logs?tags=rollout_id:r"), json!({})),
        (Method::GET, format!("{p}/status?rollout_id=r"), json!({})),
    ]
}

#[tokio::test]
async fn every_route_by_project_and_kind_of_key() {
    let Isolated { lf: _lf, mock: _mock, gw, _dir } = Isolated::start().await;
    let admitted = |status: StatusCode| status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN;
    // (key, its project, another): a plain key, a hashed key, an `api_keys` key for every project.
    for (key, own, other) in [(TEAM_A, "p2", Some("p1")), (TEAM_B, "p1", Some("p2")), (OPS, "p1", None)] {
        for (project, expect_admitted) in [(Some(own), true), (None, true), (other, false)] {
            if project.is_none() && !expect_admitted {
                continue;
            }
            for (method, path, body) in project_routes(project) {
                let (status, reply) = call(&gw, method.clone(), &path, Some(key), &body).await;
                let what = format!("{key} {method} {path}: {status} {reply}");
                if expect_admitted {
                    assert!(admitted(status) && !status.is_server_error(), "{what}");
                } else {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                }
            }
        }
        // The catch-all takes any valid key; the whole-gateway routes only one for every project.
        assert_eq!(call(&gw, Method::GET, "/v1/models", Some(key), &json!({})).await.0, StatusCode::OK);
        let stats = call(&gw, Method::GET, "/stats", Some(key), &json!({})).await.0;
        assert_eq!(stats, if key == OPS { StatusCode::OK } else { StatusCode::FORBIDDEN }, "{key} /stats");
    }
    // An unknown key, and none: 401 on every route.
    for key in [Some(STRANGER), None] {
        for project in [Some("p1"), None] {
            for (method, path, body) in project_routes(project) {
                assert_eq!(
                    call(&gw, method.clone(), &path, key, &body).await.0,
                    StatusCode::UNAUTHORIZED,
                    "{key:?} {method} {path}"
                );
            }
        }
    }
}
