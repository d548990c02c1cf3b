//! Issue 7 through the reference proxy: `GET …/traces` and `…/traces/pointwise` against the
//! Langfuse stand-in, on both read APIs (`langfuse.api: v3` and `v4`), with the mock upstream
//! (openai mode: llmgate exports each completion as the trace whose id is the insertion id).

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use llmgate::mock_upstream::MockUpstream;
use llmgate_insertion_id::InsertionStore;
use llmgate_test_support::langfuse::LangfuseStandIn;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::support::*;

const APIS: [&str; 2] = ["v3", "v4"];
const CHAT: &str = "/chat/completions";

fn ids(rollout: &str, row: &str) -> String {
    format!("/rollout_id/{rollout}/invocation_id/inv1/experiment_id/exp1/run_id/run1/row_id/{row}")
}

struct Setup {
    lf: LangfuseStandIn,
    mock: MockUpstream,
    gw: TestGateway,
    store: Arc<dyn InsertionStore>,
    api: &'static str,
    _dir: TempDir,
}

/// A gateway reading through `api`, with Langfuse at `host` (the stand-in's when `None`).
async fn setup_at(api: &'static str, host: Option<String>) -> Setup {
    setup_with(api, host, "").await
}

/// The same, with more `langfuse.export` settings (`extra`: `, key: value…`).
async fn setup_with(api: &'static str, host: Option<String>, extra: &str) -> Setup {
    let (lf, dir, secrets) = langfuse_with_two_projects().await;
    let mock = mock().await;
    let host = host.unwrap_or_else(|| lf.url());
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{mock}\", mode: openai}}\n\
         langfuse: {{host: \"{host}\", secrets_path: \"{secrets}\", api: {api}, export: {{batch_delay_ms: 20, timeout_ms: 1000{extra}}}}}\n\
         models:\n  - {{name: gpt-test, context_window: 100000}}\n\
         encoded_base_url: {{allow: [\"{mock}\"]}}\n",
        mock = mock.url(),
        secrets = secrets.display(),
    );
    let (gw, store) = TestGateway::start_with_store(&yaml).await;
    Setup { lf, mock, gw, store, api, _dir: dir }
}

async fn setup(api: &'static str) -> Setup {
    setup_at(api, None).await
}

impl Setup {
    /// One chat completion on `path`; its insertion id.
    async fn complete(&self, path: &str) -> String {
        let reply = post_json(&self.gw.url(path), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        reply.headers["x-insertion-id"].to_str().unwrap().to_string()
    }

    /// `n` completions of `rollout` in project p1, one after the other (so in UUIDv7 order).
    async fn rollout(&self, rollout: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(self.complete(&format!("{}{CHAT}", ids(rollout, &format!("row{i}")))).await);
        }
        out
    }

    /// Waits until the stand-in holds `n` root spans and `n` generations of `project`
    /// (visible or not).
    async fn exported(&self, project: &str, n: usize) {
        let project = project.to_string();
        within(self.lf.wait_for(move |s| {
            let obs = s.observations(&project);
            obs.iter().filter(|o| o.is_root()).count() == n
                && obs.iter().filter(|o| o.kind == "GENERATION").count() == n
        }))
        .await;
    }

    async fn get(&self, path_and_query: &str) -> Reply {
        send(Method::GET, &self.gw.url(path_and_query), &[], Bytes::new()).await
    }
}

fn hex(id: &str) -> String {
    id.replace('-', "")
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn trace_ids(body: &Value) -> Vec<String> {
    sorted(body["traces"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect())
}

fn detail(reply: &Reply) -> String {
    reply.json()["detail"].as_str().unwrap_or_else(|| panic!("no detail: {}", reply.text())).to_string()
}

#[tokio::test]
async fn a_complete_rollout_is_returned_on_the_first_pass() {
    for api in APIS {
        let s = setup(api).await;
        let ids = s.rollout("r1", 3).await;
        s.rollout("other", 1).await;
        s.exported("p1", 4).await;
        // One pass only: the first listing must find all three.
        let reply = s.get("/traces?tags=rollout_id:r1&max_retries=1").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["project_id"], "p1", "{api}");
        assert_eq!(body["total_traces"], 3, "{api}");
        assert_eq!(trace_ids(&body), sorted(ids.iter().map(|i| hex(i)).collect()), "{api}");
        // `sample_size` applies to the complete set.
        let reply = s.get("/traces?tags=rollout_id:r1&sample_size=2").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}");
        let body = reply.json();
        assert_eq!(body["total_traces"], 2, "{api}");
        for id in trace_ids(&body) {
            assert!(ids.iter().any(|i| hex(i) == id), "{api}: {id} is one of the rollout's");
        }
    }
}

#[tokio::test]
async fn a_late_trace_completes_on_a_later_pass() {
    for api in APIS {
        let s = setup(api).await;
        let mut ids = s.rollout("r1", 1).await;
        s.exported("p1", 1).await;
        s.lf.set_visibility_delay(Duration::from_secs(2));
        ids.extend(s.rollout("r1", 1).await);
        s.exported("p1", 2).await;
        // Not there yet on a single pass.
        let reply = s.get("/traces?tags=rollout_id:r1&max_retries=1").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{api}: {}", reply.text());
        assert_eq!(detail(&reply), "Incomplete traces for rollout_id 'r1': Found 1/2 completions.", "{api}");
        // Later passes (backoff 1 s, 2 s, 4 s … with jitter) see it.
        let reply = s.get("/traces?tags=rollout_id:r1&max_retries=6").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        assert_eq!(trace_ids(&reply.json()), sorted(ids.iter().map(|i| hex(i)).collect()), "{api}");
    }
}

#[tokio::test]
async fn several_missing_ids_are_each_found_on_their_own() {
    for api in APIS {
        let s = setup(api).await;
        let ids = s.rollout("r1", 5).await;
        s.exported("p1", 5).await;
        // `limit=1` caps the first listing: four ids are missing after it. The original asked
        // for all four `insertion_id:` tags in one query ("all of"), which never matches.
        let reply = s.get("/traces?tags=rollout_id:r1&limit=1&max_retries=2").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["total_traces"], 5, "{api}");
        assert_eq!(trace_ids(&body), sorted(ids.iter().map(|i| hex(i)).collect()), "{api}");
        // The same with several of them late.
        s.lf.set_visibility_delay(Duration::from_secs(1));
        let late = s.rollout("r2", 3).await;
        s.exported("p1", 8).await;
        let reply = s.get("/traces?tags=rollout_id:r2&max_retries=5").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        assert_eq!(trace_ids(&reply.json()), sorted(late.iter().map(|i| hex(i)).collect()), "{api}");
    }
}

#[tokio::test]
async fn incomplete_after_the_passes_is_404_with_the_counts() {
    for api in APIS {
        let s = setup(api).await;
        s.rollout("r1", 2).await;
        s.exported("p1", 2).await;
        // A completion the store recorded but Langfuse never got.
        s.store.record("r1", &uuid::Uuid::now_v7().to_string()).await.unwrap();
        let reply = s.get("/traces?tags=rollout_id:r1&max_retries=2").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{api}: {}", reply.text());
        assert_eq!(detail(&reply), "Incomplete traces for rollout_id 'r1': Found 2/3 completions.", "{api}");
        // No pass at all.
        let reply = s.get("/traces?tags=rollout_id:r1&max_retries=0").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{api}");
        assert_eq!(detail(&reply), "Incomplete traces for rollout_id 'r1': Found 0/3 completions.", "{api}");
    }
}

/// Spans the exporter dropped (a queue of one span holds no two-span record) can never arrive:
/// `/traces` says so after its first pass, 500 naming the loss, instead of waiting out its
/// passes for a 404. A rollout whose spans all arrived is unaffected.
#[tokio::test]
async fn a_rollout_whose_spans_were_lost_is_answered_at_once() {
    for api in APIS {
        let s = setup_with(api, None, ", queue_max_spans: 1").await;
        s.rollout("r-lost", 2).await;
        let reply = s.get("/traces?tags=rollout_id:r-lost&max_retries=10").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{api}: {}", reply.text());
        let detail = detail(&reply);
        assert!(
            detail.starts_with("Incomplete traces for rollout_id 'r-lost': Found 0/2 completions, and the rest can never arrive: the gateway lost 4 of this rollout's Langfuse spans"),
            "{api}: {detail}"
        );
        assert_eq!(s.lf.state(|st| st.observations("p1").len()), 0, "{api}");
    }
}

#[tokio::test]
async fn pointwise_returns_only_the_newest_trace() {
    for api in APIS {
        let s = setup(api).await;
        let ids = s.rollout("r1", 3).await;
        s.exported("p1", 3).await;
        let newest = ids.iter().max().unwrap();
        for path in ["/traces/pointwise", "/v1/traces/pointwise", "/project_id/p1/traces/pointwise"] {
            let reply = s.get(&format!("{path}?tags=rollout_id:r1&sleep_between_gets=0.1&max_retries=3")).await;
            assert_eq!(reply.status, StatusCode::OK, "{api} {path}: {}", reply.text());
            let body = reply.json();
            assert_eq!(body["project_id"], "p1");
            assert_eq!(body["total_traces"], 1, "{api}");
            assert_eq!(trace_ids(&body), vec![hex(newest)], "{api}: the newest insertion id");
            assert!(body["traces"][0]["observations"].as_array().unwrap().iter().any(|o| o["type"] == "GENERATION"));
        }
        // The newest one not in Langfuse: 404 after the passes.
        s.store.record("r1", &uuid::Uuid::now_v7().to_string()).await.unwrap();
        let reply = s.get("/traces/pointwise?tags=rollout_id:r1&max_retries=1").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{api}");
        assert_eq!(detail(&reply), "Failed to fetch latest trace for rollout 'r1' after 1 retries", "{api}");
    }
}

#[tokio::test]
async fn status_codes_and_details_of_the_issue() {
    for api in APIS {
        let s = setup(api).await;
        let ids = s.rollout("r1", 2).await;
        let b = s.complete(&format!("/project_id/p2{}{CHAT}", self::ids("rb", "row0"))).await;
        s.exported("p1", 2).await;
        s.exported("p2", 1).await;

        let cases: Vec<(String, StatusCode, &str)> = vec![
            ("/traces?project_id=nope".into(), StatusCode::NOT_FOUND, "Project 'nope' not found"),
            ("/project_id/nope/traces?tags=rollout_id:r1".into(), StatusCode::NOT_FOUND, "Project 'nope' not found"),
            ("/v1/project_id/nope/traces/pointwise".into(), StatusCode::NOT_FOUND, "Project 'nope' not found"),
            (
                "/traces?tags=rollout_id:none".into(),
                StatusCode::NOT_FOUND,
                "No expected insertion_ids found in Redis for rollout 'none'. Returning empty traces.",
            ),
            (
                "/traces/pointwise?tags=rollout_id:none".into(),
                StatusCode::NOT_FOUND,
                "No insertion_ids found in Redis for rollout 'none'. Cannot determine latest trace.",
            ),
            (
                "/traces/pointwise?tags=x".into(),
                StatusCode::BAD_REQUEST,
                "Pointwise needs a 'rollout_id:<id>' tag, e.g. ?tags=rollout_id:abc",
            ),
            (
                "/traces?tags=rollout_id:r1&from_timestamp=yesterday".into(),
                StatusCode::BAD_REQUEST,
                "Invalid from_timestamp 'yesterday': expected ISO 8601, e.g. 2026-11-21T16:30:22Z",
            ),
            (
                "/traces?to_timestamp=2026-13-01T00:00:00Z".into(),
                StatusCode::BAD_REQUEST,
                "Invalid to_timestamp '2026-13-01T00:00:00Z': expected ISO 8601, e.g. 2026-11-21T16:30:22Z",
            ),
            (
                "/traces?max_retries=0".into(),
                StatusCode::BAD_REQUEST,
                "max_retries=0 runs no pass: give max_retries >= 1 (or a rollout_id: tag)",
            ),
        ];
        for (path, status, message) in cases {
            let reply = s.get(&path).await;
            assert_eq!(reply.status, status, "{api} {path}: {}", reply.text());
            assert_eq!(detail(&reply), message, "{api} {path}");
            assert_eq!(reply.headers["content-type"], "application/json");
        }
        let reply = s.get("/traces?limit=abc").await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{api}");

        // The path's project wins over the query's.
        let reply = s.get("/project_id/p2/traces?project_id=p1&tags=rollout_id:rb").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        assert_eq!(reply.json()["project_id"], "p2");
        assert_eq!(trace_ids(&reply.json()), vec![hex(&b)]);
        let reply = s.get("/traces?project_id=p2&tags=rollout_id:rb").await;
        assert_eq!(reply.json()["project_id"], "p2", "{api}");

        // Without a rollout tag: a plain filtered listing, no completeness check.
        let reply = s.get("/traces?limit=1").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        assert_eq!(reply.json()["total_traces"], 1, "{api}");
        let reply = s.get("/v1/traces?tags=row_id:row1").await;
        assert_eq!(trace_ids(&reply.json()), vec![hex(&ids[1])], "{api}");
        let reply = s.get("/traces?tags=nothing-has-this").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}");
        assert_eq!(reply.json(), json!({"project_id": "p1", "total_traces": 0, "traces": []}));
        // Filters reach Langfuse: a window in the past and an unknown user find nothing.
        let reply = s.get("/traces?from_timestamp=2001-01-01T00:00:00Z&to_timestamp=2001-01-02T00:00:00%2B02:00").await;
        assert_eq!(reply.json()["total_traces"], 0, "{api}: {}", reply.text());
        let reply = s.get("/traces?user_id=nobody").await;
        assert_eq!(reply.json()["total_traces"], 0, "{api}: {}", reply.text());
        let reply = s.get("/traces?hours_back=1&name=chat-completion&tags=rollout_id:r1").await;
        assert_eq!(reply.json()["total_traces"], 2, "{api}: {}", reply.text());
        let reply = s.get("/traces?name=other-name&tags=rollout_id:r1&max_retries=1").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{api}: the name filter is kept on every pass");
        assert_eq!(s.mock.chat_requests(), 3);
    }
}

/// A Langfuse that answers every read with `status`.
async fn failing_langfuse(status: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let (body, retry) = match status {
                        429 => (json!({"message": "Rate limit exceeded", "code": "rate_limited"}), Some("1")),
                        401 => (json!({"message": "Invalid credentials"}), None),
                        _ => (json!({"message": "Internal Server Error"}), None),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
                    *r.status_mut() = StatusCode::from_u16(status).unwrap();
                    if let Some(retry) = retry {
                        r.headers_mut().insert("retry-after", retry.parse().unwrap());
                    }
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn langfuse_errors_answer_502_with_its_status_and_message() {
    for api in APIS {
        for (status, message) in [
            (429, "Langfuse answered 429: Rate limit exceeded"),
            (500, "Langfuse answered 500: Internal Server Error"),
            (401, "Langfuse answered 401: Invalid credentials"),
        ] {
            let s = setup_at(api, Some(failing_langfuse(status).await)).await;
            s.store.record("r1", &uuid::Uuid::now_v7().to_string()).await.unwrap();
            for path in [
                "/traces?tags=rollout_id:r1&max_retries=2",
                "/traces/pointwise?tags=rollout_id:r1&max_retries=2",
                "/traces?max_retries=2",
            ] {
                let reply = s.get(path).await;
                assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{api} {status} {path}: {}", reply.text());
                assert_eq!(detail(&reply), format!("Failed to fetch traces from Langfuse: {message}"), "{api} {path}");
            }
        }
        // Langfuse down: connection refused.
        let s = setup(api).await;
        s.store.record("r1", &uuid::Uuid::now_v7().to_string()).await.unwrap();
        s.lf.refuse();
        let reply = s.get("/traces?tags=rollout_id:r1&max_retries=2").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{api}: {}", reply.text());
        assert!(detail(&reply).starts_with("Failed to fetch traces from Langfuse: Langfuse unreachable: "), "{api}");
        // Back up: the data is there again.
        s.lf.resume().await;
        let reply = s.get("/traces?tags=rollout_id:r1&max_retries=1").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{api}: {}", reply.text());
    }
}

fn keys(v: &Value) -> Vec<String> {
    sorted(v.as_object().unwrap().keys().cloned().collect())
}

/// RFC 3339 in UTC as Langfuse stores it: `2026-11-21T16:30:22.123Z`.
fn is_rfc3339(v: &Value) -> bool {
    let s = v.as_str().unwrap_or_default();
    let b = s.as_bytes();
    b.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[13] == b':' && b[19] == b'.' && s.ends_with('Z')
}

#[tokio::test]
async fn the_response_shape_matches_the_original_field_for_field() {
    for api in APIS {
        let s = setup(api).await;
        let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}],
            "user": "u-7", "metadata": {"session_id": "s-9"}});
        let reply = post_json(&s.gw.url(&format!("{}{CHAT}", ids("r1", "row0"))), &[], &body).await;
        assert_eq!(reply.status, StatusCode::OK);
        let id = reply.headers["x-insertion-id"].to_str().unwrap().to_string();
        s.exported("p1", 1).await;
        let reply = s.get("/v1/traces?tags=rollout_id:r1").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        let body = reply.json();
        assert_eq!(keys(&body), ["project_id", "total_traces", "traces"]);
        let trace = &body["traces"][0];
        assert_eq!(
            keys(trace),
            sorted(
                [
                    "id",
                    "name",
                    "user_id",
                    "session_id",
                    "tags",
                    "timestamp",
                    "input",
                    "output",
                    "metadata",
                    "observations"
                ]
                .map(String::from)
                .to_vec()
            ),
            "{api}"
        );
        assert_eq!(trace["id"], hex(&id));
        assert_eq!(trace["name"], "chat-completion", "{api}");
        assert_eq!(trace["user_id"], "u-7", "{api}");
        assert_eq!(trace["session_id"], "s-9", "{api}");
        let tags: Vec<&str> = trace["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        for tag in ["rollout_id:r1", &format!("insertion_id:{id}"), "row_id:row0", "run_id:run1"] {
            assert!(tags.contains(&tag), "{api}: {tag} in {tags:?}");
        }
        assert!(is_rfc3339(&trace["timestamp"]), "{api}: {}", trace["timestamp"]);
        // LiteLLM's shapes (issue 15): the messages in, the assistant message out.
        assert_eq!(trace["input"], json!([{"role": "user", "content": "hello there"}]), "{api}");
        assert_eq!(
            trace["output"],
            json!({"role": "assistant", "content": "This is a mock completion."}),
            "{api}: the assistant message as JSON"
        );
        let observations = trace["observations"].as_array().unwrap();
        assert_eq!(observations.len(), 2, "{api}: root span and generation");
        for o in observations {
            assert_eq!(
                keys(o),
                sorted(
                    ["id", "type", "name", "start_time", "end_time", "input", "output", "parent_observation_id"]
                        .map(String::from)
                        .to_vec()
                ),
                "{api}"
            );
            assert!(is_rfc3339(&o["start_time"]) && is_rfc3339(&o["end_time"]), "{api}: {o}");
        }
        let root = observations.iter().find(|o| o["type"] == "SPAN").expect("root span");
        let generation = observations.iter().find(|o| o["type"] == "GENERATION").expect("generation");
        assert_eq!(root["parent_observation_id"], Value::Null);
        assert_eq!(generation["parent_observation_id"], root["id"], "{api}");
        assert_eq!(generation["name"], "llm_call_gpt-test", "{api}");
    }
}

/// URL-safe base64 with padding (what the Eval Protocol client sends).
fn b64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        for _ in chunk.len()..3 {
            out.push('=');
        }
    }
    out
}

#[tokio::test]
async fn completions_on_every_metadata_route_are_exactly_the_rollouts_traces() {
    for api in APIS {
        let s = setup(api).await;
        let encoded = b64(&s.mock.url());
        let mut expected = Vec::new();
        let mut n = 0;
        for v1 in ["", "/v1"] {
            for project in ["", "/project_id/p1"] {
                for base in [String::new(), format!("/encoded_base_url/{encoded}")] {
                    let path = format!("{v1}{project}{}{base}{CHAT}", ids("rx", &format!("row{n}")));
                    expected.push(s.complete(&path).await);
                    n += 1;
                }
            }
        }
        // Not in the rollout: another rollout, and a project-only route.
        s.rollout("ry", 1).await;
        let reply = post_json(&s.gw.url(&format!("/project_id/p1{CHAT}")), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::OK);
        s.exported("p1", n + 2).await;
        assert_eq!(n, 8);

        let reply = s.get("/traces?tags=rollout_id:rx").await;
        assert_eq!(reply.status, StatusCode::OK, "{api}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["total_traces"], 8, "{api}");
        assert_eq!(trace_ids(&body), sorted(expected.iter().map(|i| hex(i)).collect()), "{api}");
        for trace in body["traces"].as_array().unwrap() {
            let observations = trace["observations"].as_array().unwrap();
            let generations = observations.iter().filter(|o| o["type"] == "GENERATION").count();
            assert_eq!(generations, 1, "{api}: each completion with its generation: {trace}");
            assert!(trace["tags"].as_array().unwrap().contains(&json!("rollout_id:rx")));
        }
        assert_eq!(s.api, api);
    }
}

/// The service on its own, with a short deadline: a Langfuse that accepts and never answers
/// gives 504 at the deadline (the proxy wires the 60 s default).
#[tokio::test]
async fn a_hanging_langfuse_is_504_at_the_deadline() {
    use llmgate::routes::traces::TracesService;
    use llmgate_core::ext::{RouteKind, RouteMeta};
    use llmgate_langfuse::{LangfuseClient, LangfuseReader, V3Reader, V4Reader};
    use tower::ServiceExt;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        }
    });
    let secrets = llmgate_credentials::Secrets::from_yaml_str(
        "langfuse_keys:\n  p1: {public_key: pk-lf-1, secret_key: sk-lf-1}\ndefault_project_id: p1\n",
    )
    .unwrap();
    let projects = Arc::new(llmgate_credentials::Projects::from(secrets));
    let store: Arc<dyn InsertionStore> = Arc::new(llmgate_insertion_id::MemoryStore::new());
    store.record("r1", &uuid::Uuid::now_v7().to_string()).await.unwrap();
    for api in APIS {
        let client = LangfuseClient::http();
        let reader: Arc<dyn LangfuseReader> = match api {
            "v3" => Arc::new(V3Reader::new(client, url.as_str())),
            _ => Arc::new(V4Reader::new(client, url.as_str())),
        };
        let svc = TracesService::new(reader, projects.clone(), store.clone())
            .deadline(Duration::from_millis(300))
            .backoff(Duration::from_millis(10), Duration::from_millis(20));
        for (kind, path) in [(RouteKind::Traces, "/traces"), (RouteKind::TracesPointwise, "/traces/pointwise")] {
            let mut req = http::Request::get(format!("{path}?tags=rollout_id:r1&max_retries=5"))
                .body(llmgate_core::body::full(""))
                .unwrap();
            req.extensions_mut().insert(RouteMeta { kind, project: None, rollout: None, encoded_base_url: None });
            let response = within(svc.clone().oneshot(req)).await.unwrap();
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{api} {path}");
        }
    }
}
