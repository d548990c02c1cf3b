//! End-to-end tests of the Langfuse layers and exporter against the Langfuse stand-in.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, body,
    catalog::{Catalog, ModelSpec, Pricing},
    ext::{
        FallbackEvent, FallbackEvents, InsertionId, LangfuseKeys, LlmRequest, ModelChoice, Project, RolloutTags, Secret,
    },
};
use llmgate_langfuse::{
    Emit, ExporterConfig, LangfuseAttemptLayer, LangfuseClient, LangfuseExporter, LangfuseLayer, LangfuseReader,
    TraceQuery, V3Reader, V4Reader,
};
use llmgate_test_support::langfuse::{Fault, LangfuseStandIn, StoredObservation};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};

const MODEL: &str = "openai/gpt-4o-mini";

fn keys(n: u32) -> LangfuseKeys {
    LangfuseKeys { public_key: Arc::from(format!("pk-lf-{n}")), secret_key: Secret::new(format!("sk-lf-{n}")) }
}

fn project(n: u32) -> Project {
    Project { id: Arc::from(format!("p{n}")), langfuse: keys(n) }
}

async fn stand_in() -> LangfuseStandIn {
    let lf = LangfuseStandIn::start().await;
    lf.add_project("p1", "pk-lf-1", "sk-lf-1");
    lf.add_project("p2", "pk-lf-2", "sk-lf-2");
    lf
}

fn fast_config(lf: &LangfuseStandIn) -> ExporterConfig {
    ExporterConfig::new(lf.url())
        .schedule_delay(Duration::from_millis(20))
        .export_timeout(Duration::from_millis(300))
        .backoff(Duration::from_millis(20), Duration::from_secs(2))
        .max_retries(1000)
}

fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::new([ModelSpec {
        name: MODEL.into(),
        pricing: Some(Pricing { input_per_1m: 0.15, output_per_1m: 0.6 }),
        ..Default::default()
    }]))
}

struct Req {
    project: Option<Project>,
    insertion: Option<InsertionId>,
    stream: bool,
    rollout: &'static str,
}

fn request(r: Req) -> Request<GatewayBody> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": r.stream,
        "temperature": 0.2,
        "user": "user-1",
        "metadata": {"tags": ["client-tag", "with,comma"], "session_id": "sess-1"},
    });
    let raw = Bytes::from(body.to_string());
    let Value::Object(map) = body else { unreachable!() };
    let mut req = Request::new(body::full(raw.clone()));
    let ext = req.extensions_mut();
    ext.insert(LlmRequest::new(raw, map));
    ext.insert(ModelChoice { requested: Arc::from(MODEL), current: Arc::from(MODEL), attempt: 1 });
    if let Some(p) = r.project {
        ext.insert(p);
    }
    if let Some(id) = r.insertion {
        ext.insert(id);
        let tags: Vec<String> = vec![
            format!("rollout_id:{}", r.rollout),
            format!("insertion_id:{}", id.0),
            "invocation_id:inv".into(),
            "experiment_id:exp".into(),
            "run_id:run".into(),
            "row_id:row".into(),
        ];
        ext.insert(RolloutTags(tags.into()));
    }
    req
}

fn json_response() -> Response<GatewayBody> {
    let mut response = Response::new(body::full(
        json!({"id": "c1", "choices": [{"message": {"role": "assistant", "content": "hello"}}],
               "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}})
        .to_string(),
    ));
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    response
}

fn sse_response() -> Response<GatewayBody> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(8);
    tokio::spawn(async move {
        for chunk in [
            "data: {\"choices\":[{\"delta\":{\"content\":\"hel\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"total_tokens\":12}}\n\n",
            "data: [DONE]\n\n",
        ] {
            if tx.send_data(Bytes::from(chunk)).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(body::boxed(body));
    response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    response
}

/// The stack: Langfuse → (upstream records fallback events like a routing layer would) →
/// LangfuseAttempt → upstream.
fn stack(
    layer: LangfuseLayer,
    events: bool,
) -> impl tower::Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError, Future: Send> + Clone
{
    ServiceBuilder::new().layer(layer).layer(LangfuseAttemptLayer::new().catalog(catalog())).service(service_fn(
        move |req: Request<GatewayBody>| async move {
            if events && let Some(sink) = req.extensions().get::<FallbackEvents>() {
                {
                    sink.record(FallbackEvent::RateLimit {
                        original_model: MODEL.into(),
                        fallback_model: "gemini/gemini-2.5-flash-lite".into(),
                        reason: "rpm",
                    });
                    sink.record(FallbackEvent::ContextLength {
                        original_model: MODEL.into(),
                        fallback_model: "gemini/gemini-2.5-pro".into(),
                        estimated_tokens: 150_000,
                        original_max_context: 128_000,
                        fallback_max_context: 2_097_152,
                    });
                }
            }
            let stream = req.extensions().get::<LlmRequest>().is_some_and(LlmRequest::is_stream);
            Ok::<_, BoxError>(if stream { sse_response() } else { json_response() })
        },
    ))
}

async fn run(
    svc: impl tower::Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError>,
    req: Request<GatewayBody>,
) -> Bytes {
    let response = svc.oneshot(req).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

fn insertion() -> InsertionId {
    InsertionId(uuid::Uuid::now_v7())
}

fn hex_id(id: InsertionId) -> String {
    id.0.simple().to_string()
}

fn find<'a>(obs: &[&'a StoredObservation], kind: &str) -> Vec<&'a StoredObservation> {
    obs.iter().copied().filter(|o| o.kind == kind).collect()
}

fn expected_tags(id: InsertionId, rollout: &str) -> Vec<String> {
    vec![
        "client-tag".into(),
        "with,comma".into(),
        format!("rollout_id:{rollout}"),
        format!("insertion_id:{}", id.0),
        "invocation_id:inv".into(),
        "experiment_id:exp".into(),
        "run_id:run".into(),
        "row_id:row".into(),
    ]
}

/// Polls a condition on the exporter (its counters have no change notification).
async fn until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn json_completion_is_one_trace_in_the_right_project() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()).environment("test").release("r1"), false);
    let id = insertion();
    let out =
        run(svc, request(Req { project: Some(project(1)), insertion: Some(id), stream: false, rollout: "r1" })).await;
    assert!(String::from_utf8_lossy(&out).contains("hello"));

    lf.wait_for(|s| s.observations("p1").len() == 2).await;
    {
        let state = lf.lock();
        assert!(state.observations("p2").is_empty());
        let obs = state.observations("p1");
        let root = find(&obs, "SPAN");
        let generation = find(&obs, "GENERATION");
        assert_eq!((root.len(), generation.len()), (1, 1));
        let (root, generation) = (root[0], generation[0]);
        for o in &obs {
            assert_eq!(o.trace_id, hex_id(id), "trace id = insertion id");
            assert_eq!(o.tags, expected_tags(id, "r1"));
            assert!(o.attributes["langfuse.trace.tags"].is_array(), "tags go as a string array");
            assert_eq!(o.trace_name.as_deref(), Some("chat-completion"));
            assert_eq!(o.user_id.as_deref(), Some("user-1"));
            assert_eq!(o.session_id.as_deref(), Some("sess-1"));
            assert_eq!(o.trace_metadata["rollout_id"], "r1");
            assert_eq!(o.trace_metadata["insertion_id"], id.0.to_string());
            assert_eq!(o.environment, "test");
            assert_eq!(o.release.as_deref(), Some("r1"));
        }
        assert!(root.is_root());
        assert_eq!(root.name, "chat-completion");
        assert_eq!(root.level, "DEFAULT");
        // LiteLLM's shapes: the messages in, the assistant message out.
        for o in [root, generation] {
            let input: Value = serde_json::from_str(o.input.as_deref().unwrap()).unwrap();
            assert_eq!(input, json!([{"role": "user", "content": "hi"}]));
            let output: Value = serde_json::from_str(o.output.as_deref().unwrap()).unwrap();
            assert_eq!(output, json!({"role": "assistant", "content": "hello"}));
        }

        assert_eq!(generation.parent_observation_id.as_deref(), Some(root.id.as_str()));
        assert_eq!(generation.name, "llm_call_openai_gpt-4o-mini");
        assert_eq!(generation.model.as_deref(), Some(MODEL));
        assert_eq!(generation.model_parameters.as_ref().unwrap()["temperature"], 0.2);
        assert_eq!(
            Value::Object(generation.usage_details.clone()),
            json!({"input": 1000, "output": 500, "total": 1500})
        );
        let total = generation.cost_details["total"].as_f64().unwrap();
        assert!((total - 0.00045).abs() < 1e-12, "cost {total}");
        assert!((generation.metadata["cost_usd"].as_f64().unwrap() - 0.00045).abs() < 1e-12);
        assert!((generation.metadata["input_cost_usd"].as_f64().unwrap() - 0.00015).abs() < 1e-12);
        assert!((generation.metadata["output_cost_usd"].as_f64().unwrap() - 0.0003).abs() < 1e-12);
        assert_eq!(generation.metadata["is_primary"], true);
        assert_eq!(generation.metadata["http_status"], 200);
        assert_eq!(generation.metadata["attempt"], 1);
        assert!(generation.metadata["latency_seconds"].is_number());
        assert!(generation.completion_start_time.is_none());

        for export in &state.exports {
            assert_eq!(export.project_id.as_deref(), Some("p1"));
            assert!(export.gzip);
            assert_eq!(export.ingestion_version.as_deref(), Some("4"));
            assert_eq!(export.sdk_name.as_deref(), Some("llmgate"));
            assert_eq!(export.content_type, "application/x-protobuf");
        }
    }
    until(|| exporter.snapshot().exported == 2).await;
    let snap = exporter.snapshot();
    assert_eq!((snap.dropped, snap.failed, snap.queue_depth), (0, 0, 0));
}

#[tokio::test]
async fn streamed_completion_records_usage_and_completion_start() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    let id = insertion();
    let out =
        run(svc, request(Req { project: Some(project(2)), insertion: Some(id), stream: true, rollout: "r2" })).await;
    assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));

    lf.wait_for(|s| s.observations("p2").len() == 2).await;
    let state = lf.lock();
    assert!(state.observations("p1").is_empty());
    let obs = state.observations("p2");
    let generation = find(&obs, "GENERATION")[0];
    let root = find(&obs, "SPAN")[0];
    assert_eq!(Value::Object(generation.usage_details.clone()), json!({"input": 10, "output": 2, "total": 12}));
    assert!(generation.completion_start_time.is_some());
    assert!(generation.cost_details["total"].as_f64().unwrap() > 0.0);
    // Assembled from the stream, as LiteLLM records it.
    for o in [root, generation] {
        let output: Value = serde_json::from_str(o.output.as_deref().unwrap()).unwrap();
        assert_eq!(output, json!({"role": "assistant", "content": "hello"}));
    }
    for o in &obs {
        assert_eq!(o.trace_id, hex_id(id));
        assert_eq!(o.tags, expected_tags(id, "r2"));
    }
}

#[tokio::test]
async fn fallback_events_carry_exactly_the_keys() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), true);
    let id = insertion();
    run(svc, request(Req { project: Some(project(1)), insertion: Some(id), stream: false, rollout: "r3" })).await;

    lf.wait_for(|s| s.observations("p1").len() == 4).await;
    let state = lf.lock();
    let obs = state.observations("p1");
    let root = find(&obs, "SPAN")[0];
    let events = find(&obs, "EVENT");
    assert_eq!(events.len(), 2);
    let rate = events.iter().find(|e| e.name == "rate_limit_fallback").unwrap();
    let ctx = events.iter().find(|e| e.name == "context_length_fallback").unwrap();
    // What llmgate sent: one JSON object string with exactly the keys (Langfuse adds
    // `resourceAttributes` next to them when storing).
    let sent = |o: &StoredObservation| -> Value {
        serde_json::from_str(o.attributes["langfuse.observation.metadata"].as_str().unwrap()).unwrap()
    };
    let (rate_sent, ctx_sent) = (sent(rate), sent(ctx));
    assert_eq!(rate.metadata["reason"], "rpm");
    assert_eq!(ctx.metadata["estimated_tokens"], 150000);
    assert_eq!(
        rate_sent,
        json!({"original_model": MODEL, "fallback_model": "gemini/gemini-2.5-flash-lite", "reason": "rpm"})
    );
    assert_eq!(
        ctx_sent,
        json!({"original_model": MODEL, "fallback_model": "gemini/gemini-2.5-pro", "estimated_tokens": 150000,
               "original_max_context": 128000, "fallback_max_context": 2097152})
    );
    for e in &events {
        assert_eq!(e.start_time, e.end_time, "events are zero-length");
        assert_eq!(e.parent_observation_id.as_deref(), Some(root.id.as_str()));
        assert_eq!(e.trace_id, hex_id(id));
        assert_eq!(e.tags, expected_tags(id, "r3"));
    }
}

#[tokio::test]
async fn emit_events_skips_generations_and_off_exports_nothing() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()).emit(Emit::Events), true);
    run(svc, request(Req { project: Some(project(1)), insertion: None, stream: false, rollout: "" })).await;
    let off = stack(LangfuseLayer::new(exporter.clone()).emit(Emit::Off), true);
    run(off, request(Req { project: Some(project(2)), insertion: None, stream: false, rollout: "" })).await;
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    let state = lf.lock();
    let obs = state.observations("p1");
    assert_eq!(obs.len(), 3);
    assert!(find(&obs, "GENERATION").is_empty());
    assert_eq!(find(&obs, "EVENT").len(), 2);
    // Without an insertion id the trace id is a fresh UUIDv7.
    assert_eq!(uuid::Uuid::parse_str(&obs[0].trace_id).unwrap().get_version_num(), 7);
    assert!(state.observations("p2").is_empty());
}

#[tokio::test]
async fn no_project_is_skipped_and_counted() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), true);
    run(svc, request(Req { project: None, insertion: Some(insertion()), stream: false, rollout: "x" })).await;
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    assert_eq!(lf.state(|s| s.export_requests()), 0);
    assert_eq!(exporter.snapshot().skipped, 1);
}

#[tokio::test]
async fn flush_on_shutdown_exports_what_is_queued() {
    let lf = stand_in().await;
    // Batches would wait an hour: only the flush sends them.
    let config = fast_config(&lf).schedule_delay(Duration::from_secs(3600));
    let exporter = LangfuseExporter::spawn(config, LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    run(
        svc.clone(),
        request(Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout: "a" }),
    )
    .await;
    run(svc, request(Req { project: Some(project(2)), insertion: Some(insertion()), stream: false, rollout: "b" }))
        .await;
    assert_eq!(lf.state(|s| s.export_requests()), 0);
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    let state = lf.lock();
    assert_eq!(state.observations("p1").len(), 2);
    assert_eq!(state.observations("p2").len(), 2);
    // One export per project: projects are never mixed.
    assert_eq!(state.export_requests(), 2);
    assert!(state.exports.iter().all(|e| e.spans == 2));
}

/// A full queue pushes out its oldest spans to take the new ones (spec: langfuse.md §6.3).
#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_drops_the_oldest_spans_and_counts_them() {
    let lf = stand_in().await;
    let config = fast_config(&lf).max_queue_spans(2).schedule_delay(Duration::from_secs(3600));
    let exporter = LangfuseExporter::spawn(config, LangfuseClient::http());
    let span = |n: u8| opentelemetry_proto::tonic::trace::v1::Span {
        trace_id: vec![n; 16],
        span_id: vec![n; 8],
        name: format!("s{n}"),
        start_time_unix_nano: 1,
        end_time_unix_nano: 2,
        ..Default::default()
    };
    // The drain task cannot run before this task yields: the queue holds exactly two.
    let accepted: Vec<bool> = (1..=5).map(|n| exporter.enqueue(&keys(1), span(n))).collect();
    assert_eq!(accepted, vec![true; 5]);
    let snap = exporter.snapshot();
    assert_eq!((snap.dropped, snap.queue_depth), (3, 2));
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    let names: Vec<String> = lf.state(|s| s.observations("p1").iter().map(|o| o.name.clone()).collect());
    assert_eq!(names, vec!["s4", "s5"], "the newest spans are kept, the oldest dropped");
    assert_eq!(exporter.snapshot().exported, 2);
}

/// The per-attempt part alone: `LangfuseAttempt` → upstream (JSON).
fn attempt_service()
-> impl tower::Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError, Future: Send> + Clone {
    ServiceBuilder::new()
        .layer(LangfuseAttemptLayer::new().catalog(catalog()))
        .service(service_fn(|_req: Request<GatewayBody>| async { Ok::<_, BoxError>(json_response()) }))
}

#[tokio::test]
async fn a_generation_that_ends_after_the_root_is_still_its_child() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(std::sync::Mutex::new(Some(released)));
    // Between the layers, as a routing layer reading a losing attempt in the background might:
    // the client gets its own body, the attempt's body is read only after the root finished.
    let attempt = attempt_service();
    let svc = ServiceBuilder::new().layer(LangfuseLayer::new(exporter.clone())).service(service_fn(
        move |req: Request<GatewayBody>| {
            let (attempt, released) = (attempt.clone(), released.lock().unwrap().take().unwrap());
            async move {
                let response = attempt.oneshot(req).await?;
                tokio::spawn(async move {
                    let _ = released.await;
                    response.into_body().collect().await.unwrap();
                });
                Ok::<_, BoxError>(Response::new(body::full("{}")))
            }
        },
    ));
    let id = insertion();
    run(svc, request(Req { project: Some(project(1)), insertion: Some(id), stream: false, rollout: "late" })).await;
    lf.wait_for(|s| s.observations("p1").len() == 1).await;
    release.send(()).unwrap();
    lf.wait_for(|s| s.observations("p1").len() == 2).await;
    let state = lf.lock();
    let obs = state.observations("p1");
    let (root, generation) = (find(&obs, "SPAN")[0], find(&obs, "GENERATION")[0]);
    assert_eq!(generation.parent_observation_id.as_deref(), Some(root.id.as_str()));
    assert_eq!(generation.trace_id, hex_id(id));
    assert_eq!(generation.tags, expected_tags(id, "late"));
    assert_eq!(generation.usage_details["total"], 1500);
    assert_eq!(state.export_requests(), 2, "the late generation went in its own export");
}

#[tokio::test]
async fn a_request_dropped_before_its_response_still_exports_its_generations() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    // Between the layers: the attempt's response is thrown away (a retry would follow), then the
    // client goes away before any response.
    let attempt = attempt_service();
    let svc = ServiceBuilder::new().layer(LangfuseLayer::new(exporter.clone())).service(service_fn(
        move |req: Request<GatewayBody>| {
            let attempt = attempt.clone();
            async move {
                drop(attempt.oneshot(req).await?);
                std::future::pending::<Result<Response<GatewayBody>, BoxError>>().await
            }
        },
    ));
    let req = request(Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout: "gone" });
    assert!(tokio::time::timeout(Duration::from_millis(50), svc.oneshot(req)).await.is_err());
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    let state = lf.lock();
    let obs = state.observations("p1");
    assert_eq!(obs.len(), 1, "no root span: the request never finished");
    assert_eq!(obs[0].kind, "GENERATION");
    assert_eq!(obs[0].level, "WARNING", "the response was not read to its end");
    assert!(obs[0].parent_observation_id.is_some());
}

/// A request completes while Langfuse misbehaves, before anything is stored; spans arrive
/// once Langfuse recovers.
async fn survives(fault: Fault) {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    lf.set_fault(fault.clone());
    // A first request gets the exporter into the failing export.
    run(
        svc.clone(),
        request(Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout: "a" }),
    )
    .await;
    lf.wait_for(|s| s.export_requests() >= 1).await;
    // While Langfuse is still failing or hanging, another request completes.
    let out =
        run(svc, request(Req { project: Some(project(1)), insertion: Some(insertion()), stream: true, rollout: "b" }))
            .await;
    assert!(!out.is_empty());
    assert!(lf.state(|s| s.observations("p1").is_empty()), "nothing stored while faulty");
    lf.set_fault(Fault::None);
    lf.wait_for(|s| s.observations("p1").len() == 4).await;
    until(|| exporter.snapshot().exported == 4).await;
    let snap = exporter.snapshot();
    assert!(snap.retried >= 1, "{snap:?}");
    assert_eq!((snap.dropped, snap.failed), (0, 0));
}

#[tokio::test]
async fn langfuse_503_is_retried_until_it_recovers() {
    survives(Fault::Status(503)).await;
}

#[tokio::test]
async fn langfuse_hanging_is_timed_out_and_retried() {
    survives(Fault::Hang).await;
}

#[tokio::test]
async fn langfuse_429_honours_retry_after() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    lf.set_fault(Fault::RateLimited { retry_after_secs: 1 });
    run(svc, request(Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout: "a" }))
        .await;
    lf.wait_for(|s| s.exports.iter().any(|e| e.status == 429)).await;
    lf.set_fault(Fault::None);
    lf.wait_for(|s| s.observations("p1").len() == 2).await;
    let state = lf.lock();
    let first = state.exports.iter().find(|e| e.status == 429).unwrap().at;
    let ok = state.exports.iter().find(|e| e.status == 200).unwrap().at;
    // Backoff alone would retry after 20 ms; Retry-After says 1 s.
    assert!(ok - first >= Duration::from_millis(900), "retried after {:?}", ok - first);
    assert!(exporter.snapshot().retried >= 2);
}

#[tokio::test]
async fn langfuse_500_is_retried_until_it_recovers() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    lf.set_fault(Fault::Status(500));
    run(svc, request(Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout: "a" }))
        .await;
    until(|| exporter.snapshot().retried >= 1).await;
    assert_eq!(exporter.snapshot().failed, 0, "a 500 drops nothing");
    lf.set_fault(Fault::None);
    lf.wait_for(|s| s.observations("p1").len() == 2).await;
}

#[tokio::test]
async fn wrong_keys_are_not_retried() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    run(svc, request(Req { project: Some(project(9)), insertion: None, stream: false, rollout: "" })).await;
    until(|| exporter.snapshot().failed == 2).await;
    assert_eq!(lf.state(|s| s.exports.iter().map(|e| e.status).collect::<Vec<_>>()), vec![401]);
}

#[tokio::test]
async fn langfuse_refusing_connections_is_retried_until_it_listens_again() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    lf.refuse();
    run(svc, request(Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout: "a" }))
        .await;
    until(|| exporter.snapshot().retried >= 2).await;
    assert_eq!(lf.state(|s| s.export_requests()), 0);
    lf.resume().await;
    lf.wait_for(|s| s.observations("p1").len() == 2).await;
    until(|| exporter.snapshot().exported == 2).await;
}

#[tokio::test]
async fn readers_find_traces_by_tag_and_id() {
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(fast_config(&lf), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), true);
    let ids = [insertion(), insertion(), insertion()];
    for (id, rollout) in ids.iter().zip(["ra", "ra", "rb"]) {
        run(svc.clone(), request(Req { project: Some(project(1)), insertion: Some(*id), stream: false, rollout }))
            .await;
    }
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    lf.set_visibility_delay(Duration::from_secs(3600));
    let late = insertion();
    run(svc, request(Req { project: Some(project(1)), insertion: Some(late), stream: false, rollout: "ra" })).await;
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);

    let client = LangfuseClient::http();
    let v3 = V3Reader::new(client.clone(), lf.url()).page_size(1);
    let v4 = V4Reader::new(client, lf.url()).page_size(2);
    let query = TraceQuery { tags: vec!["rollout_id:ra".into()], ..Default::default() };
    let readers: [(&str, &dyn LangfuseReader); 2] = [("v3", &v3), ("v4", &v4)];
    for (name, reader) in readers {
        let mut traces = reader.list_traces(&keys(1), &query).await.unwrap();
        assert_eq!(traces.len(), 2, "{name}: the late trace is not visible yet");
        traces.sort_by(|a, b| a.id.cmp(&b.id));
        let mut want: Vec<String> = ids[..2].iter().map(|i| hex_id(*i)).collect();
        want.sort();
        assert_eq!(traces.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), want, "{name}");
        for t in &traces {
            assert_eq!(t.name.as_deref(), Some("chat-completion"), "{name}");
            assert_eq!(t.user_id.as_deref(), Some("user-1"), "{name}");
            assert_eq!(t.session_id.as_deref(), Some("sess-1"), "{name}");
            assert!(t.tags.contains(&"rollout_id:ra".to_string()), "{name}");
            assert_eq!(t.input[0]["role"], "user", "{name}");
            assert_eq!(t.output["role"], "assistant", "{name}");
        }
        if name == "v4" {
            assert_eq!(traces[0].observations.len(), 4);
        }
        let one = reader.get_trace(&keys(1), &ids[2].0.to_string()).await.unwrap().unwrap();
        assert_eq!(one.id, hex_id(ids[2]), "{name}");
        assert_eq!(one.observations.len(), 4, "{name}");
        let events: Vec<_> = one.observations.iter().filter(|o| o.kind == "EVENT").collect();
        assert_eq!(events.len(), 2, "{name}");
        assert!(reader.get_trace(&keys(1), &late.0.to_string()).await.unwrap().is_none(), "{name}");
        let err = reader.list_traces(&keys(7), &query).await.unwrap_err();
        assert_eq!(err.status, Some(401), "{name}: {err}");
    }
    let _ = SystemTime::now();
}

#[tokio::test]
async fn stand_in_checks_requests_like_langfuse() {
    let lf = stand_in().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let post = |body: String, ct: &'static str, auth: &'static str, version: &'static str| {
        let req = Request::post(format!("{}/api/public/otel/v1/traces", lf.url()))
            .header("content-type", ct)
            .header("authorization", auth)
            .header("x-langfuse-ingestion-version", version)
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        let client = client.clone();
        async move {
            let r = client.request(req).await.unwrap();
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    use base64::Engine as _;
    let auth: &'static str = Box::leak(
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("pk-lf-1:sk-lf-1")).into_boxed_str(),
    );
    let span = |trace: &str, attrs: Value| {
        json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
            "traceId": trace, "spanId": "0102030405060708", "name": "json-span",
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000500000000",
            "attributes": attrs}]}]}]})
        .to_string()
    };
    let good = json!([{"key": "langfuse.trace.tags", "value": {"stringValue": "a,b"}},
                      {"key": "langfuse.observation.type", "value": {"stringValue": "event"}}]);
    let trace = "0102030405060708090a0b0c0d0e0f10";
    assert_eq!(post(span(trace, good.clone()), "application/json", auth, "4").await, (200, "{}".into()));
    assert_eq!(post(span(trace, good.clone()), "application/json", "Basic eDp5", "4").await.0, 401);
    assert_eq!(post(span(trace, good.clone()), "application/json", auth, "5").await.0, 400);
    assert_eq!(post(span(trace, good.clone()), "application/json", auth, "four").await.0, 400);
    assert_eq!(post(span(trace, good.clone()), "text/plain", auth, "4").await.0, 400);
    assert_eq!(post(span("zz", good.clone()), "application/json", auth, "4").await.0, 400);
    assert_eq!(post(span(&"0".repeat(32), good), "application/json", auth, "4").await.0, 400);
    let object_attrs = json!({"langfuse.observation.type": "event"});
    assert_eq!(post(span(trace, object_attrs), "application/json", auth, "4").await.0, 400);
    let state = lf.lock();
    let obs = state.observations("p1");
    assert_eq!(obs.len(), 1);
    assert_eq!(obs[0].kind, "EVENT");
    assert_eq!(obs[0].tags, vec!["a", "b"], "a comma-joined string is split, as Langfuse does");
}

/// LiteLLM-mode exports: llmgate's events-only trace (trace id = insertion id, root span and an
/// event) and LiteLLM's own trace (its id, root span and generation), both with the same tags.
#[tokio::test]
async fn readers_return_one_trace_per_insertion_and_find_it_on_its_own() {
    use base64::Engine as _;
    let lf = stand_in().await;
    let id = insertion();
    let hex = hex_id(id);
    let tags = json!({"arrayValue": {"values": [{"stringValue": "rollout_id:rl"}, {"stringValue": format!("insertion_id:{}", id.0)}]}});
    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let span = |trace: &str, span: &str, parent: Option<&str>, kind: &str| {
        json!({"traceId": trace, "spanId": span, "parentSpanId": parent.unwrap_or(""), "name": kind,
            "startTimeUnixNano": now.to_string(), "endTimeUnixNano": (now + 1_000_000).to_string(),
            "attributes": [{"key": "langfuse.trace.tags", "value": tags},
                           {"key": "langfuse.trace.name", "value": {"stringValue": "chat-completion"}},
                           {"key": "langfuse.observation.type", "value": {"stringValue": kind}}]})
    };
    let litellm = "aa".repeat(16);
    let body = json!({"resourceSpans": [{"scopeSpans": [{"spans": [
        span(&hex, "0000000000000001", None, "span"),
        span(&hex, "0000000000000002", Some("0000000000000001"), "event"),
        span(&litellm, "0000000000000003", None, "span"),
        span(&litellm, "0000000000000004", Some("0000000000000003"), "generation"),
    ]}]}]});
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("pk-lf-1:sk-lf-1"));
    let req = Request::post(format!("{}/api/public/otel/v1/traces", lf.url()))
        .header("content-type", "application/json")
        .header("authorization", auth)
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), 200);

    let client = LangfuseClient::http();
    let v3 = V3Reader::new(client.clone(), lf.url());
    let v4 = V4Reader::new(client, lf.url());
    let readers: [(&str, &dyn LangfuseReader); 2] = [("v3", &v3), ("v4", &v4)];
    let query = TraceQuery { tags: vec!["rollout_id:rl".into()], ..Default::default() };
    for (name, reader) in readers {
        let traces = reader.list_traces(&keys(1), &query).await.unwrap();
        assert_eq!(traces.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), vec![litellm.as_str()], "{name}");
        let found = reader.find_insertion(&keys(1), &id.0.to_string(), &TraceQuery::default()).await.unwrap().unwrap();
        assert_eq!(found.id, litellm, "{name}: LiteLLM's trace, not llmgate's events-only one");
        assert!(found.has_generation(), "{name}: with its observations");
        // Filters are kept on the per-insertion query.
        let other_user = TraceQuery { user_id: Some("nobody".into()), ..Default::default() };
        assert!(reader.find_insertion(&keys(1), &id.0.to_string(), &other_user).await.unwrap().is_none(), "{name}");
        let named = TraceQuery { name: Some("chat-completion".into()), ..Default::default() };
        assert!(reader.find_insertion(&keys(1), &id.0.to_string(), &named).await.unwrap().is_some(), "{name}");
        let missing = insertion().0.to_string();
        assert!(reader.find_insertion(&keys(1), &missing, &TraceQuery::default()).await.unwrap().is_none(), "{name}");
    }
}

// === bursts and losses ===

/// A burst of concurrent requests, far more spans than the queue holds, with the default
/// settings (5 s schedule delay, queue of 8192, 8 exports at once): nothing is dropped; every
/// span reaches Langfuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_exported_without_a_drop() {
    const REQUESTS: usize = 6_000;
    const CONCURRENCY: usize = 256;
    let lf = stand_in().await;
    let exporter = LangfuseExporter::spawn(ExporterConfig::new(lf.url()), LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    // One task drives the requests concurrently; the exporter's tasks run on the other thread.
    let clients = (0..CONCURRENCY).map(|client| {
        let svc = svc.clone();
        async move {
            for _ in (client..REQUESTS).step_by(CONCURRENCY) {
                let req = Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout: "b" };
                run(svc.clone(), request(req)).await;
            }
        }
    });
    futures_util::future::join_all(clients).await;
    assert!(exporter.flush(Instant::now() + Duration::from_secs(60)).await);
    let snap = exporter.snapshot();
    assert_eq!((snap.dropped, snap.failed, snap.exported), (0, 0, 2 * REQUESTS as u64), "{snap:?}");
    assert_eq!(lf.state(|s| s.observations("p1").len()), 2 * REQUESTS);
    assert_eq!(exporter.losses().lost("b"), 0);
}

/// Spans dropped by a full queue, and spans of an export Langfuse refused, are counted for
/// their rollout (what `/traces` reads to answer at once).
#[tokio::test(flavor = "current_thread")]
async fn lost_spans_are_counted_per_rollout() {
    let lf = stand_in().await;
    let config = fast_config(&lf).max_queue_spans(2).schedule_delay(Duration::from_secs(3600));
    let exporter = LangfuseExporter::spawn(config, LangfuseClient::http());
    let svc = stack(LangfuseLayer::new(exporter.clone()), false);
    // The drain task cannot run before this task yields: each request's two spans fill the
    // queue, pushing out the request before it; the last one's are kept.
    for rollout in ["r-lost", "r-lost", "r-kept"] {
        let req = Req { project: Some(project(1)), insertion: Some(insertion()), stream: false, rollout };
        run(svc.clone(), request(req)).await;
    }
    assert_eq!(exporter.snapshot().dropped, 4);
    assert_eq!((exporter.losses().lost("r-kept"), exporter.losses().lost("r-lost")), (0, 4));
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    assert_eq!(exporter.snapshot().exported, 2);

    // Keys Langfuse does not know: the export is refused (401) and its spans are lost.
    let req = Req { project: Some(project(9)), insertion: Some(insertion()), stream: false, rollout: "r-refused" };
    run(svc, request(req)).await;
    assert!(exporter.flush(Instant::now() + Duration::from_secs(10)).await);
    assert_eq!(exporter.snapshot().failed, 2);
    assert_eq!(exporter.losses().lost("r-refused"), 2);
    assert_eq!(exporter.losses().lost("r-kept"), 0);
}
