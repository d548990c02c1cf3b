//! Issue 4 through the reference proxy: traces, generations and fallback events reach the
//! Langfuse stand-in, in the right project, off the request path.

use std::time::Duration;

use http::StatusCode;
use llmgate_test_support::langfuse::{Fault, LangfuseStandIn, StoredObservation};
use serde_json::{Value, json};

use crate::support::*;

const ROLLOUT: &str = "/rollout_id/r1/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1/chat/completions";

struct Setup {
    standin: LangfuseStandIn,
    mock: llmgate::mock_upstream::MockUpstream,
    gw: TestGateway,
    _dir: TempDir,
}

/// `extra_models`: more YAML list entries for `models:`.
async fn setup(extra_models: &str, batch_delay_ms: u64) -> Setup {
    let (standin, dir, secrets) = langfuse_with_two_projects().await;
    let mock = mock().await;
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai}}\nlangfuse: {{host: \"{}\", secrets_path: \"{}\", export: {{batch_delay_ms: {batch_delay_ms}, timeout_ms: 1000}}}}\n\
         models:\n  - {{name: gpt-test, context_window: 100000, pricing: {{input_per_1m: 1000000, output_per_1m: 2000000}}, fallbacks: [gpt-backup]}}\n  - {{name: gpt-backup, context_window: 100000}}\n{extra_models}",
        mock.url(),
        standin.url(),
        secrets.display()
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    Setup { standin, mock, gw, _dir: dir }
}

fn observations(standin: &LangfuseStandIn, project: &str) -> Vec<StoredObservation> {
    standin.state(|s| s.observations(project).into_iter().cloned().collect())
}

#[tokio::test]
async fn a_completion_is_one_trace_with_tags_usage_cost_and_the_insertion_id_as_trace_id() {
    for stream in [false, true] {
        let s = setup("", 50).await;
        let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}],
            "stream": stream, "stream_options": {"include_usage": true}, "user": "u-7", "metadata": {"tags": ["mine"], "session_id": "s-9"}});
        let reply = post_json(&s.gw.url(ROLLOUT), &[], &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let insertion_id = reply.headers["x-insertion-id"].to_str().unwrap().to_string();

        let project = "p1".to_string();
        within(s.standin.wait_for(move |st| {
            let obs = st.observations(&project);
            obs.iter().any(|o| o.kind == "GENERATION") && obs.iter().any(|o| o.is_root())
        }))
        .await;
        let obs = observations(&s.standin, "p1");
        assert!(observations(&s.standin, "p2").is_empty(), "nothing in the other project");
        let trace_id = insertion_id.replace('-', "");
        let expected_tags = vec![
            "mine".to_string(),
            "rollout_id:r1".into(),
            format!("insertion_id:{insertion_id}"),
            "invocation_id:i1".into(),
            "experiment_id:e1".into(),
            "run_id:u1".into(),
            "row_id:w1".into(),
        ];
        for o in &obs {
            assert_eq!(o.trace_id, trace_id, "every span in the insertion id's trace");
            assert_eq!(o.tags, expected_tags, "tags on every span ({} {})", o.kind, o.name);
            assert_eq!(o.user_id.as_deref(), Some("u-7"));
            assert_eq!(o.session_id.as_deref(), Some("s-9"));
        }
        let generation = obs.iter().find(|o| o.kind == "GENERATION").unwrap();
        assert_eq!(generation.name, "llm_call_gpt-test");
        assert_eq!(generation.model.as_deref(), Some("gpt-test"));
        assert_eq!(Value::Object(generation.usage_details.clone()), json!({"input": 3, "output": 5, "total": 8}));
        // 3 input tokens at $1/token and 5 output tokens at $2/token.
        let cost = &generation.cost_details;
        assert_eq!(cost["input"].as_f64(), Some(3.0));
        assert_eq!(cost["output"].as_f64(), Some(10.0));
        assert_eq!(cost["total"].as_f64(), Some(13.0));
        if stream {
            assert!(generation.completion_start_time.is_some(), "streams carry a completion start");
        }
        let roots = obs.iter().filter(|o| o.is_root()).count();
        assert_eq!(roots, 1, "one root span");
        assert_eq!(s.mock.chat_requests(), 1);
    }
}

/// The metadata llmgate set, without what Langfuse adds itself (`resourceAttributes`, `scope`).
fn event_metadata(o: &StoredObservation) -> Value {
    let mut meta = o.metadata.clone();
    meta.remove("resourceAttributes");
    meta.remove("scope");
    Value::Object(meta)
}

#[tokio::test]
async fn fallback_events_carry_exactly_the_documented_keys() {
    let s = setup("  - {name: tiny, context_window: 40, fallbacks: [gpt-test]}\n", 50).await;
    let fail = [("x-mock-fail", "gpt-test=429:rate_limit_exceeded")];
    let reply = post_json(&s.gw.url("/v1/chat/completions"), &fail, &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let big = json!({"model": "tiny", "messages": [{"role": "user", "content": "word ".repeat(100)}]});
    let reply = post_json(&s.gw.url("/v1/chat/completions"), &[], &big).await;
    assert_eq!(reply.status, StatusCode::OK);

    within(s.standin.wait_for(|st| st.observations("p1").iter().filter(|o| o.kind == "EVENT").count() >= 2)).await;
    let events: Vec<StoredObservation> =
        observations(&s.standin, "p1").into_iter().filter(|o| o.kind == "EVENT").collect();
    let rate = events.iter().find(|e| e.name == "rate_limit_fallback").expect("rate_limit_fallback");
    assert_eq!(
        event_metadata(rate),
        json!({"original_model": "gpt-test", "fallback_model": "gpt-backup", "reason": "upstream_429"})
    );
    let context = events.iter().find(|e| e.name == "context_length_fallback").expect("context_length_fallback");
    let meta = event_metadata(context);
    let meta = meta.as_object().unwrap();
    let mut keys: Vec<&str> = meta.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["estimated_tokens", "fallback_max_context", "fallback_model", "original_max_context", "original_model"]
    );
    assert_eq!(meta["original_model"], "tiny");
    assert_eq!(meta["fallback_model"], "gpt-test");
    assert_eq!(meta["original_max_context"], 40);
    assert_eq!(meta["fallback_max_context"], 100000);
    assert!(meta["estimated_tokens"].as_u64().unwrap() > 40);
}

#[tokio::test]
async fn a_failing_langfuse_never_holds_a_client_and_spans_arrive_after_it_recovers() {
    for fault in [Fault::Hang, Fault::Status(500), Fault::RateLimited { retry_after_secs: 1 }] {
        let s = setup("", 20).await;
        s.standin.set_fault(fault.clone());
        for _ in 0..5 {
            // `post_json` fails the test after 20 s; the upstream answers at once, so a client
            // held by the exporter would show here.
            let reply = post_json(&s.gw.url("/v1/chat/completions"), &[], &chat_body("gpt-test", false)).await;
            assert_eq!(reply.status, StatusCode::OK, "{fault:?}");
        }
        s.standin.set_fault(Fault::None);
        within(s.standin.wait_for(|st| st.observations("p1").iter().filter(|o| o.kind == "GENERATION").count() >= 5))
            .await;
    }
}

#[tokio::test]
async fn a_refusing_langfuse_loses_nothing_once_it_listens_again() {
    let s = setup("", 20).await;
    s.standin.refuse();
    for _ in 0..3 {
        let reply = post_json(&s.gw.url("/v1/chat/completions"), &[], &chat_body("gpt-test", false)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.standin.resume().await;
    within(s.standin.wait_for(|st| st.observations("p1").iter().filter(|o| o.kind == "GENERATION").count() >= 3)).await;
}

#[tokio::test]
async fn graceful_shutdown_flushes_queued_spans() {
    // Batches would wait ten minutes: only the flush at shutdown can deliver them.
    let mut s = setup("", 600_000).await;
    let reply = post_json(&s.gw.url(ROLLOUT), &[], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(observations(&s.standin, "p1").is_empty());
    within(s.gw.begin_shutdown()).await.unwrap();
    let obs = observations(&s.standin, "p1");
    assert!(obs.iter().any(|o| o.kind == "GENERATION") && obs.iter().any(|o| o.is_root()), "{obs:?}");
}

/// Issue 15 (defects 3 and 4): in `litellm` mode LiteLLM writes the generation. Every attempt
/// carries a `traceparent` naming the insertion id's trace and llmgate's root span, so LiteLLM's
/// spans join the one trace; llmgate adds its root (messages in, the assistant message out,
/// assembled when streamed: never empty) and no generation of its own.
#[tokio::test]
async fn litellm_mode_joins_one_trace_and_records_the_assistant_message() {
    for stream in [false, true] {
        let (standin, _dir, secrets) = langfuse_with_two_projects().await;
        let mock = mock().await;
        let yaml = format!(
            "upstreams:\n  lite: {{url: \"{}\", mode: litellm}}\nlangfuse: {{host: \"{}\", secrets_path: \"{}\", export: {{batch_delay_ms: 50, timeout_ms: 1000}}}}\n",
            mock.url(),
            standin.url(),
            secrets.display()
        );
        let gw = TestGateway::start(&yaml, &[]).await;
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}],
            "stream": stream});
        let reply = post_json(&gw.url(ROLLOUT), &[], &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let insertion_id = reply.headers["x-insertion-id"].to_str().unwrap().to_string();
        let trace_id = insertion_id.replace('-', "");

        within(standin.wait_for(|st| st.observations("p1").iter().any(|o| o.is_root()))).await;
        let obs = observations(&standin, "p1");
        assert_eq!(obs.len(), 1, "the root only: LiteLLM records the generation ({obs:?})");
        let root = &obs[0];
        assert_eq!(root.trace_id, trace_id);
        let input: Value = serde_json::from_str(root.input.as_deref().unwrap()).unwrap();
        assert_eq!(input, json!([{"role": "user", "content": "hello there"}]));
        let output: Value = serde_json::from_str(root.output.as_deref().unwrap()).unwrap();
        assert_eq!(output["role"], "assistant", "stream {stream}: {output}");
        assert!(!output["content"].as_str().unwrap().is_empty(), "stream {stream}: {output}");

        let sent = mock.requests().into_iter().find(|r| r.uri.ends_with("/chat/completions")).unwrap();
        let traceparent = sent.headers["traceparent"].to_str().unwrap().to_string();
        assert_eq!(traceparent, format!("00-{trace_id}-{}-01", root.id), "LiteLLM's parent is llmgate's root");
    }
}

/// Issue 15 (defect 5): in `openai` mode a JSON completion's trace output is the assistant
/// message, tool calls included, not the whole `chat.completion` body.
#[tokio::test]
async fn openai_mode_output_is_the_assistant_message_with_its_tool_calls() {
    let s = setup("", 50).await;
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}]});
    let reply = post_json(&s.gw.url(ROLLOUT), &[("x-mock-tool-call", "weather")], &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    within(s.standin.wait_for(|st| st.observations("p1").iter().any(|o| o.is_root()))).await;
    let obs = observations(&s.standin, "p1");
    let root = obs.iter().find(|o| o.is_root()).unwrap();
    let output: Value = serde_json::from_str(root.output.as_deref().unwrap()).unwrap();
    let sent: Value = reply.json();
    assert_eq!(output["role"], "assistant");
    assert_eq!(output["tool_calls"], sent["choices"][0]["message"]["tool_calls"], "{output}");
    assert!(output.get("choices").is_none() && output.get("id").is_none(), "not the whole body: {output}");
}
